"""The eager loop (issue 18, item 3): diffusers' numbers, and no per-step work beyond diffusers' own.

Profiled on the CPU with the UNet stubbed out (so only the loop's own operations remain), ours did one tensor
concatenation a step more than diffusers' StableDiffusionAdapterPipeline (the guidance context, now made once per
call) and diffusers four clones a step more (the adapter features); the rest is the scheduler, identical in both.
"""
import collections
import copy

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionAdapterPipeline
from torch.overrides import TorchFunctionMode

from t2iadapter.bases import load_base
from t2iadapter.pipeline import AdapterPipeline
from tiny_models import PROMPT, as_diffusers, condition, random_adapter



@pytest.fixture(scope="module")
def euler_base():
    base = load_base("tiny")
    base.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)  # the benchmark's scheduler
    return base


def diffusers_adapter_pipeline(base, adapter):
    pipe = StableDiffusionAdapterPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                          unet=base.unet, scheduler=base.scheduler, adapter=as_diffusers(adapter),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def uncached_context(self, style_tokens):
    """`Prompts.context` as it was before issue 18: concatenated at every call."""
    from t2iadapter import unet_hook

    cond = unet_hook.extend_context(self.text.context, style_tokens, unconditional=False)
    if self.negative is None:
        return cond
    return torch.cat([unet_hook.extend_context(self.negative.context, style_tokens, unconditional=True), cond])


@pytest.mark.usefixtures("one_thread")
def test_eager_output_is_bitwise_what_it_was(euler_base, monkeypatch):
    from t2iadapter.generation.text import Prompts

    adapter, cond = random_adapter(euler_base, 3, 1), condition(64, "RGB", 3)
    pipe = AdapterPipeline(euler_base, [adapter])
    run = lambda: pipe(PROMPT, [cond], steps=4, seed=3, size=(64, 64), output_type="latent",  # noqa: E731
                       progress=False).images[0]
    now = run()
    monkeypatch.setattr(Prompts, "context", uncached_context)
    assert torch.equal(now, run())


@pytest.mark.usefixtures("one_thread")
def test_eager_equals_diffusers(euler_base):
    """Without adapters bitwise; with one, images within 2e-6 (the adapters' own arithmetic differs in the last bits)."""
    plain = euler_base.diffusers_pipeline()
    plain.set_progress_bar_config(disable=True)
    ours = AdapterPipeline(euler_base)(PROMPT, steps=6, seed=3, size=(64, 64), output_type="latent",
                                       progress=False).images[0]
    ref = plain(PROMPT, num_inference_steps=6, height=64, width=64, generator=torch.Generator().manual_seed(3),
                output_type="latent").images[0]
    assert torch.equal(ours, ref)
    adapter, cond = random_adapter(euler_base, 3, 1), condition(64, "RGB", 3)
    ours = AdapterPipeline(euler_base, [adapter])(PROMPT, [cond], steps=6, seed=3, size=(64, 64), output_type="np",
                                                  progress=False).images[0]
    ref = diffusers_adapter_pipeline(euler_base, adapter)(PROMPT, image=cond, num_inference_steps=6, height=64, width=64,
                                                          generator=torch.Generator().manual_seed(3),
                                                          output_type="np").images[0]
    assert np.abs(ours - ref).max() <= 2e-6


class Calls(TorchFunctionMode):
    """Counts torch function calls by name."""

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


def test_loop_does_no_per_step_work_beyond_diffusers(euler_base, monkeypatch):
    adapter, cond = random_adapter(euler_base, 3, 1), condition(64, "RGB", 3)
    ours_pipe = AdapterPipeline(euler_base, [adapter])
    theirs_pipe = diffusers_adapter_pipeline(euler_base, adapter)
    out = torch.randn(2, 4, 8, 8)
    monkeypatch.setattr(euler_base.unet, "forward", lambda *a, **k: (out,))  # the loop's own work only

    def per_step(run):
        counts = []
        for steps in (4, 8):
            calls = Calls()
            with calls:
                run(steps)
            counts.append(calls.count)
        return {k: (counts[1][k] - counts[0][k]) / 4 for k in counts[1]}

    ours = per_step(lambda n: ours_pipe(PROMPT, [cond], steps=n, seed=0, size=(64, 64), output_type="latent",
                                        progress=False))
    theirs = per_step(lambda n: theirs_pipe(PROMPT, image=cond, num_inference_steps=n, height=64, width=64,
                                            generator=torch.Generator().manual_seed(0), output_type="latent"))
    assert ours["cat"] == 1  # the latents doubled for guidance; the text context is made once per call
    assert ours.get("clone", 0) == 0 and theirs["clone"] == 4  # diffusers clones the four features every step
    assert sum(ours.values()) < sum(theirs.values())


def test_guidance_context_is_made_once_and_equals_the_concatenation():
    from t2iadapter.bases import TextContext
    from t2iadapter.generation.text import Prompts

    cond, neg = TextContext(torch.randn(1, 77, 8)), TextContext(torch.randn(1, 77, 8))
    prompts = Prompts(cond, neg)
    first = prompts.context(None)
    assert prompts.context(None) is first and torch.equal(first, torch.cat([neg.context, cond.context]))
    tokens = torch.randn(1, 4, 8)
    styled = prompts.context(tokens)
    assert styled.shape == (2, 81, 8) and prompts.context(tokens) is styled
    assert torch.equal(styled[0, 77:], neg.context[0, -4:]) and torch.equal(styled[1, 77:], tokens[0])


def test_placement_answers_what_diffusers_answers():
    """`bases.placement` (the first floating-point weight) against diffusers' own `model.device`/`model.dtype`,
    including the models where it must defer to them: layerwise casting (float8 storage, another compute dtype)."""
    from t2iadapter.bases import placement

    base = load_base("tiny")
    for model in (base.unet, base.vae, copy.deepcopy(base.unet).to(torch.float16)):
        assert placement(model) == (model.device, model.dtype)
    cast = copy.deepcopy(base.unet)
    cast.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert cast.dtype == torch.bfloat16 and placement(cast) == (cast.device, torch.bfloat16)


def test_a_generation_never_asks_diffusers_for_the_unets_device_or_dtype(euler_base, monkeypatch):
    """diffusers' `model.dtype`/`.device` walk every submodule (1.9 ms a query on an SD1.5 UNet, 5.8 on SDXL's on
    this CPU); our loop asked 9 times a call eagerly and 12 in fast mode (4 of them once per step)."""
    from diffusers.models.modeling_utils import ModelMixin

    asked = collections.Counter()
    for name in ("device", "dtype"):
        prop = getattr(ModelMixin, name)
        monkeypatch.setattr(ModelMixin, name, property(lambda self, _p=prop, _n=name: asked.update([_n]) or _p.fget(self)))
    adapter, cond = random_adapter(euler_base, 3, 1), condition(64, "RGB", 3)
    kwargs = dict(steps=4, size=(64, 64), seed=0, output_type="np", progress=False)
    eager = AdapterPipeline(euler_base, [adapter])(PROMPT, [cond], **kwargs).images[0]
    fast = AdapterPipeline(euler_base, [copy.deepcopy(adapter)])
    fast.optimize(compile=False, dtype=torch.float32)
    assert asked == {}
    assert np.abs(fast(PROMPT, [cond], **kwargs).images[0] - eager).max() < 1e-5 and asked == {}
