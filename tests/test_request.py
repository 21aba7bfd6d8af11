"""One request type (issue 12) and the original's semantics (issue 13, items 3 and 4): window gating, fuser + windows."""
import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2iadapter.bases import load_base, tiny_adapter_config
from t2iadapter.errors import ConfigError
from t2iadapter.generation.composition import Composition
from t2iadapter.generation.request import AdapterUse, GenerationRequest, Window, defaults
from t2iadapter.models import FuserConfig, build_adapter
from t2iadapter.pipeline import AdapterPipeline
from tiny_models import random_adapter

ROOT = Path(__file__).resolve().parents[1]


def original_gate(i: int, n: int, tau: float) -> bool:
    """TencentARC T2I-Adapter ddim.py: step i (sampling order) of n keeps the features while index >= int((1-tau)·n)."""
    index = n - i - 1
    return not index < int((1 - tau) * n)


def test_window_zero_to_tau_is_the_originals_cond_tau_exactly():
    taus = [k / 20 for k in range(21)] + [0.33, 0.67, 0.7, 0.9, 0.99]
    for n in range(1, 61):
        for tau in taus:
            want = [i for i in range(n) if original_gate(i, n, tau)]
            assert list(Window(0, tau).steps(n)) == want, (n, tau)
            assert [i for i in range(n) if Window(0, tau).active(i, n)] == want
    # the old rule (i < int(n·tau)) kept 12 of 25 steps at tau = 0.5; the original keeps 13
    assert len(Window(0, 0.5).steps(25)) == 13


def test_windows_that_meet_split_the_steps():
    for n in range(1, 40):
        for a in (0.1, 0.25, 0.34, 0.5, 0.67, 0.9):
            first, second = set(Window(0, a).steps(n)), set(Window(a, 1).steps(n))
            assert first | second == set(range(n)) and not first & second
        assert list(Window().steps(n)) == list(range(n)) and not list(Window(0.3, 0.3).steps(n))


def test_request_checks_and_defaults():
    req = GenerationRequest("a cat")
    assert (req.steps, req.guidance_scale, req.num_images, req.compose, req.fuser_windows) == (30, 7.5, 1, "sum", "once")
    assert defaults()["steps"] == 30 and "prompt" not in defaults()
    for bad, match in [(dict(steps=0), "steps"), (dict(num_images=0), "num_images"), (dict(compose="max"), "compose"),
                       (dict(size=(4, 64)), "out of range"), (dict(fuser_windows="x"), "fuser_windows"),
                       (dict(prompt=()), "no prompt"), (dict(negative_prompt=("a", "b")), "negative prompts")]:
        kwargs = {"prompt": "p", **bad}
        with pytest.raises(ConfigError, match=match):
            GenerationRequest(**kwargs)
    with pytest.raises(ConfigError, match="window"):
        AdapterUse("sketch", None, 1.0, "0.9:0.1")
    with pytest.raises(ConfigError, match="weight"):
        AdapterUse("sketch", None, float("nan"))
    with pytest.raises(ConfigError, match="twice"):
        GenerationRequest("p", (AdapterUse("a", None), AdapterUse("a", None)))


def test_every_front_end_takes_the_requests_defaults():
    from t2iadapter.commands.generate import add_generation_arguments
    from t2iadapter.server.schemas import AdapterOptions, GenerateRequest

    d = defaults()
    fields = GenerateRequest.model_fields
    for name in ("steps", "guidance_scale", "num_images", "compose", "scheduler", "fuser_windows"):
        assert fields[name].default == d[name], name
    use = AdapterUse("x", None)
    assert AdapterOptions.model_fields["weight"].default == use.weight
    assert Window.parse(AdapterOptions.model_fields["window"].default) == use.window
    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    args = parser.parse_args(["--prompt", "p"])
    assert (args.steps, args.guidance, args.num_images, args.scheduler) == (d["steps"], d["guidance_scale"],
                                                                           d["num_images"], d["scheduler"])
    page = (ROOT / "src" / "t2iadapter" / "web" / "index.html").read_text()
    assert not re.search(r'id="(steps|guidance)"[^>]*value=', page)  # the page reads them from /v1/models


def trained_fuser(channels, seed=3):
    """A fuser whose output projections are not zero (a fresh one is the plain sum)."""
    torch.manual_seed(seed)
    fuser = build_adapter(FuserConfig(unet_channels=tuple(channels), width=32, num_heads=4, num_layers=1))
    with torch.no_grad():
        for proj in fuser.spatial_ch_projs:
            proj.weight.normal_(0, 0.2)
            proj.bias.normal_(0, 0.5)
    return fuser.eval()


def image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8), mode)


def test_keyword_call_is_a_thin_wrapper_of_the_request(base):
    pipe = AdapterPipeline(base, {"sketch": random_adapter(base, 1, 0)})
    cond = image(64, 64, "L")
    by_keywords = pipe("a red star", [cond], steps=3, seed=1, weights=[0.6], windows=["0:0.5"], output_type="np",
                       progress=False)
    req = GenerationRequest("a red star", (AdapterUse("sketch", cond, 0.6, Window(0, 0.5)),), steps=3, seed=1)
    by_request = pipe.generate(req, output_type="np", progress=False)
    assert np.array_equal(by_keywords.images[0], by_request.images[0])
    assert by_keywords.parameters == by_request.parameters


def test_the_pipeline_never_changes_modules_it_is_handed():
    base = load_base("tiny")  # this test moves the base to bf16: its own copy
    a = random_adapter(base, 1, 0).train()
    fuser = trained_fuser(a.config.channels).train()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    pipe = AdapterPipeline(base, {"sketch": a}, fuser=fuser, dtype=torch.bfloat16)
    pipe("a", [image(64, 64, "L")], steps=1, seed=0, progress=False)
    for m in (a, fuser):
        assert m.training and all(p.requires_grad for p in m.parameters())
        assert all(p.dtype == torch.float32 for p in m.parameters())
    assert pipe.adapters["sketch"] is not a and pipe.adapters["sketch"].dtype == torch.bfloat16
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())


def features(base, seed):
    torch.manual_seed(seed)
    return [torch.randn(1, c, 4, 4) for c in tiny_adapter_config(base, 3).channels]


def test_fuser_once_gates_the_fused_features_like_the_original(base):
    """One shared window: the fuser runs once on all conditions and its output is added exactly at the original's steps."""
    feats = {"sketch": features(base, 1), "depth": features(base, 2)}
    weights = {"sketch": 0.8, "depth": 1.3}
    fuser = trained_fuser(tiny_adapter_config(base, 3).channels)
    with torch.no_grad():
        want, _ = fuser({"sketch": [f * 0.8 for f in feats["sketch"]], "depth": [f * 1.3 for f in feats["depth"]]})
        for tau in (0.3, 0.5, 0.8):
            comp = Composition(feats, weights, {n: Window(0, tau) for n in feats}, fuser=fuser,
                               tasks={"sketch": "sketch", "depth": "depth"})
            for n in (7, 10, 25):
                for i in range(n):
                    maps, _ = comp.at(i, n)
                    if original_gate(i, n, tau):
                        assert all(torch.equal(a, b) for a, b in zip(maps, want))
                    else:
                        assert maps is None


def test_fuser_once_with_different_windows_gates_each_conditions_part(base):
    feats = {"sketch": features(base, 1), "depth": features(base, 2)}
    weights = {"sketch": 1.0, "depth": 1.0}
    windows = {"sketch": Window(0, 1), "depth": Window(0, 0.5)}
    fuser = trained_fuser(tiny_adapter_config(base, 3).channels)
    tasks = {"sketch": "sketch", "depth": "depth"}
    with torch.no_grad():
        parts = fuser.parts({"sketch": feats["sketch"], "depth": feats["depth"]})  # the fuser sees both, once
        once = Composition(feats, weights, windows, fuser=fuser, tasks=tasks)
        active = Composition(feats, weights, windows, fuser=fuser, tasks=tasks, fuser_windows="active")
        late_once, _ = once.at(9, 10)  # only sketch's window holds step 9
        late_active, _ = active.at(9, 10)
        alone, _ = fuser({"sketch": feats["sketch"]})
    assert all(torch.equal(a, b) for a, b in zip(late_once, parts["sketch"]))
    assert all(torch.equal(a, b) for a, b in zip(late_active, alone))
    assert not all(torch.allclose(a, b) for a, b in zip(late_once, late_active))
    early_once, early_active = once.at(0, 10)[0], active.at(0, 10)[0]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(early_once, early_active))  # both active: the same


def test_fuser_window_modes_in_the_pipeline(base):
    a, b = random_adapter(base, 1, 5), random_adapter(base, 3, 6)
    pipe = AdapterPipeline(base, {"sketch": a, "depth": b}, fuser=trained_fuser(a.config.channels))
    conds = [image(64, 64, "L"), image(64, 64, seed=1)]
    common = dict(steps=4, seed=0, compose="fuser", output_type="np", progress=False)

    def gen(windows, mode):
        return pipe("a", conds, windows=windows, fuser_windows=mode, **common).images[0]

    assert np.abs(gen(None, "once") - gen(None, "active")).max() < 1e-5  # all steps, all adapters: the same
    shared = ["0:0.5", "0:0.5"]
    assert np.abs(gen(shared, "once") - gen(shared, "active")).max() < 1e-5
    split = ["0:1", "0:0.5"]
    assert np.abs(gen(split, "once") - gen(split, "active")).max() > 1e-4


@pytest.mark.parametrize("bad, match", [
    (dict(guidance_scale=float("nan")), "guidance_scale"), (dict(guidance_scale=-5.0), "guidance_scale"),
    (dict(guidance_scale=float("inf")), "guidance_scale"), (dict(seed=-1), "seed"), (dict(seed=2**64), "seed"),
    (dict(seed=1.5), "seed"), (dict(eta=float("nan")), "eta"), (dict(eta=1.01), "eta must be from 0 to 1"),
    (dict(num_images=10**7), "num_images must be from 1 to"), (dict(clip_skip=-1), "clip_skip"),
    (dict(size="big"), "size"), (dict(original_size=(0, 5)), "original_size"),
    (dict(prompt_2=("a", "b")), "prompt_2"), (dict(scheduler=3), "scheduler"),
])
def test_one_validation_for_api_cli_and_server(bad, match):
    """Issue 14 item 9: accepted but wrong before (NaN/negative guidance, seed -1); the server's bounds are these."""
    with pytest.raises(ConfigError, match=match):
        GenerationRequest("p", **bad)
    assert GenerationRequest("p", seed=2**64 - 1, size=64).size == (64, 64)
    from t2iadapter.generation.request import GUIDANCE_RANGE, SEED_RANGE
    from t2iadapter.server.schemas import GenerateRequest

    assert {m.ge for m in GenerateRequest.model_fields["guidance_scale"].metadata if hasattr(m, "ge")} == {GUIDANCE_RANGE[0]}
    assert {m.lt for m in GenerateRequest.model_fields["seed"].metadata if hasattr(m, "lt")} == {SEED_RANGE[1]}


@pytest.mark.parametrize("bad, match", [
    (dict(prompt=3), "prompt must be a string"), (dict(prompt=None), "prompt must be a string"),
    (dict(prompt=["a", 3]), "prompt must be a string"), (dict(negative_prompt=3), "negative_prompt must be a string"),
    (dict(prompt_2=[3]), "prompt_2 must be a string"), (dict(steps=True), "steps"),
    (dict(size=(63.5, 64)), "whole pixels"), (dict(original_size=(64.5, 64)), "original_size"),
    (dict(paste_back="yes", init_image="x.png", mask_image="m.png"), "paste_back must be True or False"),
    (dict(adapters=[("sketch", "x.png")]), "AdapterUse"),
])
def test_request_refuses_wrong_types(bad, match):
    """API sweep: each of these was a TypeError/AttributeError deep inside, or silently truncated/taken as true."""
    with pytest.raises(ConfigError, match=match):
        GenerationRequest(**{"prompt": "p", **bad})


def test_request_refuses_wrong_parts():
    from diffusers import DDIMScheduler

    with pytest.raises(ConfigError, match="not the class DDIMScheduler"):
        GenerationRequest("p", scheduler=DDIMScheduler)
    with pytest.raises(ConfigError, match="must be numbers"):
        Window("0", "1")
    with pytest.raises(ConfigError, match="name must be a string"):
        AdapterUse(3, "x.png")
    assert GenerationRequest("p", size=(64.0, 64)).size == (64, 64)


def test_a_window_that_keeps_no_step_is_said(caplog):
    # 0.9:1 of 10 steps keeps none, as the original's float arithmetic has it (1 − 0.9 = 0.0999…): the adapter
    # was silently off for the whole run
    import logging

    base = load_base("tiny")
    pipe = AdapterPipeline(base, {"sketch": random_adapter(base, 1, 0)})
    assert list(Window(0.9, 1).steps(10)) == [] and len(Window(0, 0.9).steps(10)) == 10
    cond = Image.new("L", (64, 64))
    with caplog.at_level(logging.WARNING, logger="t2iadapter.generation.loop"):
        pipe("x", [cond], steps=10, size=64, seed=0, windows=["0.9:1"], progress=False)
    said = [r.getMessage() for r in caplog.records if "keeps none" in r.getMessage()]
    assert said == ["the window 0.9:1 of 'sketch' keeps none of this run's 10 steps: it does nothing here"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="t2iadapter.generation.loop"):
        pipe("x", [cond], steps=10, size=64, seed=0, windows=["0.8:1"], progress=False)
    assert not [r for r in caplog.records if "keeps none" in r.getMessage()]
