"""`AdapterPipeline`: text-to-image generation on a frozen SD1.x/SD2.x/SDXL base with T2I-Adapters.

The denoising loop follows diffusers' `StableDiffusion(XL)AdapterPipeline` step for step (same
noise, same scheduler calls, same classifier-free guidance), so with the same components and seed
the outputs agree; on top it adds per-adapter weights and step windows, composition by weighted
sum or a CoAdapter fuser, the style adapter, 1↔3-channel conversion and any output size.
Adapter features are computed once per call and added to both CFG branches (paper §3.2).
"""
from __future__ import annotations

import logging
import math
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from t2iadapter import fast as fast_mode
from t2iadapter import unet_hook
from t2iadapter.bases import BaseModel, TextContext, encode_text, load_base, sdxl_time_ids
from t2iadapter.errors import ConditionError, ConfigError
from t2iadapter.formats import load_adapter
from t2iadapter.models import TASKS, AdapterModule

log = logging.getLogger(__name__)

ConditionInput = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike

# name → (diffusers scheduler class name, extra config); aliases map the names people use.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}
_ALIASES = {"euler a": "euler_a", "euler_ancestral": "euler_a", "dpm++ 2m": "dpm++2m", "dpmpp_2m": "dpm++2m",
            "dpm++ 2m karras": "dpm++2m_karras", "dpmpp_2m_karras": "dpm++2m_karras", "uni_pc": "unipc"}


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def make_scheduler(name: str, base_config: Mapping[str, Any]):
    """A fresh scheduler of the named kind, configured like the base's own (betas, prediction type)."""
    import diffusers

    key = _ALIASES.get(name.lower().strip(), name.lower().strip())
    if key not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[key]
    return getattr(diffusers, cls_name).from_config(dict(base_config), **extra)


@dataclass(frozen=True)
class Window:
    """Fraction of the denoising in which an adapter acts: steps ⌊start·N⌋ ≤ i < ⌊end·N⌋.

    Generalises the original `cond_tau` (start=0, end=τ) and diffusers' SDXL
    `adapter_conditioning_factor` (start=0, end=factor); ComfyUI calls these start/end percent.
    """

    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.start <= self.end <= 1.0):
            raise ConfigError(f"window {self.start}:{self.end} must satisfy 0 <= start <= end <= 1")

    @classmethod
    def parse(cls, value: "Window | tuple[float, float] | str | None") -> "Window":
        if value is None:
            return cls()
        if isinstance(value, Window):
            return value
        if isinstance(value, str):
            try:
                start, end = (float(v) for v in value.split(":"))
            except ValueError:
                raise ConfigError(f"window {value!r} must look like START:END, e.g. 0:0.5") from None
            return cls(start, end)
        start, end = value
        return cls(float(start), float(end))

    def active(self, step: int, total: int) -> bool:
        return int(total * self.start) <= step < int(total * self.end)


@dataclass
class GenerationResult:
    """Images plus everything needed to reproduce them."""

    images: list[Any]
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def image(self):
        return self.images[0]


def _adapter_name(source: Any, index: int) -> str:
    if isinstance(source, AdapterModule):
        return getattr(source, "name", None) or f"{source.kind}{index}"
    text = str(source).rstrip("/")
    return Path(text).stem if not text.startswith("demo/") else text.split("/", 1)[1]


def task_of(name: str) -> str | None:
    """The fuser task a name refers to (`coadapter-sketch-sd15v1` → `sketch`), if any."""
    for part in re.split(r"[-_/.\s]+", name.lower()):
        if part in TASKS:
            return part
    return None


def _to_tensor(cond: ConditionInput) -> torch.Tensor | Image.Image:
    if isinstance(cond, (str, os.PathLike)):
        path = Path(cond)
        if not path.is_file():
            raise ConditionError(f"condition image {path} does not exist")
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except Exception as exc:
            raise ConditionError(f"cannot read condition image {path}: {exc}") from None
    if isinstance(cond, np.ndarray):
        if cond.ndim == 2:
            cond = cond[..., None]
        if cond.ndim != 3:
            raise ConditionError(f"condition array must be HxW or HxWxC, got shape {cond.shape}")
        arr = cond.astype(np.float32) / 255.0 if cond.dtype == np.uint8 else cond.astype(np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1)
    if isinstance(cond, (Image.Image, torch.Tensor)):
        return cond
    raise ConditionError(f"a condition must be an image, array, tensor or path, not {type(cond).__name__}")


def prepare_condition(cond: ConditionInput, channels: int, size: tuple[int, int], canvas: tuple[int, int]) -> torch.Tensor:
    """[1, channels, H', W'] in [0, 1]: channel-converted, resized to `size` (w, h), zero-padded to `canvas`."""
    w, h = size
    item = _to_tensor(cond)
    if isinstance(item, Image.Image):
        mode = "L" if channels == 1 else "RGB"
        if item.mode != mode:
            item = item.convert(mode)
        # Same resampling and scaling as diffusers' adapter pipelines (LANCZOS, /255).
        arr = np.array(item.resize((w, h), resample=Image.LANCZOS), dtype=np.float32) / 255.0
        arr = arr[..., None] if arr.ndim == 2 else arr
        x = torch.from_numpy(arr).permute(2, 0, 1)[None]
    else:
        x = item[None] if item.ndim == 3 else item
        if x.ndim != 4 or x.shape[0] != 1:
            raise ConditionError(f"condition tensor must be [C, H, W] or [1, C, H, W], got {tuple(item.shape)}")
        x = x.float()
        c = x.shape[1]
        if c == 4:
            x = x[:, :3]
            c = 3
        if c == 3 and channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif c == 1 and channels == 3:
            x = x.repeat(1, 3, 1, 1)
        elif c != channels:
            raise ConditionError(f"condition has {c} channels; this adapter takes {channels} (or 1/3 to convert)")
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    cw, ch = canvas
    if (cw, ch) != (w, h):
        x = F.pad(x, (0, cw - w, 0, ch - h))
    return x


class AdapterPipeline:
    """Generate with a frozen base plus any number of T2I-Adapters (composed by sum or fuser) and a style adapter."""

    def __init__(
        self,
        base: BaseModel,
        adapters: Sequence[Any] | Mapping[str, Any] = (),
        *,
        fuser: Any = None,
        style_encoder: str | os.PathLike | Callable | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.base = base
        items = adapters.items() if isinstance(adapters, Mapping) else [(None, a) for a in adapters]
        self.adapters: dict[str, AdapterModule] = {}
        for i, (name, source) in enumerate(items):
            module = load_adapter(source)
            name = name or _adapter_name(source, i)
            if name in self.adapters:
                name = f"{name}-{i}"
            if module.kind == "fuser":
                raise ConfigError(f"{name!r} is a CoAdapter fuser; pass it as fuser=, not among the adapters")
            if module.kind == "style":
                unet_hook.check_style_fits(base.unet, module.config, name)
            else:
                unet_hook.check_adapter_fits(base.unet, module.config, name, vae_scale_factor=base.vae_scale_factor)
            self.adapters[name] = module.requires_grad_(False).eval()
        self.fuser = load_adapter(fuser).requires_grad_(False).eval() if fuser is not None else None
        if self.fuser is not None and self.fuser.kind != "fuser":
            raise ConfigError(f"fuser= must be a CoAdapter fuser checkpoint, got a {self.fuser.kind} adapter")
        self._style_encoder_source = style_encoder
        self._style_encoder: Callable | None = style_encoder if callable(style_encoder) else None
        self.fast = False
        self.to(device=device, dtype=dtype)
        for module in self.modules_to_move():  # adapters run in the base's dtype (checkpoints may be fp16)
            module.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike | BaseModel,
        adapters: Sequence[Any] | Mapping[str, Any] = (),
        *,
        fuser: Any = None,
        style_encoder: str | os.PathLike | Callable | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        config_dir: str | os.PathLike | None = None,
    ) -> "AdapterPipeline":
        """Load a base (folder, single file, hub id or preset) and adapters (paths, names or modules)."""
        if not isinstance(base, BaseModel):
            base = load_base(base, config_dir=config_dir)
        return cls(base, adapters, fuser=fuser, style_encoder=style_encoder, device=device, dtype=dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "AdapterPipeline":
        self.base.to(device=device, dtype=dtype)
        for module in self.modules_to_move():
            module.to(device=device, dtype=dtype)
        return self

    def modules_to_move(self) -> list[torch.nn.Module]:
        return list(self.adapters.values()) + ([self.fuser] if self.fuser is not None else [])

    @property
    def device(self) -> torch.device:
        return self.base.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.unet.dtype

    @property
    def spatial_names(self) -> list[str]:
        return [n for n, m in self.adapters.items() if m.kind != "style"]

    @property
    def style_names(self) -> list[str]:
        return [n for n, m in self.adapters.items() if m.kind == "style"]

    @property
    def default_size(self) -> tuple[int, int]:
        side = self.base.unet.config.sample_size * self.base.vae_scale_factor
        return side, side

    @property
    def size_multiple(self) -> int:
        """Side lengths the UNet and every adapter can take without rounding (64 for SD1.x, 32 for SDXL)."""
        m = self.base.vae_scale_factor * 2 ** (len(self.base.unet.config.block_out_channels) - 1)
        for name in self.spatial_names:
            m = math.lcm(m, self.adapters[name].config.total_downscale)
        return m

    def optimize(
        self,
        *,
        compile: bool = True,
        dtype: torch.dtype | None = None,
        mode: str = "reduce-overhead",
        backend: Any = "inductor",
        fuse_qkv: bool = True,
        compile_vae: bool = True,
        compile_adapters: bool = True,
    ) -> "AdapterPipeline":
        """Fast mode (see `t2iadapter.fast`): bf16/fp16 on GPU, channels-last, SDPA with fused q/k/v, compiled
        UNet (CUDA graphs on GPU), VAE decoder and adapters, and a denoising loop without host syncs.

        Shapes stay static (features of an inactive window are zeros, not absent), so a compiled graph
        is reused across calls of the same size; weights and windows are data, not constants.
        `backend` is any torch.compile backend (the tests count compilations with one); `mode` applies
        to the inductor backend only. Compilation happens on the first call of each size.
        """
        target = dtype or fast_mode.default_dtype(self.device)
        self.to(dtype=target)
        settings = fast_mode.FastSettings(dtype=target, compile=compile, mode=mode, backend=backend, fuse_qkv=fuse_qkv,
                                          compile_vae=compile_vae, compile_adapters=compile_adapters)
        fast_mode.optimize_base(self.base, settings)
        fast_mode.optimize_adapters(self.adapters, settings)
        self.fast = True
        return self

    # ------------------------------------------------------------------ helpers

    def _align(self, value: Any, names: list[str], what: str, default: Any) -> dict[str, Any]:
        """Per-adapter values from a scalar, a list aligned with `names`, or a mapping by name."""
        if value is None:
            return {n: default for n in names}
        if isinstance(value, Mapping):
            unknown = set(value) - set(self.adapters)
            if unknown:
                raise ConfigError(f"{what} names unknown adapters {sorted(unknown)}; loaded: {list(self.adapters)}")
            return {n: value.get(n, default) for n in names}
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            return {n: value for n in names}
        if len(value) != len(names):
            raise ConfigError(f"got {len(value)} {what} for {len(names)} adapters ({', '.join(names) or 'none'})")
        return dict(zip(names, value))

    def _fast_condition(self, cond: ConditionInput, module: AdapterModule, size: tuple[int, int],
                        canvas: tuple[int, int]) -> torch.Tensor | None:
        """`prepare_condition(...).to(device, dtype)`, with 8-bit images crossing to the device as bytes (same values)."""
        item = _to_tensor(cond)
        x = fast_mode.condition_bytes(item, module.config.in_channels, size)
        if x is None:
            return prepare_condition(item, module.config.in_channels, size, canvas).to(self.device, module.dtype)
        return fast_mode.bytes_to_condition(x, canvas, self.device, module.dtype)

    def _style_tokens_input(self, image: ConditionInput) -> torch.Tensor:
        if isinstance(image, torch.Tensor) and image.ndim == 3:
            return image  # already CLIP-vision tokens [N, L, width]
        if self._style_encoder is None:
            from t2iadapter import extractors

            kwargs = {"model": str(self._style_encoder_source)} if self._style_encoder_source else {}
            self._style_encoder = extractors.get("style", **kwargs)
        item = _to_tensor(image)
        if isinstance(item, torch.Tensor):
            arr = (item.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            item = Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr)
        return self._style_encoder(item)

    def _resolve_size(self, size: tuple[int, int] | None) -> tuple[tuple[int, int], tuple[int, int]]:
        w, h = size or self.default_size
        if w < 8 or h < 8 or w > 8192 or h > 8192:
            raise ConfigError(f"size {w}x{h} is out of range (8..8192 pixels a side)")
        m = self.size_multiple
        return (w, h), (math.ceil(w / m) * m, math.ceil(h / m) * m)

    # ------------------------------------------------------------------ the call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        conditions: Sequence[ConditionInput] | Mapping[str, ConditionInput] | None = None,
        *,
        negative_prompt: str | Sequence[str] | None = None,
        steps: int = 30,
        guidance_scale: float = 7.5,
        size: tuple[int, int] | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        num_images: int = 1,
        scheduler: str | None = None,
        weights: float | Sequence[float] | Mapping[str, float] | None = None,
        windows: Any = None,
        compose: str = "sum",
        style_image: ConditionInput | None = None,
        eta: float = 0.0,
        callback: Callable[[int, Any, torch.Tensor], None] | None = None,
        output_type: str = "pil",
        progress: bool = True,
    ) -> GenerationResult:
        """Generate images; see the README for every argument."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ConfigError("no prompt given")
        if steps < 1 or steps > 1000:
            raise ConfigError(f"steps must be between 1 and 1000, got {steps}")
        if num_images < 1:
            raise ConfigError(f"num_images must be >= 1, got {num_images}")
        if compose not in ("sum", "fuser"):
            raise ConfigError(f"compose must be 'sum' or 'fuser', got {compose!r}")
        if compose == "fuser" and self.fuser is None:
            raise ConfigError("compose='fuser' needs a CoAdapter fuser (fuser=... when loading the pipeline)")
        (w, h), (cw, ch) = self._resolve_size(size)

        # Which adapters take part, with which condition, weight and window.
        names = self.spatial_names
        if conditions is None:
            conditions = {}
        if isinstance(conditions, Mapping):
            unknown = set(conditions) - set(names)
            if unknown:
                raise ConditionError(f"conditions for unknown adapters {sorted(unknown)}; spatial adapters: {names}")
            used = [n for n in names if n in conditions]
            cond_of = dict(conditions)
        else:
            if isinstance(conditions, (str, Image.Image, np.ndarray, torch.Tensor)):
                conditions = [conditions]
            if len(conditions) != len(names):
                raise ConditionError(
                    f"got {len(conditions)} condition images for {len(names)} spatial adapters ({', '.join(names) or 'none'})"
                )
            used = list(names)
            cond_of = dict(zip(names, conditions))
        style_used = self.style_names if style_image is not None else []
        if style_image is not None and not style_used:
            raise ConfigError("style_image given but no style adapter is loaded")
        all_used = used + style_used
        weight_of = self._align(weights, all_used, "weights", 1.0)
        window_of = {n: Window.parse(v) for n, v in self._align(windows, all_used, "windows", None).items()}
        for n, wgt in weight_of.items():
            if not isinstance(wgt, (int, float)) or not math.isfinite(wgt):
                raise ConfigError(f"weight of {n!r} must be a number, got {wgt!r}")
        tasks = {}
        if compose == "fuser":
            for n in all_used:
                tasks[n] = "style" if self.adapters[n].kind == "style" else task_of(n)
                if tasks[n] is None:
                    raise ConfigError(f"the fuser needs to know each adapter's condition; name {n!r} has none of "
                                      f"{sorted(TASKS)} (load adapters as a dict: {{'sketch': path, ...}})")

        device, dtype = self.device, self.dtype
        if seed is None and generator is None:
            seed = random.randrange(2**32)
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(int(seed))

        # 1. Adapter features: each adapter runs once per call (never per step).
        raw: dict[str, Any] = {}
        for n in used:
            module = self.adapters[n]
            if self.fast:
                x = self._fast_condition(cond_of[n], module, (w, h), (cw, ch))
            else:
                x = prepare_condition(cond_of[n], module.config.in_channels, (w, h), (cw, ch)).to(device, module.dtype)
            raw[n] = [f.to(dtype) for f in module(x)]
        for n in style_used:
            tokens = self._style_tokens_input(style_image).to(device, self.adapters[n].dtype)
            raw[n] = self.adapters[n](tokens).to(dtype)
        batch = len(prompts) * num_images
        cfg = guidance_scale > 1.0

        composed: dict[frozenset, tuple[list[torch.Tensor] | None, torch.Tensor | None]] = {}

        def features_for(active: frozenset) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
            if active in composed:
                return composed[active]
            maps, seq = None, None
            if compose == "fuser" and active:
                inputs = {}
                for n in all_used:
                    if n in active:
                        f = raw[n]
                        inputs[tasks[n]] = f * weight_of[n] if isinstance(f, torch.Tensor) else [t * weight_of[n] for t in f]
                maps, seq = self.fuser(inputs)
            else:
                for n in all_used:
                    if n not in active:
                        continue
                    f, wgt = raw[n], weight_of[n]
                    if isinstance(f, torch.Tensor):
                        seq = f * wgt if seq is None else torch.cat([seq, f * wgt], dim=1)
                    elif maps is None:
                        maps = [t * wgt for t in f]
                    else:
                        maps = [a + wgt * t for a, t in zip(maps, f)]
            if maps is not None:
                maps = [m.repeat(batch, 1, 1, 1) for m in maps]
                if cfg:
                    maps = [torch.cat([m] * 2, dim=0) for m in maps]
                if self.fast:  # one layout for every call (the compiled graph's inputs), the UNet's own
                    maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
            composed[active] = (maps, seq)
            return maps, seq

        # 2. Text context (as diffusers: negative first for CFG).
        text = encode_text(self.base, prompts).repeat(num_images) if not (self.fast and cfg) else None
        if cfg:
            if negative_prompt is None and self.base.is_sdxl:
                if self.fast:  # the same zeros, without running both text encoders for nothing
                    text = encode_text(self.base, prompts).repeat(num_images)
                    neg = TextContext(torch.zeros_like(text.context), torch.zeros_like(text.pooled))
                else:
                    neg = encode_text(self.base, prompts, zeros=True).repeat(num_images)
            else:
                negs = [negative_prompt or ""] * len(prompts) if negative_prompt is None or isinstance(negative_prompt, str) \
                    else list(negative_prompt)
                if len(negs) != len(prompts):
                    raise ConfigError(f"got {len(negs)} negative prompts for {len(prompts)} prompts")
                if self.fast:  # negative and positive prompts through the text encoder(s) as one batch
                    both, k = encode_text(self.base, negs + prompts), len(negs)
                    neg = TextContext(both.context[:k], None if both.pooled is None else both.pooled[:k]).repeat(num_images)
                    text = TextContext(both.context[k:], None if both.pooled is None else both.pooled[k:]).repeat(num_images)
                else:
                    neg = encode_text(self.base, negs).repeat(num_images)
        added = None
        if self.base.is_sdxl:
            time_ids = sdxl_time_ids(ch, cw, batch, text.context.dtype, device)
            pooled = torch.cat([neg.pooled, text.pooled]) if cfg else text.pooled
            added = {"text_embeds": pooled.to(device), "time_ids": torch.cat([time_ids] * 2) if cfg else time_ids}

        def context_for(seq: torch.Tensor | None) -> torch.Tensor:
            cond_ctx = unet_hook.extend_context(text.context, seq, unconditional=False)
            if not cfg:
                return cond_ctx
            return torch.cat([unet_hook.extend_context(neg.context, seq, unconditional=True), cond_ctx])

        # 3. Noise and schedule.
        sched = make_scheduler(scheduler, self.base.scheduler.config) if scheduler else \
            type(self.base.scheduler).from_config(self.base.scheduler.config)
        # Fast mode: the scheduler computes on host numbers; the UNet gets device timesteps made here (no sync per step).
        sched.set_timesteps(steps, device="cpu" if self.fast else device)
        timesteps = sched.timesteps
        clock = fast_mode.LoopClock(timesteps, device) if self.fast else None
        zeros = None
        shape = (batch, self.base.unet.config.in_channels, ch // self.base.vae_scale_factor, cw // self.base.vae_scale_factor)
        # Fast mode keeps latents (and the scheduler's arithmetic) in float32, only the UNet runs in half precision;
        # the draws are the same (half-precision randn is a rounded float32 draw).
        latent_dtype = torch.float32 if self.fast else text.context.dtype
        latents = torch.randn(shape, generator=generator, device=generator.device, dtype=latent_dtype).to(device)
        latents = latents * sched.init_noise_sigma
        step_kwargs = _step_kwargs(sched, generator, eta)

        # 4. Denoising loop.
        from tqdm.auto import tqdm

        total = len(timesteps)
        for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress, leave=False)):
            active = frozenset(n for n in all_used if window_of[n].active(i, steps))
            maps, seq = features_for(active)
            if maps is None and self.fast:  # no spatial adapter acts now: zeros, so every call and step has one graph
                if zeros is None:
                    zeros = unet_hook.zero_features(self.base.unet, features_for(frozenset(used))[0]) if used else \
                        unet_hook.no_features(self.base.unet, latents.shape[0] * (2 if cfg else 1), tuple(latents.shape[-2:]),
                                              dtype=dtype, device=device)
                maps = zeros
            model_in = torch.cat([latents] * 2) if cfg else latents
            model_in = sched.scale_model_input(model_in, t)
            if clock is not None:
                model_in, t_unet = model_in.to(dtype), clock.unet_timestep(i)
            else:
                t_unet = t
            noise = unet_hook.unet_forward(self.base.unet, model_in, t_unet, context_for(seq), maps, added_cond_kwargs=added)
            if self.fast:
                # a new float32 tensor: a CUDA-graph output is overwritten by the next replay, and schedulers keep outputs
                noise = noise.to(torch.float32, copy=True)
            if cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = sched.step(noise, t, latents, **step_kwargs).prev_sample
            if callback is not None:
                callback(i, t, latents)
        log.debug("denoised %d steps (%d timesteps)", steps, total)

        # 5. Decode and crop back to the requested size.
        images = self.decode(latents)[:, :, :h, :w]
        params = {
            "prompt": prompts if len(prompts) > 1 else prompts[0],
            "negative_prompt": negative_prompt,
            "seed": seed,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "size": [w, h],
            "scheduler": scheduler or type(self.base.scheduler).__name__,
            "base": self.base.source,
            "adapters": used + style_used,
            "weights": [weight_of[n] for n in all_used],
            "windows": [[window_of[n].start, window_of[n].end] for n in all_used],
            "compose": compose,
            "num_images": num_images,
        }
        arr = images.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "np":
            return GenerationResult(list(arr), params)
        if output_type == "pt":
            return GenerationResult(list(images), params)
        return GenerationResult([Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr], params)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [0, 1] (SDXL's fp16 VAE decodes in fp32 where its config asks)."""
        vae = self.base.vae
        cfg = vae.config
        upcast = self.base.is_sdxl and vae.dtype == torch.float16 and getattr(cfg, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            latents = latents.to(vae.dtype)
            if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
                mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents)
                std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents)
                latents = latents * std / cfg.scaling_factor + mean
            else:
                latents = latents / cfg.scaling_factor
            image = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)
        return (image / 2 + 0.5).clamp(0, 1)


def _step_kwargs(scheduler, generator: torch.Generator, eta: float) -> dict[str, Any]:
    """`eta` and `generator` for schedulers whose `step` takes them (as diffusers' pipelines pass them)."""
    import inspect

    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs
