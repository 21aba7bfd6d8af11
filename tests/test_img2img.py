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
from test_pipeline_parity import PROMPT, condition, random_adapter


@pytest.fixture(scope="module")
def sd_base():
    return load_base("tiny")


@pytest.fixture(scope="module")
def xl_base():
    return load_base("tiny-xl")


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
