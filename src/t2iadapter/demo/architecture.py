"""The embedded demo's base model: Stable Diffusion 1.5's layout scaled down for 256² world images.

Same classes and wiring as SD1.5 (diffusers AutoencoderKL with f=8 and 4 latent channels,
UNet2DConditionModel with CrossAttnDownBlock2D×3 + DownBlock2D, a CLIPTextModel, the scaled-linear
ε-prediction schedule), so every code path that runs SD1.5 runs the demo unchanged. Sizes are
chosen so that the base (≈19M parameters) and its adapters fit the package's 64 MiB in fp16.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from t2iadapter.demo import world
from t2iadapter.tokenizer import build_clip_tokenizer

logger = logging.getLogger(__name__)

CONFIG_FILE = "demo_config.json"
NETWORKS = ("vae", "unet", "text_encoder")


@dataclass(frozen=True)
class DemoBaseConfig:
    """Sizes of the demo base (defaults: the v2 architecture, docs/demo-model.md; `tiny()` for CPU smoke runs).

    Shipped folders carry their own `demo_config.json`, so loading never depends on these defaults.
    """

    image_size: int = 256  # world scenes are 256²; the VAE (f=8) makes 32² latents
    vae_channels: tuple[int, ...] = (32, 64, 128, 128)  # 4 blocks as SD's VAE (128, 256, 512, 512); 3.9M.
    # v1 had (16, 32, 64, 128): 28.9 dB PSNR on held-out scenes, beads, greyed backgrounds (docs/demo-model.md)
    vae_layers_per_block: int = 1  # SD uses 2; decoding 256² costs 31 GFLOP (2-core CPU budget)
    latent_channels: int = 4  # as SD1.5, so adapters and pipelines see the usual latent shape
    unet_channels: tuple[int, ...] = (32, 64, 128, 192)  # SD1.5: (320, 640, 1280, 1280); 12.9M params,
    # 3.9 GFLOP per CFG step at 32² latents, so 25 steps + decode fit ~5 s on 2 CPU cores
    unet_layers_per_block: int = 2  # as SD1.5: adapter features enter after the 2nd block of each level
    self_attention: tuple[bool, ...] = (False, True, True, True)  # per level; False: the level's transformer
    # blocks attend to the text only (diffusers' only_cross_attention). Self-attention over 32² latents was a
    # third of v1's CPU step time; 16² and 8² keep it, so shapes still see each other.
    cross_attention_dim: int = 256  # = text_hidden (SD1.5: 768 = CLIP ViT-L/14 text width)
    attention_head_dim: int = 4  # diffusers reads it as the number of heads: head dims 8/16/32/48
    norm_num_groups: int = 32  # as SD1.5
    text_hidden: int = 256  # CLIP text width
    text_layers: int = 4  # SD1.5's CLIP has 12; captions here are short templated phrases
    text_heads: int = 4
    text_intermediate: int = 1024  # 4 × hidden, as CLIP
    max_length: int = 77  # CLIP's context length, so prompts pad as in SD1.5

    @staticmethod
    def tiny(image_size: int = 64) -> DemoBaseConfig:
        """A few-hundred-thousand-parameter variant of the same layout, for CPU smoke tests."""
        return DemoBaseConfig(
            image_size=image_size,
            vae_channels=(8, 8, 16, 16),
            unet_channels=(16, 16, 32, 32),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
            text_hidden=32,
            text_layers=2,
            text_intermediate=64,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> DemoBaseConfig:
        """Inverse of to_dict."""
        data = dict(data)
        data.setdefault("self_attention", (True,) * len(data.get("unet_channels", (0,) * 4)))  # v1 files
        return DemoBaseConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def vae_config(config: DemoBaseConfig = DemoBaseConfig()) -> dict[str, Any]:
    """diffusers AutoencoderKL config: f = 2^(blocks-1) = 8, 4 latent channels, as SD's VAE."""
    n = len(config.vae_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(config.vae_channels),
        "layers_per_block": config.vae_layers_per_block,
        "latent_channels": config.latent_channels,
        "norm_num_groups": min(config.norm_num_groups, min(config.vae_channels)),
        "sample_size": config.image_size,
        "scaling_factor": 0.18215,  # SD's value; the training script replaces it with 1/std(latents)
    }


def unet_config(config: DemoBaseConfig = DemoBaseConfig()) -> dict[str, Any]:
    """diffusers UNet2DConditionModel config in SD1.5's layout (3 cross-attention levels + 1 plain)."""
    n = len(config.unet_channels)
    return {
        "sample_size": config.image_size // 8,
        "in_channels": config.latent_channels,
        "out_channels": config.latent_channels,
        "down_block_types": ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        "block_out_channels": list(config.unet_channels),
        "layers_per_block": config.unet_layers_per_block,
        "cross_attention_dim": config.cross_attention_dim,
        "attention_head_dim": config.attention_head_dim,
        "norm_num_groups": config.norm_num_groups,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "only_cross_attention": [not a for a in config.self_attention],
    }


def text_encoder_config(config: DemoBaseConfig, tokenizer: Any) -> Any:
    """transformers CLIPTextConfig sized by `config`, with the tokenizer's vocabulary and special ids."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=config.text_intermediate,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length,
        projection_dim=config.text_hidden,
        hidden_act="quick_gelu",  # as OpenAI CLIP
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def scheduler_config() -> dict[str, Any]:
    """SD1.5's noise schedule (scaled-linear β 0.00085–0.012, 1000 steps, ε-prediction), for DDIM/DDPM."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }


def build_demo_tokenizer(out_dir: str | Path | None = None, max_length: int = 77) -> Any:
    """The demo's CLIP tokenizer: every word of `world.VOCABULARY` is one token."""
    return build_clip_tokenizer(world.VOCABULARY, out_dir, model_max_length=max_length)


def build_demo_base(seed: int = 0, config: DemoBaseConfig = DemoBaseConfig()) -> dict[str, Any]:
    """Freshly initialised demo base: {"vae", "unet", "text_encoder", "tokenizer", "scheduler"} (fp32, CPU)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_demo_tokenizer(tempfile.mkdtemp(prefix="t2i_demo_tok_"), config.max_length)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config(config))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**unet_config(config))
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_encoder_config(config, tokenizer))
    scheduler = DDIMScheduler(**scheduler_config())
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def count_parameters(modules: dict[str, Any]) -> dict[str, int]:
    """Parameter count per network and in total."""
    counts = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in modules.items()
        if isinstance(m, torch.nn.Module)
    }
    counts["total"] = sum(counts.values())
    return counts


def save_demo_base(
    modules: dict[str, Any],
    out_dir: str | Path,
    dtype: torch.dtype = torch.float16,
    config: DemoBaseConfig | None = None,
) -> Path:
    """Write a diffusers StableDiffusionPipeline folder (safetensors in `dtype`) plus demo_config.json.

    The caller's modules are not changed: the networks are copied to CPU in `dtype` before saving.
    """
    import copy

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from t2iadapter.bases import move

    out = Path(out_dir)
    nets = {k: copy.deepcopy(modules[k]).eval() for k in NETWORKS}
    for net in nets.values():
        move(net, device="cpu", dtype=dtype)
    scheduler = modules.get("scheduler") or DDIMScheduler(**scheduler_config())
    pipe = StableDiffusionPipeline(
        vae=nets["vae"],
        text_encoder=nets["text_encoder"],
        tokenizer=modules["tokenizer"],
        unet=nets["unet"],
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    source = Path(str(getattr(modules["tokenizer"], "name_or_path", "")))
    for name in ("vocab.json", "merges.txt"):  # the slow-tokenizer files too, for transformers 4.x readers
        if (source / name).is_file() and not (out / "tokenizer" / name).exists():
            shutil.copyfile(source / name, out / "tokenizer" / name)
    if config is not None:
        (out / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    logger.info("demo base saved to %s (%s)", out, dtype)
    return out
