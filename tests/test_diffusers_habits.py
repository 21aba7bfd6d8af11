"""What a diffusers user types (issue 14, items 12 and 13): accepted as diffusers accepts it, or one clear error.

Where diffusers' adapter pipelines have the same option, the image equals theirs within 1e-4 (tiny components).
"""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionAdapterPipeline, StableDiffusionXLAdapterPipeline

from t2iadapter.bases import load_base
from t2iadapter.errors import ConfigError, T2IAdapterError
from t2iadapter.pipeline import AdapterPipeline
from tiny_models import PROMPT, as_diffusers, condition, random_adapter

FAST = dict(steps=2, size=64, progress=False, output_type="np")


@pytest.fixture(scope="module")
def sd(sd_base):
    """(our pipeline, diffusers' pipeline) over the same tiny base and one sketch adapter."""
    ad = random_adapter(sd_base, 1, 1)
    ref = StableDiffusionAdapterPipeline(vae=sd_base.vae, text_encoder=sd_base.text_encoder, tokenizer=sd_base.tokenizer,
                                         unet=sd_base.unet, adapter=as_diffusers(ad), scheduler=sd_base.scheduler,
                                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return AdapterPipeline(sd_base, [ad]), ref


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ item 12: accepted, or one clear error

def test_what_diffusers_users_type_is_accepted(sd, tmp_path):
    pipe, _ = sd
    cond = condition(64, "L", 0)
    path = tmp_path / "c.png"
    cond.save(path)
    a = pipe(PROMPT, cond, seed=3, **FAST).images[0]
    assert np.array_equal(pipe(PROMPT, path, seed=3, **FAST).images[0], a)  # a Path
    assert pipe(PROMPT, cond, seed=3, windows=(0.0, 0.5), **FAST).parameters["windows"] == [[0.0, 0.5]]  # one pair
    assert pipe(PROMPT, cond, seed=3, **FAST).parameters["size"] == [64, 64]  # size=64 is a square
    euler = EulerDiscreteScheduler.from_config(pipe.base.scheduler.config)
    r = pipe(PROMPT, cond, seed=3, scheduler=euler, **FAST)
    assert r.parameters["scheduler"] == "EulerDiscreteScheduler"
    assert np.array_equal(r.images[0], pipe(PROMPT, cond, seed=3, scheduler="euler", **FAST).images[0])
    # diffusers' keyword names
    b = pipe(PROMPT, image=cond, num_inference_steps=2, height=64, width=64, generator=gen(3), progress=False,
             output_type="np").images[0]
    assert np.array_equal(a, b)


def test_one_adapter_string_a_diffusers_adapter_and_to_dtype(sd_base):
    ad = random_adapter(sd_base, 1, 5)
    ours = AdapterPipeline(sd_base, [ad])
    theirs = AdapterPipeline(sd_base, as_diffusers(ad))  # a diffusers T2IAdapter, and one adapter, not a list
    assert list(theirs.adapters) == ["full0"]
    cond = condition(64, "L", 1)
    assert np.abs(ours(PROMPT, cond, seed=1, **FAST).images[0] - theirs(PROMPT, cond, seed=1, **FAST).images[0]).max() < 1e-6
    base = load_base("tiny")
    pipe = AdapterPipeline(base, [ad]).to(torch.float64)  # a dtype as the positional argument, as diffusers
    assert pipe.dtype == torch.float64 and all(p.dtype == torch.float64 for p in pipe.adapters["full0"].parameters())
    with pytest.raises(ConfigError, match="device"):
        pipe.to(3.5)


def test_one_adapter_path_string_is_one_adapter(tmp_path, sd_base):
    ad = random_adapter(sd_base, 1, 2)
    ad.save_file(tmp_path / "sketch.safetensors")
    pipe = AdapterPipeline(sd_base, str(tmp_path / "sketch.safetensors"))  # not iterated as characters
    assert list(pipe.adapters) == ["sketch"]


@pytest.mark.parametrize("call, match", [
    (dict(output_type="latents"), "output_type"),
    (dict(output_type="PIL.Image"), "output_type"),
    (dict(generator=[gen(0), gen(1)]), "generators for 1 images"),
    (dict(generator=0), "generator"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), "latents must have shape"),
    (dict(num_inference_steps=2, steps=2), "not both"),
    (dict(height=64), "height= and width="),
    (dict(adapter_conditioning_factor=0.5), "unknown option"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(size="big"), "size"),
])
def test_what_diffusers_users_get_wrong_is_one_clear_error(sd, call, match):
    pipe, _ = sd
    kwargs = {"steps": 2, "progress": False, **({} if "height" in call else {"size": 64}), **call}
    with pytest.raises(T2IAdapterError, match=match):
        pipe(PROMPT, condition(64, "L", 0), **kwargs)


# ------------------------------------------------------------------ item 13: the same images as diffusers

def test_latents_generator_lists_and_latent_output_match_diffusers(sd):
    pipe, ref = sd
    cond = condition(64, "L", 0)
    noise = torch.randn(2, 4, 8, 8, generator=gen(9))
    ours = pipe(PROMPT, cond, steps=3, size=64, num_images=2, latents=noise, output_type="np", progress=False).images
    theirs = ref(PROMPT, image=cond, num_inference_steps=3, height=64, width=64, num_images_per_prompt=2, latents=noise,
                 output_type="np").images
    assert np.abs(np.stack(ours) - theirs).max() <= 1e-4
    gens = [gen(1), gen(2)]
    ours = pipe(PROMPT, cond, steps=3, size=64, num_images=2, generator=gens, output_type="np", progress=False).images
    theirs = ref(PROMPT, image=cond, num_inference_steps=3, height=64, width=64, num_images_per_prompt=2,
                 generator=[gen(1), gen(2)], output_type="np").images
    assert np.abs(np.stack(ours) - theirs).max() <= 1e-4
    lat = pipe(PROMPT, cond, steps=3, size=64, seed=4, output_type="latent", progress=False).images
    ref_lat = ref(PROMPT, image=cond, num_inference_steps=3, height=64, width=64, generator=gen(4), output_type="latent").images
    assert lat[0].shape == (4, 8, 8) and torch.allclose(torch.stack(lat), ref_lat, atol=1e-4)


def test_prompt_embeds_and_clip_skip_match_diffusers(sd, monkeypatch):
    pipe, ref = sd
    cond = condition(64, "L", 0)
    pos, neg = ref.encode_prompt(PROMPT, "cpu", 1, True, "blurry")
    ours = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, conditions=cond, steps=3, size=64, seed=2,
                output_type="np", progress=False).images[0]
    theirs = ref(image=cond, prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=3, height=64, width=64,
                 generator=gen(2), output_type="np").images[0]
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.abs(ours - pipe(PROMPT, cond, negative_prompt="blurry", steps=3, size=64, seed=2, output_type="np",
                              progress=False).images[0]).max() <= 1e-5
    # diffusers reaches `text_encoder.text_model.final_layer_norm`; transformers 5's CLIPTextModel is flat
    from transformers import CLIPTextModel

    if not hasattr(pipe.base.text_encoder, "text_model"):
        monkeypatch.setattr(CLIPTextModel, "text_model", property(lambda self: self), raising=False)
    ours = pipe(PROMPT, cond, clip_skip=1, steps=3, size=64, seed=2, output_type="np", progress=False).images[0]
    theirs = ref(PROMPT, image=cond, clip_skip=1, num_inference_steps=3, height=64, width=64, generator=gen(2),
                 output_type="np").images[0]
    plain = pipe(PROMPT, cond, steps=3, size=64, seed=2, output_type="np", progress=False).images[0]
    assert np.abs(ours - theirs).max() <= 1e-4 and np.abs(ours - plain).max() > 1e-4


def test_per_prompt_conditions_match_diffusers(sd):
    pipe, ref = sd
    prompts = [PROMPT, "a small green square"]
    conds = [condition(64, "L", 0), condition(64, "L", 1)]
    ours = pipe(prompts, conds, steps=3, size=64, seed=5, output_type="np", progress=False).images
    theirs = ref(prompts, image=conds, num_inference_steps=3, height=64, width=64, generator=gen(5), output_type="np").images
    assert np.abs(np.stack(ours) - theirs).max() <= 1e-4
    by_name = pipe(prompts, {"full0": conds}, steps=3, size=64, seed=5, output_type="np", progress=False).images
    assert np.array_equal(np.stack(by_name), np.stack(ours))
    # each prompt's own condition: the first image equals a single call with the first condition only where
    # the batch noise agrees, so compare against swapping the conditions instead
    swapped = pipe(prompts, conds[::-1], steps=3, size=64, seed=5, output_type="np", progress=False).images
    assert np.abs(swapped[0] - ours[0]).max() > 1e-3
    with pytest.raises(ConfigError, match="one per prompt"):
        pipe(prompts, {"full0": conds + conds[:1]}, steps=2, size=64, progress=False)


def test_sdxl_prompt_2_and_original_size_match_diffusers(xl_base):
    ad = random_adapter(xl_base, 3, 4)
    cond = condition(128, "RGB", 3)
    pipe = AdapterPipeline(xl_base, [ad])
    ref = StableDiffusionXLAdapterPipeline(vae=xl_base.vae, text_encoder=xl_base.text_encoder,
                                           text_encoder_2=xl_base.text_encoder_2, tokenizer=xl_base.tokenizer,
                                           tokenizer_2=xl_base.tokenizer_2, unet=xl_base.unet, adapter=as_diffusers(ad),
                                           scheduler=xl_base.scheduler)
    ref.set_progress_bar_config(disable=True)
    common = dict(guidance_scale=5.0, output_type="np")
    ours = pipe(PROMPT, cond, steps=3, seed=1, size=128, prompt_2="a small blue circle", original_size=(256, 192),
                negative_prompt="blurry", negative_prompt_2="dark", progress=False, **common).images[0]
    theirs = ref(PROMPT, image=cond, prompt_2="a small blue circle", original_size=(192, 256), negative_prompt="blurry",
                 negative_prompt_2="dark", num_inference_steps=3, height=128, width=128, generator=gen(1), **common).images[0]
    plain = pipe(PROMPT, cond, steps=3, seed=1, size=128, negative_prompt="blurry", progress=False, **common).images[0]
    assert np.abs(ours - theirs).max() <= 1e-4 and np.abs(ours - plain).max() > 1e-4


def test_unknown_words_of_a_word_list_base_are_one_warning(sd, caplog, monkeypatch):
    """Issue 14 item 15: the demo and tiny bases know a word list; other words are noise, and we say so once."""
    pipe, _ = sd
    monkeypatch.setattr(pipe.base, "source", "a-word-list-base")  # the tiny presets are random models: no warning
    with caplog.at_level("WARNING", logger="t2iadapter.generation.pipeline"):
        pipe("a red zebra on a skateboard", condition(64, "L", 0), steps=1, size=64, progress=False)
    warned = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(warned) == 1 and "zebra" in warned[0] and "skateboard" in warned[0] and " red" not in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="t2iadapter.generation.pipeline"):
        pipe(PROMPT, condition(64, "L", 0), steps=1, size=64, progress=False)
    assert not [r for r in caplog.records if "does not know" in r.getMessage()]


def test_model_cpu_offload_moves_each_model_only_while_it_runs(sd_base, monkeypatch):
    """Issue 14 item 13: one stage's models on the execution device at a time, all on the CPU between calls."""
    ad = random_adapter(sd_base, 1, 8)
    cond = condition(64, "L", 0)
    want = AdapterPipeline(sd_base, [ad])(PROMPT, cond, seed=1, **FAST).images[0]
    pipe = AdapterPipeline(sd_base, [ad]).enable_model_cpu_offload("cpu")  # the schedule, observed on a CPU
    names = {id(m): n for n, m in [*pipe.base.modules.items(), *pipe.adapters.items()]}
    moves: list[tuple[str, str]] = []
    real_to = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        if id(self) in names:
            moves.append((names[id(self)], str(args[0] if args else kwargs.get("device"))))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    got = pipe(PROMPT, cond, seed=1, **FAST).images[0]
    monkeypatch.undo()
    assert np.abs(got - want).max() <= 1e-6
    assert moves == [("full0", "cpu")] * 2 + [("text_encoder", "cpu")] * 2 + [("unet", "cpu")] * 2 + [("vae", "cpu")] * 2
    assert pipe.device == torch.device("cpu")
    with pytest.raises(ConfigError, match="offload"):
        AdapterPipeline(load_base("tiny"), [ad]).optimize(compile=False).enable_model_cpu_offload("cpu")


def test_model_cpu_offload_encodes_an_init_image_on_the_execution_device(sd_base, monkeypatch):
    """img2img's VAE encode runs as the loop starts; the VAE was on the execution device only around the request's
    preparation, so on a GPU the encode ran on the CPU."""
    from t2iadapter.generation import latents

    image = condition(64, "RGB", 2)
    want = AdapterPipeline(sd_base)(PROMPT, init_image=image, strength=0.5, seed=1, **FAST).images[0]
    pipe = AdapterPipeline(sd_base).enable_model_cpu_offload("cpu")
    events: list[str] = []
    real_to, real_encode = torch.nn.Module.to, latents.encode

    def spy(self, *args, **kwargs):
        if self is sd_base.vae:
            events.append("vae moved")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    monkeypatch.setattr(latents, "encode", lambda *a, **k: events.append("encode") or real_encode(*a, **k))
    got = pipe(PROMPT, init_image=image, strength=0.5, seed=1, **FAST).images[0]
    monkeypatch.undo()
    assert np.abs(got - want).max() <= 1e-6
    at = events.index("encode")
    assert events[:at].count("vae moved") % 2 == 1, events  # moved in (to the execution device), not yet out
