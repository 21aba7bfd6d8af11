"""`AdapterPipeline`: load, move, optimize, generate; a frozen SD1.x/SD2.x/SDXL base plus T2I-Adapters.

`generate(request)` follows diffusers' `StableDiffusion(XL)AdapterPipeline` step for step, so with the
same components and seed the outputs agree; on top it adds per-adapter weights and step windows,
composition by weighted sum or a CoAdapter fuser, the style adapter, 1↔3-channel conversion and any
output size. Adapter features are computed once per call and added to both CFG branches (paper §3.2).

Ownership: adapter modules handed in are copied (the pipeline changes its copies' dtype, device and grad
state, never the caller's); the base is taken over (`to()`/`optimize()` move and compile it in place).
"""
from __future__ import annotations

import copy
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
from PIL import Image

from t2iadapter import unet_hook
from t2iadapter.bases import BaseModel, load_base
from t2iadapter.errors import ConditionError, ConfigError
from t2iadapter.formats import load_adapter
from t2iadapter.generation import conditions, fast, latents, loop, schedulers, text
from t2iadapter.generation.composition import Composition
from t2iadapter.generation.request import AdapterUse, GenerationRequest, Window
from t2iadapter.models import TASKS, AdapterModule

log = logging.getLogger(__name__)

ConditionInput = conditions.ConditionInput


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
    text_ = str(source).rstrip("/")
    return Path(text_).stem if not text_.startswith("demo/") else text_.split("/", 1)[1]


def task_of(name: str) -> str | None:
    """The fuser task a name refers to (`coadapter-sketch-sd15v1` → `sketch`), if any."""
    for part in re.split(r"[-_/.\s]+", name.lower()):
        if part in TASKS:
            return part
    return None


def resolve_device(device: str | None, dtype: str | None) -> tuple[str, torch.dtype]:
    """Device and dtype from their names: cuda when available; fp16 on a GPU, fp32 on the CPU (bf16/fp16/fp32)."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    key = dtype or ("fp32" if dev == "cpu" else "fp16")
    if key not in names:
        raise ConfigError(f"unknown dtype {key!r}; choose one of {', '.join(names)}")
    return dev, names[key]


def _own(source: Any) -> AdapterModule:
    """A module the pipeline may change: loaded from a file, or a copy of one the caller handed in."""
    module = load_adapter(source)
    return copy.deepcopy(module) if module is source else module


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
            module = _own(source)
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
        self.fuser = _own(fuser).requires_grad_(False).eval() if fuser is not None else None
        if self.fuser is not None and self.fuser.kind != "fuser":
            raise ConfigError(f"fuser= must be a CoAdapter fuser checkpoint, got a {self.fuser.kind} adapter")
        self._style_encoder_source = style_encoder
        self._style_encoder: Callable | None = style_encoder if callable(style_encoder) else None
        self.fast = False
        self.to(device=device, dtype=dtype)
        for module in self.modules_to_move():  # adapters run in the base's dtype (checkpoints may be fp16)
            module.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ load, move, optimize

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

    def optimize(self, *, compile: bool = True, dtype: torch.dtype | None = None, mode: str = "reduce-overhead",
                 backend: Any = "inductor", fuse_qkv: bool = True, compile_vae: bool = True,
                 compile_adapters: bool = True) -> "AdapterPipeline":
        """Fast mode (see `t2iadapter.generation.fast`): bf16/fp16 on GPU, channels-last, SDPA with fused q/k/v,
        compiled UNet (CUDA graphs on GPU), VAE decoder and adapters, and a loop without host syncs.

        Shapes stay static (features of an inactive window are zeros, not absent), so a compiled graph
        is reused across calls of the same size; weights and windows are data, not constants.
        `backend` is any torch.compile backend (the tests count compilations with one); `mode` applies
        to the inductor backend only. Compilation happens on the first call of each size.
        """
        target = dtype or fast.default_dtype(self.device)
        self.to(dtype=target)
        settings = fast.FastSettings(dtype=target, compile=compile, mode=mode, backend=backend, fuse_qkv=fuse_qkv,
                                     compile_vae=compile_vae, compile_adapters=compile_adapters)
        fast.optimize_base(self.base, settings)
        fast.optimize_adapters(self.adapters, settings)
        self.fast = True
        return self

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

    # ------------------------------------------------------------------ the keyword call → a request

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

    def request(self, prompt: str | Sequence[str], conditions: Any = None, *, weights: Any = None, windows: Any = None,
                style_image: ConditionInput | None = None, **options: Any) -> GenerationRequest:
        """The `GenerationRequest` of a keyword call: conditions by list (one per spatial adapter) or by name."""
        names = self.spatial_names
        if conditions is None:
            conditions = {}
        if isinstance(conditions, Mapping):
            unknown = set(conditions) - set(names)
            if unknown:
                raise ConditionError(f"conditions for unknown adapters {sorted(unknown)}; spatial adapters: {names}")
            cond_of = {n: conditions[n] for n in names if n in conditions}
        else:
            if isinstance(conditions, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
                conditions = [conditions]
            if len(conditions) != len(names):
                raise ConditionError(f"got {len(conditions)} condition images for {len(names)} spatial adapters "
                                     f"({', '.join(names) or 'none'})")
            cond_of = dict(zip(names, conditions))
        if style_image is not None:
            if not self.style_names:
                raise ConfigError("style_image given but no style adapter is loaded")
            cond_of.update({n: style_image for n in self.style_names})
        used = list(cond_of)
        weight_of = self._align(weights, used, "weights", 1.0)
        window_of = self._align(windows, used, "windows", None)
        uses = tuple(AdapterUse(n, cond_of[n], weight_of[n], Window.parse(window_of[n])) for n in used)
        return GenerationRequest(prompt if isinstance(prompt, str) else tuple(prompt), uses, **options)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], conditions: Any = None, *, weights: Any = None, windows: Any = None,
                 style_image: ConditionInput | None = None, generator: torch.Generator | None = None,
                 callback: loop.Callback | None = None, output_type: str = "pil", progress: bool = True,
                 **options: Any) -> GenerationResult:
        """Generate images; `options` are `GenerationRequest` fields (steps, guidance_scale, size, seed, ...)."""
        req = self.request(prompt, conditions, weights=weights, windows=windows, style_image=style_image, **options)
        return self.generate(req, generator=generator, callback=callback, output_type=output_type, progress=progress)

    # ------------------------------------------------------------------ generate

    def _check(self, req: GenerationRequest) -> dict[str, str]:
        """Every adapter named is loaded; with the fuser, each adapter's condition type (task) is known."""
        for use in req.adapters:
            if use.name not in self.adapters:
                raise ConditionError(f"no adapter named {use.name!r} is loaded; loaded: {list(self.adapters)}")
        if req.compose != "fuser":
            return {}
        if self.fuser is None:
            raise ConfigError("compose='fuser' needs a CoAdapter fuser (fuser=... when loading the pipeline)")
        tasks = {}
        for use in req.adapters:
            task = "style" if self.adapters[use.name].kind == "style" else task_of(use.name)
            if task is None:
                raise ConfigError(f"the fuser needs to know each adapter's condition; name {use.name!r} has none of "
                                  f"{sorted(TASKS)} (load adapters as a dict: {{'sketch': path, ...}})")
            if task in tasks.values():
                raise ConfigError(f"two adapters give the fuser the same condition type {task!r}")
            tasks[use.name] = task
        return tasks

    def _features(self, req: GenerationRequest, size: tuple[int, int], canvas: tuple[int, int]) -> dict[str, Any]:
        """Each adapter's output, once per call: 4 maps (spatial) or style tokens, in the base's dtype."""
        out: dict[str, Any] = {}
        for use in req.adapters:
            module = self.adapters[use.name]
            if module.kind == "style":
                out[use.name] = module(self._style_tokens(use.condition).to(self.device, module.dtype)).to(self.dtype)
                continue
            x = conditions.condition_on_device(use.condition, module.config.in_channels, size, canvas, self.device,
                                               module.dtype, as_bytes=self.fast)
            out[use.name] = [f.to(self.dtype) for f in module(x)]
        return out

    def _style_tokens(self, image: ConditionInput) -> torch.Tensor:
        item = conditions.style_image(image)
        if isinstance(item, torch.Tensor):
            return item
        if self._style_encoder is None:
            from t2iadapter import extractors

            kwargs = {"model": str(self._style_encoder_source)} if self._style_encoder_source else {}
            self._style_encoder = extractors.get("style", **kwargs)
        return self._style_encoder(item)

    def _sizes(self, req: GenerationRequest) -> tuple[tuple[int, int], tuple[int, int]]:
        """(output size, canvas): the canvas rounds up to `size_multiple`; images are cropped back."""
        w, h = req.size or self.default_size
        m = self.size_multiple
        return (w, h), (math.ceil(w / m) * m, math.ceil(h / m) * m)

    def _denoise(self, req: GenerationRequest, generator: torch.Generator | None, callback: loop.Callback | None,
                 progress: bool) -> tuple[loop.Denoise, int | None, tuple[int, int]]:
        """One request's loop inputs (features, prompts, noise generator, fresh scheduler), its seed and output size."""
        tasks = self._check(req)
        (w, h), canvas = self._sizes(req)
        seed = req.seed
        if seed is None and generator is None:
            seed = random.randrange(2**32)
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(int(seed))
        batch = len(req.prompts) * req.num_images
        cfg = req.guidance_scale > 1.0

        def finish(maps: list[torch.Tensor]) -> list[torch.Tensor]:
            maps = [m.repeat(batch, 1, 1, 1) for m in maps]
            if cfg:
                maps = [torch.cat([m] * 2, dim=0) for m in maps]
            if self.fast:  # one layout for every call (the compiled graph's inputs), the UNet's own
                maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
            return maps

        composition = Composition(self._features(req, (w, h), canvas), {u.name: u.weight for u in req.adapters},
                                  {u.name: u.window for u in req.adapters}, fuser=self.fuser if tasks else None,
                                  tasks=tasks, fuser_windows=req.fuser_windows, finish=finish)
        encode = text.encode_prompts_batched if self.fast else text.encode_prompts
        prompts = encode(self.base, req.prompts, req.negative_prompt, req.num_images, cfg)

        f = self.base.vae_scale_factor
        run = loop.Denoise(self.base, schedulers.make_scheduler(req.scheduler, self.base.scheduler),
                           (batch, self.base.unet.config.in_channels, canvas[1] // f, canvas[0] // f), generator, prompts,
                           composition, req.steps, req.guidance_scale, prompts.added(self.base, canvas, self.device),
                           req.eta, callback, progress)
        return run, seed, (w, h)

    @torch.no_grad()
    def generate(self, req: GenerationRequest, *, generator: torch.Generator | None = None,
                 callback: loop.Callback | None = None, output_type: str = "pil", progress: bool = True) -> GenerationResult:
        """Run one `GenerationRequest`."""
        run, seed, (w, h) = self._denoise(req, generator, callback, progress)
        final = loop.denoise_fast(run) if self.fast else loop.denoise_eager(run)
        images = self.decode(final)[:, :, :h, :w]
        return GenerationResult(self._output(images, output_type), self._parameters(req, seed, (w, h)))

    @torch.no_grad()
    def generate_batch(self, requests: Sequence[GenerationRequest], *, callback: Callable[[int, int], None] | None = None,
                       output_type: str = "pil", progress: bool = False) -> list[GenerationResult]:
        """Run requests that share a UNet call (equal `batch_key()`) as one batch: one UNet call per step for all.

        Everything per request stays per request: prompts, conditions and adapter features, weights, windows,
        seeds (each its own noise generator), scheduler state, VAE decode. Each request's images are bitwise
        the same whatever it is batched with (CPU: see `loop.MIN_ROWS`); they match `generate(request)` to
        float rounding (~1e-6), not bitwise, because `generate` keeps diffusers' exact call shapes.
        `callback(step, total)` runs after each step.
        """
        requests = list(requests)
        if not requests:
            return []
        keys = {self.batch_key(r) for r in requests}
        if len(keys) > 1:
            raise ConfigError(f"these requests cannot share a UNet call (size, steps, scheduler, guidance, eta, compose "
                              f"or adapter set differ): {sorted(map(str, keys))}")
        prepared = [self._denoise(r, None, None, progress and i == 0) for i, r in enumerate(requests)]
        finals = loop.denoise_batch([run for run, _, _ in prepared], fast=self.fast, callback=callback)
        results = []
        for req, (_run, seed, (w, h)), final in zip(requests, prepared, finals):
            images = self.decode(final)[:, :, :h, :w]
            results.append(GenerationResult(self._output(images, output_type), self._parameters(req, seed, (w, h))))
        return results

    def batch_key(self, req: GenerationRequest) -> tuple:
        """Requests with equal keys can share a UNet call (`generate_batch`): the request's key with its size resolved."""
        return req.batch_key(size=self._sizes(req)[0])

    def _parameters(self, req: GenerationRequest, seed: int | None, size: tuple[int, int]) -> dict[str, Any]:
        return {
            "prompt": req.prompt if isinstance(req.prompt, str) else (list(req.prompt) if len(req.prompt) > 1 else req.prompt[0]),
            "negative_prompt": req.negative_prompt if not isinstance(req.negative_prompt, tuple) else list(req.negative_prompt),
            "seed": seed,
            "steps": req.steps,
            "guidance_scale": req.guidance_scale,
            "size": list(size),
            "scheduler": req.scheduler or type(self.base.scheduler).__name__,
            "base": self.base.source,
            "adapters": [u.name for u in req.adapters],
            "weights": [u.weight for u in req.adapters],
            "windows": [[u.window.start, u.window.end] for u in req.adapters],
            "compose": req.compose,
            "num_images": req.num_images,
        }

    @staticmethod
    def _output(images: torch.Tensor, output_type: str) -> list[Any]:
        if output_type == "pt":
            return list(images)
        arr = images.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "np":
            return list(arr)
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]

    def decode(self, latents_: torch.Tensor) -> torch.Tensor:
        """Latents → images in [0, 1] (SDXL's fp16 VAE decodes in fp32 where its config asks)."""
        return latents.decode(self.base.vae, latents_, upcast=self.base.is_sdxl)
