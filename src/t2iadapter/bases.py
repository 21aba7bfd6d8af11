"""Frozen text-to-image bases: load SD1.x/SD2.x/SDXL components, and the built-in `tiny` presets.

A base is whatever diffusers can load: a pipeline folder, a single-file checkpoint
(`.safetensors`/`.ckpt`, through diffusers' single-file loading; offline it needs a local
`config_dir`), a hub id when online, or a preset name (`tiny`, `tiny-xl`, `demo`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from t2iadapter.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


def move(module: torch.nn.Module, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> None:
    """`module.to(device, dtype)`, for a diffusers model without diffusers' warning about fp32 modules it does not
    have (0.42 warns on any dtype argument, even None); its own `to` where that advice, or its refusal to cast a
    quantized model, applies, and for transformers' models."""
    from diffusers import ModelMixin

    moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    if isinstance(module, ModelMixin) and not module._keep_in_fp32_modules and not getattr(module, "is_quantized", False):
        torch.nn.Module.to(module, **moves)
    else:
        module.to(**moves)


_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) a model's inputs must have: those of its first floating-point weight.

    What diffusers' `model.device` and `model.dtype` answer, without their walk over every submodule in search of
    offloading and casting hooks on every query (1.9 ms on an SD1.5 UNet, 5.8 ms on SDXL's, on a 2-core CPU; a
    generation asked a dozen times, once per step in fast mode). A model with such hooks (diffusers' group
    offloading on the model, layerwise casting's float8 storage) or with modules kept in fp32 gets diffusers' answer.
    """
    if getattr(model, "_diffusers_hook", None) is None and not getattr(model, "_keep_in_fp32_modules", None):
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
        if weight is not None and weight.dtype not in _FLOAT8:
            return weight.device, weight.dtype
    return model.device, model.dtype


@dataclass
class BaseModel:
    """The frozen components an adapter pipeline or trainer needs."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    source: str = "?"
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        from t2iadapter.unet_hook import is_sdxl

        return is_sdxl(self.unet)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) the UNet was made for: its sample size (an int, or diffusers' (h, w)) × the VAE factor."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return w * self.vae_scale_factor, h * self.vae_scale_factor

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {k: v for k, v in mods.items() if v is not None}

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "BaseModel":
        if device is None and dtype is None:
            return self
        for module in self.modules.values():
            move(module, device=device, dtype=dtype)
        return self

    def freeze(self) -> "BaseModel":
        """requires_grad_(False) and eval mode on every network (the base is never trained)."""
        for module in self.modules.values():
            module.requires_grad_(False).eval()
        return self

    def diffusers_pipeline(self):
        """The equivalent plain diffusers text-to-image pipeline (shares the modules)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if self.is_sdxl:
            return StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                                             tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet,
                                             scheduler=self.scheduler)
        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                                       scheduler=self.scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """A diffusers pipeline folder (safetensors) that `load_base` and diffusers both read."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():  # even with overwrite: a folder never replaces a file
            raise CheckpointError(f"{directory} is a file; a base is written as a folder: name a new one")
        if directory.exists() and any(directory.iterdir()) and not overwrite:
            raise CheckpointError(f"{directory} exists and is not empty; choose another folder or pass --force")
        self.diffusers_pipeline().save_pretrained(directory, safe_serialization=True)
        return directory


def _from_pipeline(pipe, source: str) -> BaseModel:
    return BaseModel(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                     scheduler=pipe.scheduler, text_encoder_2=getattr(pipe, "text_encoder_2", None),
                     tokenizer_2=getattr(pipe, "tokenizer_2", None), source=source)


@contextlib.contextmanager
def _lower_case_suffix(path: Path) -> Iterator[Path]:
    """`path`, or a link to it whose suffix is lower case: diffusers reads a single file as safetensors only by
    its lower-case suffix (`MODEL.SAFETENSORS` went to torch.load). The weights are read while the link lives."""
    if path.suffix == path.suffix.lower():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="t2iadapter-base-") as folder:
        link = Path(folder) / (path.stem + path.suffix.lower())
        try:
            link.symlink_to(path.resolve())
        except OSError as exc:  # no symlinks here (Windows without the privilege)
            raise CheckpointError(f"{path}: rename it to {link.name} (diffusers reads the suffix in lower case; "
                                  f"a link could not be made: {exc.strerror})") from None
        yield link


def _single_file_is_sdxl(path: Path) -> bool:
    """SDXL checkpoints carry a second text encoder under `conditioner.embedders.1`."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return any(k.startswith("conditioner.embedders.1") for k in f.keys())
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    return any(k.startswith("conditioner.embedders.1") for k in sd)


def _dtype_keyword(dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """diffusers' loading keyword for a dtype: `dtype` from 0.40 on (`torch_dtype` warns there), `torch_dtype` before."""
    if dtype is None:
        return {}
    import diffusers

    major_minor = tuple(int(part) for part in diffusers.__version__.split(".")[:2])
    return {"dtype" if major_minor >= (0, 40) else "torch_dtype": dtype}


def load_base(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    config_dir: str | os.PathLike | None = None,
) -> BaseModel:
    """Load a base: preset name, diffusers folder, single file (.safetensors/.ckpt) or hub id.

    `HF_HUB_DISABLE_PROGRESS_BARS=1` (the CLI sets it) also hides diffusers' "Loading pipeline components" bar.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes", "on"):
        diffusers_logging.disable_progress_bar()

    text = str(source)
    if text in PRESETS:
        base = PRESETS[text]()
    else:
        path = Path(text).expanduser()
        kwargs = _dtype_keyword(dtype)
        from t2iadapter import hub

        if not path.exists() and hub.is_id(text):
            path = hub.pipeline_path(text)  # the hub's cache first; one clear error when offline and not cached
        try:
            if path.is_dir():
                index = path / "model_index.json"
                if not index.is_file():
                    raise CheckpointError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
                cls_name = json.loads(index.read_text()).get("_class_name", "")
                cls = StableDiffusionXLPipeline if "XL" in cls_name else StableDiffusionPipeline
                extra = {} if cls is StableDiffusionXLPipeline else dict(safety_checker=None, requires_safety_checker=False)
                pipe = cls.from_pretrained(path, **extra, **kwargs)
            elif path.is_file():
                if path.suffix.lower() not in (".safetensors", ".ckpt", ".pt", ".pth"):
                    raise CheckpointError(f"{path}: a base checkpoint is a folder, .safetensors or .ckpt")
                cls = StableDiffusionXLPipeline if _single_file_is_sdxl(path) else StableDiffusionPipeline
                sf = dict(config=str(config_dir), local_files_only=True) if config_dir else {}
                with _lower_case_suffix(path) as named:
                    pipe = cls.from_single_file(str(named), **sf, **kwargs)
            else:
                raise CheckpointError(f"{text}: no such base model folder or file, and not a preset ({', '.join(PRESETS)})")
        except CheckpointError:
            raise
        except Exception as exc:
            hint = " (offline single-file loading needs --config-dir with the model's diffusers configs)" if path.is_file() else ""
            raise CheckpointError(f"cannot load base model {text!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}{hint}") from None
        base = _from_pipeline(pipe, text)
    base.source = text
    if dtype is None:  # libraries disagree on the default (diffusers: fp32, transformers: the file's): use the UNet's
        for module in base.modules.values():
            if module.dtype != base.unet.dtype:
                module.to(dtype=base.unet.dtype)
    if dtype is not None or device is not None:
        base.to(device=device, dtype=dtype)
    return base.freeze()


# ---------------------------------------------------------------------------------------------
# presets: seeded tiny random bases (shaped like SD1.5 and SDXL) for tests, CPU smoke runs and docs

TINY_WORDS = (
    "a an the of and with on in left right above below near small large red green blue yellow orange purple "
    "pink cyan white black circle square triangle star ring person cat dog house tree car sketch photo drawing"
).split()


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny presets (as diffusers' own adapter pipeline tests, with an f=8 VAE)."""

    unet_channels: tuple[int, ...] = (32, 32, 64, 64)
    text_width: int = 32
    vae_channels: tuple[int, ...] = (8, 8, 16, 16)
    sdxl: bool = False


def _tiny_text_encoder(tokenizer, width: int, seed: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, hidden_size=width, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), projection_dim=width,
                         max_position_embeddings=tokenizer.model_max_length, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tiny_base(spec: TinySpec = TinySpec(), seed: int = 0) -> BaseModel:
    """A seeded tiny random base with real diffusers/transformers classes; its images are noise."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from t2iadapter.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(TINY_WORDS)
    ch = spec.unet_channels
    torch.manual_seed(seed)
    if spec.sdxl:
        unet = UNet2DConditionModel(
            block_out_channels=ch, layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(ch) - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (len(ch) - 1) + ("UpBlock2D",),
            attention_head_dim=(2,) + (4,) * (len(ch) - 1), use_linear_projection=True, norm_num_groups=8,
            addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=1,
            projection_class_embeddings_input_dim=8 * 6 + spec.text_width, cross_attention_dim=2 * spec.text_width,
        )
    else:
        unet = UNet2DConditionModel(
            block_out_channels=ch, layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * (len(ch) - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(ch) - 1),
            cross_attention_dim=spec.text_width, attention_head_dim=4, norm_num_groups=8,
        )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=spec.vae_channels, in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
                        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, sample_size=64)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    text_encoder = _tiny_text_encoder(tokenizer, spec.text_width, seed + 2)
    text_encoder_2 = tokenizer_2 = None
    if spec.sdxl:
        tokenizer_2 = build_clip_tokenizer(TINY_WORDS)
        text_encoder_2 = _tiny_text_encoder(tokenizer_2, spec.text_width, seed + 3, projection=True)
    return BaseModel(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                     text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, source="tiny-xl" if spec.sdxl else "tiny")


def tiny_adapter_config(base: BaseModel, in_channels: int = 3):
    """A full adapter config whose features fit a base (read off its UNet and VAE configs)."""
    from t2iadapter.models import FullAdapterConfig
    from t2iadapter.unet_hook import adapter_layout

    return FullAdapterConfig(in_channels=in_channels, **adapter_layout(base.unet, base.vae_scale_factor))


def _demo() -> BaseModel:
    from t2iadapter import assets

    return load_base(assets.demo_base_path())


PRESETS = {
    "tiny": lambda: tiny_base(TinySpec()),
    "tiny-xl": lambda: tiny_base(TinySpec(unet_channels=(32, 64, 64), sdxl=True)),
    "demo": _demo,
}


# ---------------------------------------------------------------------------------------------
# text conditioning (as diffusers' SD/SDXL pipelines compute it, so outputs agree with theirs)


@dataclass
class TextContext:
    """Per-prompt cross-attention context, plus SDXL's pooled embedding."""

    context: torch.Tensor  # [B, 77, D]
    pooled: torch.Tensor | None = None  # [B, D2] (SDXL only)

    def repeat(self, n: int) -> "TextContext":
        if n == 1:
            return self
        return TextContext(self.context.repeat_interleave(n, dim=0),
                           None if self.pooled is None else self.pooled.repeat_interleave(n, dim=0))


def _tokens(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def encode_text(base: BaseModel, prompts: list[str], *, zeros: bool = False, clip_skip: int | None = None,
                prompts_2: list[str] | None = None) -> TextContext:
    """CLIP text context for `prompts` (SDXL: penultimate hidden states of both encoders, concatenated).

    `clip_skip` and SDXL's `prompts_2` (the second encoder's prompts) as diffusers' `encode_prompt` takes them.
    """
    device = base.text_encoder.device
    if not base.is_sdxl:
        enc = base.text_encoder
        mask = None
        if getattr(enc.config, "use_attention_mask", False):
            mask = base.tokenizer(prompts, padding="max_length", max_length=base.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").attention_mask.to(device)
        if clip_skip is None:
            ctx = enc(_tokens(base.tokenizer, prompts, device), attention_mask=mask)[0]
        else:  # diffusers: hidden state -(clip_skip + 1) through the final layer norm
            out = enc(_tokens(base.tokenizer, prompts, device), attention_mask=mask, output_hidden_states=True)
            ctx = getattr(enc, "text_model", enc).final_layer_norm(out[-1][-(clip_skip + 1)])  # transformers 4 | 5
        return TextContext(torch.zeros_like(ctx) if zeros else ctx)
    contexts, pooled = [], None
    second = prompts_2 if prompts_2 is not None else prompts
    for tok, enc, texts in ((base.tokenizer, base.text_encoder, prompts), (base.tokenizer_2, base.text_encoder_2, second)):
        out = enc(_tokens(tok, texts, device), output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:
            pooled = out[0]
        contexts.append(out.hidden_states[-2] if clip_skip is None else out.hidden_states[-(clip_skip + 2)])
    ctx = torch.cat(contexts, dim=-1)
    if zeros:  # SDXL's force_zeros_for_empty_prompt
        return TextContext(torch.zeros_like(ctx), torch.zeros_like(pooled))
    return TextContext(ctx, pooled)


def sdxl_time_ids(height: int, width: int, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """SDXL micro-conditioning: (original size, crop top-left, target size) per sample."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
    return ids.repeat(batch, 1)
