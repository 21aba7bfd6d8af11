"""img2img and inpainting (issue 15): parity with diffusers' own pipelines, adapters as in text-to-image, kept pixels."""
import dataclasses

import numpy as np
import pytest
import torch
from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionXLImg2ImgPipeline,
                       StableDiffusionXLInpaintPipeline, UNet2DConditionModel)
from PIL import Image

from t2iadapter.bases import load_base
from t2iadapter.errors import ConditionError, ConfigError
from t2iadapter.generation.request import GenerationRequest
from t2iadapter.pipeline import AdapterPipeline
from tiny_models import PROMPT, condition, random_adapter


def inpaint_unet_base(base):
    """The base with a seeded 9-channel inpainting UNet of the same layout (sd-1.5-inpainting / SDXL inpainting)."""
    torch.manual_seed(11)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9}).eval()
    return dataclasses.replace(base, unet=unet)


def photo(size, seed):
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, size)
    arr = np.stack([np.add.outer(x, x) / 2, np.add.outer(x, x[::-1]) / 2, np.full((size, size), 128.0)], -1)
    return Image.fromarray((arr * 0.6 + rng.integers(0, 100, (size, size, 3))).clip(0, 255).astype(np.uint8))


def mask_of(size):
    arr = np.zeros((size, size), np.uint8)
    arr[size // 4: 3 * size // 4, size // 8: size // 2] = 255  # white = repaint
    return Image.fromarray(arr, "L")


def sd_kwargs(base):
    return dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                scheduler=base.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def xl_kwargs(base):
    return dict(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
                tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=base.scheduler)


def ours(base, size, **options):
    return AdapterPipeline(base)(PROMPT, steps=4, seed=3, output_type="np", progress=False, **options).images[0]


def theirs(pipe, **options):
    return pipe(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="np",
                **options).images[0]


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_sd_img2img_matches_diffusers(sd_base, strength):
    image = photo(64, 0)
    a = ours(sd_base, 64, init_image=image, strength=strength)
    b = theirs(StableDiffusionImg2ImgPipeline(**sd_kwargs(sd_base)), image=image, strength=strength)
    assert a.shape == (64, 64, 3)
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("strength,scheduler", [(1.0, None), (0.75, None), (0.75, "euler_a")])
def test_sd_inpaint_matches_diffusers(sd_base, strength, scheduler):
    image, mask = photo(64, 1), mask_of(64)
    pipe = StableDiffusionInpaintPipeline(**sd_kwargs(sd_base))
    if scheduler:
        from diffusers import EulerAncestralDiscreteScheduler
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(sd_base.scheduler.config)
    a = ours(sd_base, 64, init_image=image, mask_image=mask, strength=strength, scheduler=scheduler)
    b = theirs(pipe, image=image, mask_image=mask, strength=strength, height=64, width=64)
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_sd_inpainting_unet_matches_diffusers(sd_base, strength):
    base = inpaint_unet_base(sd_base)
    image, mask = photo(64, 2), mask_of(64)
    a = ours(base, 64, init_image=image, mask_image=mask, strength=strength)
    b = theirs(StableDiffusionInpaintPipeline(**sd_kwargs(base)), image=image, mask_image=mask, strength=strength,
               height=64, width=64)
    assert np.abs(a - b).max() <= 1e-4


def test_sdxl_img2img_and_inpaint_match_diffusers(xl_base):
    image, mask = photo(128, 3), mask_of(128)
    a = ours(xl_base, 128, init_image=image, strength=0.6, guidance_scale=5.0)
    b = theirs(StableDiffusionXLImg2ImgPipeline(**xl_kwargs(xl_base)), image=image, strength=0.6, guidance_scale=5.0)
    assert np.abs(a - b).max() <= 1e-4
    a = ours(xl_base, 128, init_image=image, mask_image=mask, strength=0.8, guidance_scale=5.0)
    b = theirs(StableDiffusionXLInpaintPipeline(**xl_kwargs(xl_base)), image=image, mask_image=mask, strength=0.8,
               guidance_scale=5.0, height=128, width=128)
    assert np.abs(a - b).max() <= 1e-4


def test_sdxl_inpainting_unet_matches_diffusers(xl_base):
    base = inpaint_unet_base(xl_base)
    image, mask = photo(128, 4), mask_of(128)
    a = ours(base, 128, init_image=image, mask_image=mask, strength=1.0, guidance_scale=5.0)
    b = theirs(StableDiffusionXLInpaintPipeline(**xl_kwargs(base)), image=image, mask_image=mask, strength=1.0,
               guidance_scale=5.0, height=128, width=128)
    assert np.abs(a - b).max() <= 1e-4


def test_adapter_features_reach_the_unet_as_in_text_to_image(sd_base):
    """img2img with an adapter: each UNet call gets exactly weight·adapter(condition) (both CFG halves), windows over
    the steps actually run; one call's output equals a hand-made UNet call with those residuals."""
    from t2iadapter.generation.conditions import prepare_condition

    module = random_adapter(sd_base, 1, 8)
    cond = condition(64, "L", 8)
    calls = []

    def pre(_, args, kwargs):
        res = kwargs.get("down_intrablock_additional_residuals")
        calls.append((args[0].clone(), args[1], kwargs["encoder_hidden_states"].clone(),
                      None if res is None else [r.clone() for r in res]))

    def post(_, args, kwargs, out):
        calls[-1] += (out[0].clone() if isinstance(out, tuple) else out.sample.clone(),)

    handles = [sd_base.unet.register_forward_pre_hook(pre, with_kwargs=True),
               sd_base.unet.register_forward_hook(post, with_kwargs=True)]
    try:
        AdapterPipeline(sd_base, [module])(PROMPT, [cond], init_image=photo(64, 8), strength=0.5, steps=8, seed=1,
                                           weights=[0.7], windows=[(0, 0.5)], progress=False)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 4  # int(8·0.5) steps run; the window (0, 0.5) holds the first 2 of them
    assert [c[3] is not None for c in calls] == [True, True, False, False]
    with torch.no_grad():
        ref = [0.7 * f for f in module(prepare_condition(cond, 1, (64, 64), (64, 64)))]
        sample, t, context, got, out = calls[0]
        for r, g in zip(ref, got):
            assert torch.allclose(torch.cat([r, r]), g, atol=1e-6)
        again = sd_base.unet(sample, t, encoder_hidden_states=context,
                             down_intrablock_additional_residuals=[torch.cat([r, r]) for r in ref]).sample
    assert torch.allclose(again, out, atol=1e-5)


def test_inpainting_keeps_the_unmasked_pixels():
    """Demo base, 256²: away from the mask's edge (16 px) the kept region differs from the image by the VAE's
    round trip only (mean ≈ 0.008 measured, bound 0.02); with paste_back every kept pixel is the image's (8-bit)."""
    from t2iadapter.demo import world

    scene = world.generate(3, 256)
    pipe = AdapterPipeline.from_pretrained("demo")
    mask = np.zeros((256, 256), np.uint8)
    mask[64:192, 64:160] = 255
    keep = np.ones((256, 256), bool)
    keep[48:208, 48:176] = False
    image = scene.image.astype(np.float32) / 255
    for paste_back, bound in ((False, 0.02), (True, 1e-6)):
        out = pipe(scene.caption, init_image=scene.image, mask_image=mask, steps=6, seed=0, paste_back=paste_back,
                   output_type="np", progress=False).images[0]
        assert np.abs(out - image)[keep].mean() <= bound
        assert np.abs(out - image)[mask > 0].mean() > 0.02  # the masked region is repainted
    saved = (out * 255).round().astype(np.uint8)  # as the PNG holds it
    assert (saved == scene.image)[mask == 0].all()  # paste_back: every kept pixel exactly


@pytest.mark.parametrize("options,error,match", [
    ({"strength": 0.5}, ConfigError, "strength needs init_image"),
    ({"init_image": "x.png", "strength": 0.0}, ConfigError, r"strength must be in \(0, 1\]"),
    ({"init_image": "x.png", "strength": 1.5}, ConfigError, r"strength must be in \(0, 1\]"),
    ({"init_image": "x.png", "strength": 0.1, "steps": 5}, ConfigError, "runs no step"),
    ({"mask_image": "m.png"}, ConfigError, "mask_image needs init_image"),
    ({"init_image": "x.png", "paste_back": True}, ConfigError, "paste_back needs mask_image"),
])
def test_bad_request_combinations(options, error, match):
    with pytest.raises(error, match=match):
        GenerationRequest("a", **options)


def test_bad_image_combinations(sd_base):
    pipe = AdapterPipeline(sd_base)
    with pytest.raises(ConditionError, match="mask_image is 32x32 but init_image is 64x64"):
        pipe("a", init_image=photo(64, 0), mask_image=mask_of(32), steps=2, progress=False)
    inpaint = AdapterPipeline(inpaint_unet_base(sd_base))
    for options in ({}, {"init_image": photo(64, 0)}):
        with pytest.raises(ConfigError, match="inpainting UNet"):
            inpaint("a", steps=2, progress=False, **options)


def test_image_inputs_a_user_gets_wrong_are_refused_or_read_as_meant(sd_base):
    """An opaque RGBA array was taken for latents by diffusers' processor (pixels in [0, 1] reached the VAE); a 0/1
    label mask binarised to nothing (nothing repainted, no word); latents= with init_image was silently ignored."""
    pipe = AdapterPipeline(sd_base)
    rgb = np.asarray(photo(64, 0))
    rgba = np.concatenate([rgb, np.full((64, 64, 1), 255, np.uint8)], -1)
    kwargs = dict(strength=0.5, steps=4, seed=3, output_type="np", progress=False)
    assert np.array_equal(pipe("a", init_image=rgba, **kwargs).images[0], pipe("a", init_image=rgb, **kwargs).images[0])
    tensor = torch.from_numpy(rgba).permute(2, 0, 1).float() / 255
    assert np.array_equal(pipe("a", init_image=tensor, **kwargs).images[0], pipe("a", init_image=rgb, **kwargs).images[0])
    with pytest.raises(ConditionError, match="init_image has 2 channels"):
        pipe("a", init_image=tensor[:2], **kwargs)
    labels = (np.asarray(mask_of(64)) > 0).astype(np.uint8)  # 0/1, as segmentation tools give
    with pytest.raises(ConditionError, match="nothing to repaint.*multiply it by 255"):
        pipe("a", init_image=rgb, mask_image=labels, **kwargs)
    with pytest.raises(ConfigError, match="latents= is text-to-image's starting noise"):
        pipe("a", init_image=rgb, latents=torch.zeros(1, 4, 8, 8), **kwargs)


def test_fast_mode_loop_gives_the_eager_images(sd_base):
    """denoise_fast (host timesteps, static UNet inputs) runs img2img and inpainting as denoise_eager does."""
    base = load_base("tiny")
    image, mask = photo(64, 5), mask_of(64)
    want = [ours(base, 64, init_image=image, strength=0.5), ours(base, 64, init_image=image, mask_image=mask, strength=0.75)]
    fast = AdapterPipeline(load_base("tiny")).optimize(compile=False, dtype=torch.float32)
    got = [fast(PROMPT, steps=4, seed=3, output_type="np", progress=False, init_image=image, strength=0.5).images[0],
           fast(PROMPT, steps=4, seed=3, output_type="np", progress=False, init_image=image, mask_image=mask,
                strength=0.75).images[0]]
    for a, b in zip(got, want):
        assert np.abs(a - b).max() <= 1e-4
