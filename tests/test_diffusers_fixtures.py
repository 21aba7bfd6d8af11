"""Any adapter diffusers can run runs here: diffusers' own adapter-pipeline test fixtures (a two-level UNet,
a VAE with scale factor 2, adapters with two channels and unshuffle 2 or 4), against diffusers' pipelines.

The components are built as diffusers' tests/pipelines adapter tests build them (seeded, tiny); the tokenizer
is our offline CLIP tokenizer instead of a hub download.
"""
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionAdapterPipeline,
    StableDiffusionXLAdapterPipeline,
    T2IAdapter,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from t2iadapter.bases import TINY_WORDS, BaseModel
from t2iadapter.errors import ConfigError
from t2iadapter.formats import load_adapter
from t2iadapter.pipeline import AdapterPipeline
from t2iadapter.tokenizer import build_clip_tokenizer

PROMPT = "a red circle left of a blue square"


def _text_encoder(tokenizer, cls=CLIPTextModel):
    torch.manual_seed(0)
    cfg = CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, hidden_size=32,
                         intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
                         pad_token_id=tokenizer.pad_token_id, vocab_size=1000, hidden_act="gelu", projection_dim=32)
    return cls(cfg).eval()


def _vae():
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, sample_size=128).eval()


def _adapter(tmp_path, adapter_type, downscale_factor):
    """diffusers' fixture adapter with larger-than-init weights (so it visibly acts), saved as a diffusers folder."""
    torch.manual_seed(0)
    adapter = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=2, downscale_factor=downscale_factor,
                         adapter_type=adapter_type).eval()
    with torch.no_grad():
        for p in adapter.parameters():
            p.mul_(3.0)
    adapter.save_pretrained(tmp_path / "adapter")
    return adapter


def sd_fixture():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32).eval()
    tokenizer = build_clip_tokenizer(TINY_WORDS)
    return BaseModel(unet=unet, vae=_vae(), text_encoder=_text_encoder(tokenizer), tokenizer=tokenizer,
                     scheduler=PNDMScheduler(skip_prk_steps=True)).freeze()


def sdxl_fixture():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                                cross_attention_dim=64).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                                       timestep_spacing="leading")
    tokenizer, tokenizer_2 = build_clip_tokenizer(TINY_WORDS), build_clip_tokenizer(TINY_WORDS)
    return BaseModel(unet=unet, vae=_vae(), text_encoder=_text_encoder(tokenizer), tokenizer=tokenizer,
                     text_encoder_2=_text_encoder(tokenizer_2, CLIPTextModelWithProjection), tokenizer_2=tokenizer_2,
                     scheduler=scheduler).freeze()


def _condition():
    return torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(7))


def test_sd_fixture_matches_diffusers(tmp_path):
    base = sd_fixture()
    theirs = _adapter(tmp_path, "full_adapter", 2)
    ours = load_adapter(tmp_path / "adapter")
    assert ours.config.feature_scales == (2, 4) and ours.kind == "full"
    cond = _condition()
    image = AdapterPipeline(base, [ours])(PROMPT, [cond], steps=3, seed=0, size=(64, 64), output_type="np",
                                          progress=False).images[0]
    ref_pipe = StableDiffusionAdapterPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                              unet=base.unet, adapter=theirs, scheduler=base.scheduler, safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False)
    ref = ref_pipe(PROMPT, image=cond[None], num_inference_steps=3, height=64, width=64,
                   generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    plain = base.diffusers_pipeline()(PROMPT, num_inference_steps=3, height=64, width=64,
                                      generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.abs(image - ref).max() <= 1e-4
    assert np.abs(image - plain).max() > 1e-2  # the adapter really acts


def test_sdxl_fixture_matches_diffusers(tmp_path):
    base = sdxl_fixture()
    theirs = _adapter(tmp_path, "full_adapter_xl", 4)
    ours = load_adapter(tmp_path / "adapter")
    assert ours.config.feature_scales == (4, 4) and ours.kind == "full_xl"
    cond = _condition()
    image = AdapterPipeline(base, [ours])(PROMPT, [cond], steps=2, seed=0, size=(64, 64), guidance_scale=5.0,
                                          output_type="np", progress=False).images[0]
    ref_pipe = StableDiffusionXLAdapterPipeline(vae=base.vae, text_encoder=base.text_encoder,
                                                text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
                                                tokenizer_2=base.tokenizer_2, unet=base.unet, adapter=theirs,
                                                scheduler=base.scheduler)
    ref = ref_pipe(PROMPT, image=cond[None], num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    plain = base.diffusers_pipeline()(PROMPT, num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                                      generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.abs(image - ref).max() <= 1e-4
    assert np.abs(image - plain).max() > 1e-2


def test_mismatched_adapter_names_channels_and_scales(tmp_path):
    """A fixture adapter on the other fixture's base: one line saying what it gives and what the base takes."""
    _adapter(tmp_path, "full_adapter", 2)
    with pytest.raises(ConfigError, match=r"gives features \[32ch@1/2, 64ch@1/4\].*takes \[32ch@1/4, 64ch@1/4, 64ch@1/4\]"):
        AdapterPipeline(sdxl_fixture(), [tmp_path / "adapter"])
