"""Pipeline behaviour beyond parity: sizes, channel conversion, windows, fuser, style, errors, CLI."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from t2iadapter.bases import load_base, tiny_adapter_config
from t2iadapter.cli import main as cli
from t2iadapter.errors import ConditionError, ConfigError
from t2iadapter.models import FullAdapterConfig, FuserConfig, StyleAdapterConfig, build_adapter
from t2iadapter.pipeline import AdapterPipeline, Window, prepare_condition


def adapter(base, ch, seed):
    torch.manual_seed(seed)
    m = build_adapter(tiny_adapter_config(base, ch))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)
    return m


def img(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w) if mode == "L" else (h, w, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def run(pipe, *a, **kw):
    kw.setdefault("steps", 2)
    kw.setdefault("seed", 0)
    kw.setdefault("progress", False)
    return pipe(*a, **kw)


def test_any_size_is_returned_at_the_requested_size(base):
    pipe = AdapterPipeline(base, [adapter(base, 1, 0)])
    out = run(pipe, "a red star", [img(50, 30)], size=(72, 40))
    assert out.image.size == (72, 40)
    assert pipe.size_multiple == 64


def test_channel_conversion_matches_explicit_conversion(base):
    rgb = img(64, 64, seed=3)
    one = prepare_condition(rgb, 1, (64, 64), (64, 64))
    assert one.shape == (1, 1, 64, 64)
    assert torch.allclose(one, prepare_condition(rgb.convert("L"), 1, (64, 64), (64, 64)))
    three = prepare_condition(rgb.convert("L"), 3, (64, 64), (64, 64))
    assert three.shape == (1, 3, 64, 64) and torch.equal(three[:, 0], three[:, 2])
    t = torch.rand(3, 32, 32)
    grey = prepare_condition(t, 1, (32, 32), (64, 64))
    assert grey.shape == (1, 1, 64, 64) and grey[..., 32:, :].abs().sum() == 0  # zero padding outside
    pipe = AdapterPipeline(base, [adapter(base, 1, 1)])
    a = run(pipe, "a star", [rgb], output_type="np").images[0]
    b = run(pipe, "a star", [rgb.convert("L")], output_type="np").images[0]
    assert np.abs(a - b).max() < 1e-6


def test_weights_zero_and_empty_window_equal_text_only(base):
    ad = adapter(base, 3, 2)
    pipe = AdapterPipeline(base, [ad])
    plain = run(AdapterPipeline(base), "a star", output_type="np").images[0]
    for kw in ({"weights": [0.0]}, {"windows": ["0:0"]}):
        out = run(pipe, "a star", [img(64, 64)], output_type="np", **kw).images[0]
        assert np.abs(out - plain).max() < 1e-6
    full = run(pipe, "a star", [img(64, 64)], output_type="np", steps=4).images[0]
    half = run(pipe, "a star", [img(64, 64)], output_type="np", steps=4, windows=["0:0.5"]).images[0]
    late = run(pipe, "a star", [img(64, 64)], output_type="np", steps=4, windows=["0.5:1"]).images[0]
    assert np.abs(full - half).max() > 1e-3 and np.abs(half - late).max() > 1e-3
    assert Window(0, 0.5).active(1, 4) and not Window(0, 0.5).active(2, 4) and Window(0.5, 1).active(2, 4)


def test_features_computed_once_per_call(base):
    ad = adapter(base, 3, 4)
    calls = []
    ad.register_forward_hook(lambda *a: calls.append(1))
    steps = []
    run(AdapterPipeline(base, [ad]), "a", [img(64, 64)], steps=5, callback=lambda i, t, lat: steps.append(i))
    assert len(calls) == 1 and steps == [0, 1, 2, 3, 4]


def test_fresh_fuser_equals_weighted_sum(base):
    a, b = adapter(base, 1, 5), adapter(base, 3, 6)
    fuser = build_adapter(FuserConfig(unet_channels=tuple(a.config.channels), width=32, num_heads=4, num_layers=1))
    pipe = AdapterPipeline(base, {"sketch": a, "color": b}, fuser=fuser)
    conds = [img(64, 64, "L"), img(64, 64)]
    summed = run(pipe, "a", conds, weights=[0.7, 1.2], output_type="np").images[0]
    fused = run(pipe, "a", conds, weights=[0.7, 1.2], compose="fuser", output_type="np").images[0]
    assert np.abs(summed - fused).max() < 1e-5  # zero-initialised projections: the fuser starts as the sum
    with torch.no_grad():
        for p in pipe.fuser.spatial_ch_projs:  # the pipeline runs its own copy of the fuser
            p.bias.fill_(1.0)
    doubled = run(pipe, "a", conds, weights=[0.7, 1.2], compose="fuser", output_type="np").images[0]
    assert np.abs(doubled - fused).max() > 1e-3


def test_style_tokens_extend_context_and_pad_unconditional(base):
    style = build_adapter(StyleAdapterConfig(width=16, context_dim=32, num_heads=4, num_layers=1, num_tokens=3))
    seen = []
    pipe = AdapterPipeline(base, [style])
    orig = base.unet.forward

    def spy(sample, t, encoder_hidden_states=None, **kw):
        seen.append(encoder_hidden_states.clone())
        return orig(sample, t, encoder_hidden_states=encoder_hidden_states, **kw)

    base.unet.forward = spy
    try:
        run(pipe, "a", style_image=torch.randn(1, 5, 16), steps=1)
    finally:
        del base.unet.forward
    ctx = seen[0]
    assert ctx.shape[1] == 77 + 3
    assert torch.equal(ctx[0, 77:], ctx[0, 74:77])  # unconditional: its own last 3 tokens repeated


def test_errors_are_clear(base, tmp_path):
    ad = adapter(base, 1, 7)
    pipe = AdapterPipeline(base, [ad])
    with pytest.raises(ConditionError, match="2 condition images for 1 spatial adapters"):
        run(pipe, "a", [img(64, 64), img(64, 64)])
    with pytest.raises(ConfigError, match="2 weights for 1 adapters"):
        run(pipe, "a", [img(64, 64)], weights=[1, 2])
    with pytest.raises(ConfigError, match="window"):
        run(pipe, "a", [img(64, 64)], windows=["0.8:0.2"])
    with pytest.raises(ConditionError, match="channels"):
        run(pipe, "a", [torch.rand(2, 64, 64)])
    with pytest.raises(ConditionError, match="does not exist"):
        run(pipe, "a", [tmp_path / "nope.png"])
    with pytest.raises(ConfigError, match="unknown scheduler"):
        run(pipe, "a", [img(64, 64)], scheduler="bogus")
    with pytest.raises(ConfigError, match="needs a CoAdapter fuser"):
        run(pipe, "a", [img(64, 64)], compose="fuser")
    with pytest.raises(ConfigError, match="no style adapter"):
        run(pipe, "a", [img(64, 64)], style_image=img(64, 64))
    xl_adapter = build_adapter(FullAdapterConfig.sdxl(3, channels=(32, 32, 64, 64)))
    with pytest.raises(ConfigError, match=r"gives features \[32ch@1/16, 32ch@1/16, 64ch@1/32, 64ch@1/32\] .*takes \[32ch@1/8, "):
        AdapterPipeline(base, [xl_adapter])
    with pytest.raises(ConfigError, match="channels"):
        AdapterPipeline(base, [build_adapter(FullAdapterConfig.sd(3, channels=(8, 16, 32, 32)))])


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "dpm++2m", "unipc"])
def test_schedulers_by_name(base, name):
    out = run(AdapterPipeline(base, [adapter(base, 1, 8)]), "a", [img(64, 64, "L")], scheduler=name, output_type="np")
    assert np.isfinite(out.images[0]).all() and out.parameters["scheduler"] == name


def test_images_per_prompt_and_seed_reproducibility(base):
    pipe = AdapterPipeline(base, [adapter(base, 1, 9)])
    a = run(pipe, ["a", "b"], [img(64, 64)], num_images=2, output_type="np")
    assert len(a.images) == 4
    b = run(pipe, ["a", "b"], [img(64, 64)], num_images=2, output_type="np")
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))


def test_cli_generate_and_info(base, tmp_path, capsys):
    ad = adapter(base, 1, 10)
    ad.save_file(tmp_path / "sketch.safetensors")
    img(40, 40, "L").save(tmp_path / "cond.png")
    out = tmp_path / "out.png"
    args = ["generate", "--base", "tiny", "--adapter", str(tmp_path / "sketch.safetensors"), "--condition",
            str(tmp_path / "cond.png"), "--prompt", "a red star", "--steps", "2", "--seed", "3", "--size", "72x48",
            "--weight", "0.8", "--window", "0:0.5", "--out", str(out)]
    assert cli(args) == 0
    assert Image.open(out).size == (72, 48)
    capsys.readouterr()
    assert cli(["info", str(out), "--json"]) == 0
    params = json.loads(capsys.readouterr().out)
    assert params["seed"] == 3 and params["weights"] == [0.8] and params["windows"] == [[0.0, 0.5]]
    assert params["prompt"] == "a red star" and params["steps"] == 2
    # no silent overwrite; mismatched counts; bad size: exit 2, one line
    assert cli(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli(args[:-2] + ["--weight", "1", "--out", str(tmp_path / "o2.png")]) == 2
    assert "2 --weight for 1 adapters" in capsys.readouterr().err
    assert cli(["generate", "--base", "tiny", "--adapter", "x", "--prompt", "p", "--out", str(tmp_path / "o3.png")]) == 2
    assert cli(["info", str(tmp_path / "cond.png")]) == 2
    assert "no t2iadapter generation parameters" in capsys.readouterr().err
    from PIL.PngImagePlugin import PngInfo

    from t2iadapter.pngmeta import CHUNK

    for text in ("{not json", "{}", "[1, 2]", "7"):  # an edited or damaged chunk: one line, no traceback
        meta = PngInfo()
        meta.add_text(CHUNK, text)
        img(8, 8).save(tmp_path / "bad.png", pnginfo=meta)
        assert cli(["info", str(tmp_path / "bad.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "its t2iadapter chunk is not a JSON object" in err[0], (text, err)



def test_info_of_a_png_whose_chunk_nests_too_deep_is_one_line(tmp_path, capsys):
    """JSON nested past Python's recursion limit (a crafted chunk) is a damaged chunk too, not a RecursionError."""
    from PIL.PngImagePlugin import PngInfo

    from t2iadapter.pngmeta import CHUNK

    meta = PngInfo()
    meta.add_text(CHUNK, "[" * 100_000 + "]" * 100_000)
    img(8, 8).save(tmp_path / "deep.png", pnginfo=meta)
    assert cli(["info", str(tmp_path / "deep.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its t2iadapter chunk is not a JSON object" in err[0], err

def test_cli_export_base_writes_a_loadable_folder(tmp_path, capsys):
    from t2iadapter.bases import load_base as load

    assert cli(["export-base", "tiny", str(tmp_path / "sd")]) == 0
    base = load(tmp_path / "sd")
    assert not base.is_sdxl and list(base.unet.config.block_out_channels) == [32, 32, 64, 64]
    assert cli(["export-base", "tiny", str(tmp_path / "sd")]) == 2  # not empty: no silent overwrite
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("kw, error, match", [
    (dict(conditions=[torch.rand(1, 64, 64) * 255]), ConditionError, "in \\[0, 1\\]"),
    (dict(conditions=[torch.full((1, 64, 64), float("nan"))]), ConditionError, "NaN"),
    (dict(conditions=[-torch.rand(1, 64, 64)]), ConditionError, "in \\[0, 1\\]"),
    (dict(init_image=torch.rand(3, 64, 64) * 2 - 1), ConditionError, "init_image values go down to .*x / 2 \\+ 0.5"),
    (dict(conditions=[Image.new("L", (0, 0))]), ConditionError, "empty"),
    (dict(conditions=[torch.rand(1, 0, 0)]), ConditionError, "empty"),
    (dict(init_image=torch.rand(2, 3, 64, 64)), ConditionError, "\\[1, C, H, W\\]"),
    (dict(init_image=torch.rand(3, 64, 64), mask_image=torch.rand(1, 64, 64) * 255), ConditionError,
     "mask_image values"),
    (dict(seed=None, latents=np.zeros((1, 4, 8, 8))), ConfigError, "float torch tensor"),
    (dict(latents=torch.full((1, 4, 8, 8), float("nan"))), ConfigError, "NaN"),
    (dict(generator=torch.Generator().manual_seed(1)), ConfigError, "seed or generator"),
    (dict(scheduler="euler", eta=0.5), ConfigError, "eta=0.5 has no effect"),
    (dict(clip_skip=100), ConfigError, "clip_skip 100"),
    (dict(prompt_2="b"), ConfigError, "prompt_2 is for SDXL"),
    (dict(original_size=(64, 64)), ConfigError, "original_size is for SDXL"),
    (dict(callback=5), ConfigError, "callback must be a function"),
    (dict(callback=lambda: None), ConfigError, "cannot be called as callback"),
    (dict(weights=[1.0], adapter_conditioning_scale=[0.5]), ConfigError, "not both"),
    (dict(prompt=3), ConfigError, "prompt must be a string"),
])
def test_call_mistakes_are_one_clear_error(base, kw, error, match):
    """API sweep: each was a deep torch/diffusers error or a silent wrong result (ignored, taken as true, NaN image)."""
    pipe = AdapterPipeline(base, [adapter(base, 1, 7)])
    kw = {"prompt": "a", "conditions": [img(64, 64)], "steps": 2, "seed": 0, "progress": False, **kw}
    with pytest.raises(error, match=match):
        pipe(kw.pop("prompt"), kw.pop("conditions"), **kw)


def test_api_mistakes_outside_the_call_are_one_clear_error(base):
    pipe = AdapterPipeline(base)
    emb = torch.randn(1, 77, 7)
    with pytest.raises(ConfigError, match="7 wide"):
        pipe(prompt_embeds=emb, steps=1, progress=False)
    with pytest.raises(ConfigError, match="pooled_prompt_embeds are for SDXL"):
        pipe(prompt_embeds=torch.randn(1, 77, 32), pooled_prompt_embeds=torch.randn(1, 32), steps=1, progress=False)
    with pytest.raises(ConfigError, match="expected a GenerationRequest"):
        pipe.generate({"prompt": "a"})
    with pytest.raises(ConfigError, match="expected a GenerationRequest"):
        pipe.generate_batch(["a"])
    with pytest.raises(ConfigError, match="output_type"):
        pipe.generate_batch([pipe.request("a", steps=1, seed=0)] * 2, output_type="PIL")
    out = pipe.generate_batch([pipe.request("a", steps=1, seed=0)] * 2, output_type="latent")
    assert out[0].images[0].shape == (4, 8, 8)  # latents, not silently decoded images
    for call, match in [(lambda: pipe.to("gpu"), "unknown device"), (lambda: pipe.to(dtype="fp16"), "torch dtype"),
                        (lambda: pipe.enable_model_cpu_offload("gpu"), "unknown device"),
                        (lambda: pipe.warm_up([64]), "pairs"),
                        (lambda: pipe.optimize(mode="fastest", compile=False), "compile mode")]:
        with pytest.raises(ConfigError, match=match):
            call()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is available here; run on the CPU instead .device 'cpu'"):
            pipe.to("cuda")
    assert pipe.device.type == "cpu" and not pipe.fast


def test_a_tensor_condition_is_scanned_once_a_call(base, monkeypatch):
    """Checking a tensor's range reads all of it (and on a GPU waits for it): once per condition, not per helper."""
    from t2iadapter.generation import conditions

    pipe = AdapterPipeline(base, [adapter(base, 1, 7)])
    scans = []
    real = torch.aminmax
    monkeypatch.setattr(conditions.torch, "aminmax", lambda x: scans.append(x.shape) or real(x))
    pipe("a", [torch.rand(1, 64, 64)], steps=1, seed=0, progress=False)
    assert scans == [(1, 64, 64)]


def test_moving_the_pipeline_leaves_out_diffusers_fp32_advice_for_models_without_fp32_modules(base):
    """diffusers 0.42 warns "There are modules ... kept in float32: []" on any dtype argument, even None."""
    import logging

    pipe = AdapterPipeline(base, [adapter(base, 1, 7)])
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    from diffusers.utils import logging as diffusers_logging

    diffusers_log = logging.getLogger("diffusers")  # diffusers' loggers do not propagate: listen at its root
    diffusers_log.addHandler(handler)
    verbosity = diffusers_logging.get_verbosity()  # a CLI test in this process may have quietened diffusers
    diffusers_logging.set_verbosity_warning()
    try:
        pipe.to(dtype=torch.float64)
        pipe.to(device="cpu", dtype=torch.float32)
        base.unet.to(dtype=torch.float32)  # diffusers' own `to` still says it (the listener hears it)
    finally:
        diffusers_logging.set_verbosity(verbosity)
        diffusers_log.removeHandler(handler)
    assert sum("kept in float32" in m for m in seen) == 1
    assert {m.dtype for m in pipe.base.modules.values()} == {torch.float32}


def test_more_steps_than_the_scheduler_takes_is_one_line(tmp_path, capsys):
    """DDIM's leading spacing with steps_offset 1 at 1000 steps indexes timestep 1000: an IndexError traceback in
    the CLI, a 500 from the server, a whole --batch run stopped."""
    from t2iadapter.cli import main

    pipe = AdapterPipeline(load_base("tiny"))
    with pytest.raises(ConfigError, match="1000 steps are more than this scheduler can take"):
        pipe("x", steps=1000, size=(64, 64), progress=False)
    capsys.readouterr()  # (library import notices of the call above)
    assert main(["generate", "--base", "tiny", "--prompt", "x", "--steps", "1000", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "more than this scheduler can take" in err and not (tmp_path / "x.png").exists()


def test_step_counts_a_scheduler_cannot_run_are_one_line(tmp_path, capsys):
    # LCM/TCD take at most their original 50 steps (diffusers' ValueError was a traceback); DPM++ 2M with "leading"
    # spacing (SD1.5's config) at 1000 steps repeats timestep 0 and gave an all-NaN, black image without a word
    from diffusers import DPMSolverMultistepScheduler

    from t2iadapter.cli import main

    base = load_base("tiny")
    pipe = AdapterPipeline(base)
    leading = DPMSolverMultistepScheduler.from_config(base.scheduler.config, timestep_spacing="leading")
    with pytest.raises(ConfigError, match="1000 steps are more than DPMSolverMultistepScheduler can space"):
        pipe("x", steps=1000, size=(64, 64), scheduler=leading, progress=False)
    image = pipe("x", steps=300, size=(64, 64), scheduler=leading, seed=0, output_type="np", progress=False).images[0]
    assert np.isfinite(image).all()
    capsys.readouterr()
    assert main(["generate", "--base", "tiny", "--prompt", "x", "--steps", "60", "--scheduler", "lcm", "--guidance", "1",
                 "--size", "64x64", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "60 steps: LCMScheduler refuses them" in err and not (tmp_path / "x.png").exists()
