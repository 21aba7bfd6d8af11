"""`AdapterPipeline`: load, move, optimize, generate; a frozen SD1.x/SD2.x/SDXL base plus T2I-Adapters.

`generate(request)` follows diffusers' `StableDiffusion(XL)AdapterPipeline` step for step, so with the
same components and seed the outputs agree; on top it adds per-adapter weights and step windows,
composition by weighted sum or a CoAdapter fuser, the style adapter, 1↔3-channel conversion and any
output size. Adapter features are computed once per call and added to both CFG branches (paper §3.2).

Ownership: adapter modules handed in are copied (the pipeline changes its copies' dtype, device and grad
state, never the caller's); the base is taken over (`to()`/`optimize()` move and compile it in place).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
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
from t2iadapter.bases import BaseModel, load_base, move, placement
from t2iadapter.devices import check_device
from t2iadapter.errors import ConditionError, ConfigError
from t2iadapter.formats import load_adapter
from t2iadapter.generation import (compile_cache, conditions, controlnet, fast, img2img, latents, lora, loop,
                                   schedulers, text)
from t2iadapter.generation.aot import AotStore, aot_default
from t2iadapter.generation.composition import Composition
from t2iadapter.generation.request import OUTPUT_TYPES, AdapterUse, ControlNetUse, GenerationRequest, Window
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


def _adapter_name(source: Any, module: AdapterModule | None, index: int) -> str:
    if isinstance(source, torch.nn.Module):  # ours or a diffusers T2IAdapter
        return getattr(source, "name", None) or f"{module.kind}{index}"
    text_ = str(source).rstrip("/")
    return Path(text_).stem if not text_.startswith("demo/") else text_.split("/", 1)[1]


def task_of(name: str) -> str | None:
    """The fuser task a name refers to (`coadapter-sketch-sd15v1` → `sketch`), if any."""
    for part in re.split(r"[-_/.\s]+", name.lower()):
        if part in TASKS:
            return part
    return None


def resolve_device(device: str | torch.device | None, dtype: str | None) -> tuple[str, torch.dtype]:
    """Device and dtype from their names: cuda when available; fp16 on a GPU, fp32 on the CPU (bf16/fp16/fp32).

    The one device parser (CLI, server, evaluation): an unknown or absent device is one clear ConfigError
    (`devices.check_device`, which the extractors share).
    """
    dev = check_device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    parsed = torch.device(dev)
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    key = dtype or ("fp32" if parsed.type == "cpu" else "fp16")
    if key not in names:
        raise ConfigError(f"unknown dtype {key!r}; choose one of {', '.join(names)}")
    return dev, names[key]


_REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationRequest) if f.name not in ("prompt", "adapters"))
_DIFFUSERS_NAMES = {"num_inference_steps": "steps", "num_images_per_prompt": "num_images"}


def _from_diffusers_names(options: dict[str, Any]) -> dict[str, Any]:
    """diffusers' keyword names → ours (`num_inference_steps` → steps, `height`/`width` → size, ...)."""
    out = dict(options)
    for theirs, ours in _DIFFUSERS_NAMES.items():
        if theirs in out:
            if ours in out:
                raise ConfigError(f"give {ours} or {theirs}, not both")
            out[ours] = out.pop(theirs)
    if "height" in out or "width" in out:
        if out.get("size") is not None:
            raise ConfigError("give size=(width, height) or height=/width=, not both")
        h, w = out.pop("height", None), out.pop("width", None)
        if h is None and w is None:  # diffusers' defaults: the condition's size, else the base's
            return out
        if h is None or w is None:
            raise ConfigError("give both height= and width= (or size=(width, height))")
        out["size"] = (w, h)
    return out


def _is_window_pair(what: str, value: Any) -> bool:
    """`(0.0, 0.5)` as windows: one window (numbers are not windows), for every adapter."""
    return (what == "windows" and isinstance(value, Sequence) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def _as_tuple(value: str | tuple[str, ...] | None, n: int) -> tuple[str, ...] | None:
    return (value,) * n if isinstance(value, str) else value


def _check_output_type(output_type: Any) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ConfigError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")


def _check_callback(callback: Callable) -> None:
    """A callback is called as callback(step, timestep, latents) after each step: say so before the first step."""
    if not callable(callback):
        raise ConfigError(f"callback must be a function (step, timestep, latents), not {type(callback).__name__}")
    try:
        signature = inspect.signature(callback)
    except (ValueError, TypeError):  # no signature to read (some builtins): trust it
        return
    try:
        signature.bind(0, 0, None)
    except TypeError:
        raise ConfigError(f"callback{signature} cannot be called as callback(step, timestep, latents)") from None


def _checked_request(req: Any) -> GenerationRequest:
    if not isinstance(req, GenerationRequest):
        raise ConfigError(f"expected a GenerationRequest (pipe.request(...) makes one), got {type(req).__name__}")
    return req


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
        controlnets: Sequence[Any] | Mapping[str, Any] = (),
    ) -> None:
        self.base = base
        if isinstance(adapters, (str, os.PathLike, torch.nn.Module)):  # one adapter (a string is not a list of them)
            adapters = [adapters]
        items = adapters.items() if isinstance(adapters, Mapping) else [(None, a) for a in adapters]
        self.adapters: dict[str, AdapterModule] = {}
        for i, (name, source) in enumerate(items):
            module = _own(source)
            name = name or _adapter_name(source, module, i)
            if name in self.adapters:
                name = f"{name}-{i}"
            if module.kind == "fuser":
                raise ConfigError(f"{name!r} is a CoAdapter fuser, not an adapter: pass it as the fuser (fuser= in "
                                  "Python, --fuser to generate, eval and serve; compile needs none: it runs eagerly)")
            if module.kind == "style":
                unet_hook.check_style_fits(base.unet, module.config, name)
            else:
                unet_hook.check_adapter_fits(base.unet, module.config, name, vae_scale_factor=base.vae_scale_factor)
            self.adapters[name] = module.requires_grad_(False).eval()
        self.fuser = _own(fuser).requires_grad_(False).eval() if fuser is not None else None
        if self.fuser is not None and self.fuser.kind != "fuser":
            raise ConfigError(f"fuser= must be a CoAdapter fuser checkpoint, got a {self.fuser.kind} adapter")
        self.controlnets = self._load_controlnets(controlnets)
        self._style_encoder_source = style_encoder
        self._style_encoder: Callable | None = style_encoder if callable(style_encoder) else None
        self.fast = False
        self.compile_cache: compile_cache.CompileCache | None = None  # optimize(): compiled graphs as files
        self.loras = lora.Loras(base)
        self._offload: torch.device | None = None  # enable_model_cpu_offload(): the device models run on
        self.to(device=device, dtype=dtype)
        for module in self.modules_to_move():  # adapters run in the base's dtype (checkpoints may be fp16)
            move(module, device=self.device, dtype=self.dtype)

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
        controlnets: Sequence[Any] | Mapping[str, Any] = (),
    ) -> "AdapterPipeline":
        """Load a base (folder, single file, hub id or preset), adapters (paths, names or modules) and ControlNets
        (diffusers folders, single files, hub ids or `ControlNetModel`s)."""
        if not isinstance(base, BaseModel):
            base = load_base(base, config_dir=config_dir)
        return cls(base, adapters, fuser=fuser, style_encoder=style_encoder, device=device, dtype=dtype,
                   controlnets=controlnets)

    def _load_controlnets(self, sources: Sequence[Any] | Mapping[str, Any]) -> dict[str, torch.nn.Module]:
        """ControlNets (issue 16) by name; names are shared with the adapters, so they must differ from them."""
        if isinstance(sources, (str, os.PathLike, torch.nn.Module)):  # one ControlNet, as `adapters=` takes one
            sources = [sources]
        items = sources.items() if isinstance(sources, Mapping) else [(None, c) for c in sources]
        out: dict[str, torch.nn.Module] = {}
        for i, (name, source) in enumerate(items):
            name = name or (f"controlnet{i}" if isinstance(source, torch.nn.Module) else _adapter_name(source, None, i))
            if name in out or name in self.adapters:
                raise ConfigError(f"the name {name!r} is given twice (adapters and ControlNets share names)")
            module = controlnet.load_controlnet(source)
            controlnet.check_fits(self.base.unet, module, name)
            out[name] = module.requires_grad_(False).eval()
        return out

    def to(self, *args: Any, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "AdapterPipeline":
        """Move/cast the base and adapters: `to("cuda")`, `to(torch.float16)`, `to("cuda", torch.float16)`, keywords."""
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device)):
                device = arg
            elif arg is not None:
                raise ConfigError(f"to() takes a device and/or a torch dtype, not {type(arg).__name__}")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise ConfigError(f"dtype must be a torch dtype (torch.float16, torch.bfloat16, torch.float32), "
                              f"not {dtype!r}")
        if device is not None:
            resolve_device(device, None)  # an unknown device, or CUDA where there is none: one clear error
            self._offload = None  # an explicit device ends model CPU offload
        self.base.to(device=device, dtype=dtype)
        for module in self.modules_to_move():
            move(module, device=device, dtype=dtype)
        return self

    def modules_to_move(self) -> list[torch.nn.Module]:
        return list(self.adapters.values()) + ([self.fuser] if self.fuser is not None else []) + list(self.controlnets.values())

    def optimize(self, *, compile: bool = True, dtype: torch.dtype | None = None, precision: str | None = None,
                 mode: str = "reduce-overhead", backend: Any = "inductor", fuse_qkv: bool = True, compile_vae: bool = True,
                 compile_adapters: bool = True, cache_dir: str | os.PathLike | bool | None = None,
                 precompile: bool | None = None, aot: bool | None = None) -> "AdapterPipeline":
        """Fast mode (see `t2iadapter.generation.fast`): bf16/fp16 on GPU, channels-last, SDPA with fused q/k/v,
        compiled UNet (CUDA graphs on GPU), VAE decoder and adapters, and a loop without host syncs.

        Shapes stay static (features of an inactive window are zeros, not absent), so a compiled graph
        is reused across calls of the same size; weights and windows are data, not constants.
        `precision` is bf16, fp16, fp32 or fp8 (the UNet's transformer matmuls in float8 through torchao, on GPUs
        of compute capability 8.9 and up; `generation.fp8`); `dtype` is the older way to say the first three.
        `backend` is any torch.compile backend (the tests count compilations with one); `mode` applies
        to the inductor backend only. Compilation happens on the first call of each size; with inductor the
        compiled graphs are saved to `cache_dir` (default `compile_cache.cache_dir()`, False: no files) and loaded
        by later processes (`generation.compile_cache`, `t2iadapter compile`). `precompile` (default
        $T2IADAPTER_PRECOMPILE) turns on torch's experimental caching precompile, process-wide, so the files also
        spare the next process dynamo's tracing. `aot` (default $T2IADAPTER_AOT) compiles the UNet with AOTInductor
        instead (`generation.aot`): a new process loads it without tracing, at the price of CUDA graphs; the VAE
        decoder and the adapters then run eagerly.
        """
        if mode is not None and mode not in fast.COMPILE_MODES:  # before anything is changed (compile_kwargs checks late)
            raise ConfigError(f"unknown compile mode {mode!r}; choose one of {', '.join(fast.COMPILE_MODES)}")
        name, target = fast.resolve_precision(precision, dtype, self.device)
        if aot is None:  # $T2IADAPTER_AOT: where it applies (an explicit aot=True elsewhere is an error below)
            aot = aot_default() and compile and backend == "inductor" and name != "fp8"
        if aot and (not compile or backend != "inductor"):
            raise ConfigError("aot=True compiles the UNet with AOTInductor: it needs compile=True and the inductor backend")
        if aot and name == "fp8":
            raise ConfigError("fp8 runs through torch.compile only; with aot=True choose bf16, fp16 or fp32")
        self.to(dtype=target)
        self.loras.fuse()  # LoRA layers merged into the weights before fusing q/k/v and compiling
        folder = compile_cache.folder_for(cache_dir) if compile and backend == "inductor" else None
        if precompile is None:
            precompile = compile_cache.precompile_default()
        precompile = bool(precompile and not aot and folder is not None and compile_cache.enable_precompile())
        settings = fast.FastSettings(dtype=target, compile=compile, mode=mode, backend=backend, fuse_qkv=fuse_qkv,
                                     compile_vae=compile_vae, compile_adapters=compile_adapters, precision=name,
                                     precompile=precompile, aot=aot)
        cache = None  # the compiled-graph files, or the packages' store (a temporary folder without cache_dir)
        if aot or folder is not None:
            setup = compile_cache.Setup.of(self.base, self.adapters, self.device, target, name, "aoti" if aot else mode,
                                           precompile, fuse_qkv)
            cache = AotStore(folder, setup) if aot else compile_cache.CompileCache(folder, setup)
        if precompile:
            cache.preload()  # dynamo looks its cache up when torch.compile wraps a module (next lines)
        fast.optimize_base(self.base, settings, aot_store=cache if aot else None)
        fast.optimize_adapters(self.adapters, settings)
        self.fast = True
        self.compile_cache = cache
        return self

    def _compiled_call(self, requests: Sequence[GenerationRequest], *, batched: bool = False):
        """Around a fast-mode call: the compiled-graph cache of its key (loaded before, saved after a compile)."""
        if self.compile_cache is None:
            return contextlib.nullcontext()
        canvas = self._sizes(requests[0])[1]
        images = sum(len(r.prompts) * r.num_images for r in requests)
        return self.compile_cache.first_call(compile_cache.Shape(canvas[0], canvas[1], images,
                                                                 self._cfg(requests[0].guidance_scale), batched))

    def _cfg(self, guidance_scale: float) -> bool:
        """Whether a call runs the unconditional branch: guidance above 1, on a UNet not distilled with the guidance
        scale as an input (LCM's `time_cond_proj_dim`: that one takes `loop.guidance_embedding` instead, as diffusers)."""
        return guidance_scale > 1.0 and self._guidance_dim is None

    @property
    def _guidance_dim(self) -> int | None:
        """The width of the guidance-scale embedding a guidance-distilled UNet takes (None: an ordinary UNet)."""
        return getattr(self.base.unet.config, "time_cond_proj_dim", None)

    def warm_up(self, sizes: Sequence[tuple[int, int]], batches: Sequence[int] = (1,), *, batched: bool = False,
                guidance_scale: float | None = None, steps: int = 2) -> None:
        """Run each size at each number of images once, with every spatial adapter (blank conditions), so fast mode
        compiles (or loads its compiled graphs) before anyone waits; `batched` goes through `generate_batch` (one
        request repeated), as a server does, else through `generate`. With ControlNets loaded, each size and number
        of images runs once more with every ControlNet (the UNet then takes their residuals: another graph), as one
        request of that many images, since a server runs ControlNet requests alone; adapters and ControlNets in one
        request compile on first use."""
        from t2iadapter.generation.request import defaults

        guidance = defaults()["guidance_scale"] if guidance_scale is None else guidance_scale
        if any(not isinstance(s, Sequence) or len(s) != 2 for s in sizes):
            raise ConfigError(f"warm_up sizes are (width, height) pairs, got {list(sizes)!r:.80}")
        for w, h in sizes:
            uses = tuple(AdapterUse(n, Image.new("RGB", (w, h))) for n in self.spatial_names)
            for n in batches:
                if batched:
                    request = GenerationRequest("", uses, steps=steps, size=(w, h), seed=0, guidance_scale=guidance)
                    self.generate_batch([request] * n)
                else:
                    request = GenerationRequest("", uses, steps=steps, size=(w, h), seed=0, num_images=n,
                                                guidance_scale=guidance)
                    self.generate(request, progress=False)
            controls = tuple(ControlNetUse(n, Image.new("RGB", (w, h))) for n in self.controlnets)
            for n in batches if controls else ():
                request = GenerationRequest("", controlnets=controls, steps=steps, size=(w, h), seed=0, num_images=n,
                                            guidance_scale=guidance)
                self.generate_batch([request]) if batched else self.generate(request, progress=False)

    def load_lora(self, source: str | os.PathLike | dict, *, scale: float = 1.0, name: str | None = None,
                  **kwargs: Any) -> str:
        """Load a LoRA into the base (diffusers/peft or kohya format; file, folder, hub id) through diffusers' loaders.

        Several LoRAs act together, each at its own scale; returns its name (default: the file's stem).
        Load them before `optimize()`: fast mode fuses them into the weights. Needs peft.
        """
        return self.loras.load(source, scale=scale, name=name, **kwargs)

    def unload_lora(self, name: str) -> None:
        """Remove one loaded LoRA (the others keep their scales)."""
        self.loras.unload(name)

    def enable_model_cpu_offload(self, device: str | torch.device = "cuda") -> "AdapterPipeline":
        """diffusers' model CPU offload: every model waits on the CPU and moves to `device` only while it runs.

        One stage at a time (text encoders, adapters, UNet, VAE), so the GPU holds one model: the UNet's
        memory, not the whole pipeline's, at the price of a transfer per stage. `to(device)` ends it.
        """
        if self.fast:
            raise ConfigError("model CPU offload and optimize() (compiled, on-device models) do not go together")
        self._offload = torch.device(resolve_device(device, None)[0])
        self.base.to(device="cpu")
        for module in self.modules_to_move():
            module.to(device="cpu")
        return self

    @contextlib.contextmanager
    def _running(self, *modules: torch.nn.Module | None):
        """With CPU offload: `modules` on the execution device for the block, back on the CPU after it."""
        if self._offload is None:
            yield
            return
        moving = [m for m in modules if m is not None]
        for m in moving:
            m.to(self._offload)
        try:
            yield
        finally:
            for m in moving:
                m.to("cpu")
            if self._offload.type == "cuda":
                torch.cuda.empty_cache()

    @property
    def device(self) -> torch.device:
        """Where the models run (with CPU offload: the execution device, not where they wait)."""
        return self._offload if self._offload is not None else placement(self.base.unet)[0]

    @property
    def dtype(self) -> torch.dtype:
        return placement(self.base.unet)[1]

    @property
    def spatial_names(self) -> list[str]:
        return [n for n, m in self.adapters.items() if m.kind != "style"]

    @property
    def style_names(self) -> list[str]:
        return [n for n, m in self.adapters.items() if m.kind == "style"]

    @property
    def default_size(self) -> tuple[int, int]:
        return self.base.default_size

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
            unknown = set(value) - set(self.adapters) - set(self.controlnets)
            if unknown:
                raise ConfigError(f"{what} names unknown adapters {sorted(unknown)}; loaded: "
                                  f"{list(self.adapters) + list(self.controlnets)}")
            return {n: value.get(n, default) for n in names}
        if isinstance(value, (str, bytes, Window)) or not isinstance(value, Sequence) or _is_window_pair(what, value):
            return {n: value for n in names}  # one value for every adapter (a window pair is one window)
        if len(value) != len(names):
            raise ConfigError(f"got {len(value)} {what} for {len(names)} adapters ({', '.join(names) or 'none'})")
        return dict(zip(names, value))

    def request(self, prompt: str | Sequence[str], conditions: Any = None, *, weights: Any = None, windows: Any = None,
                style_image: ConditionInput | None = None, **options: Any) -> GenerationRequest:
        """The `GenerationRequest` of a keyword call: conditions by list (one per spatial adapter, then one per
        ControlNet) or by name; weights and windows likewise (a ControlNet's weight is diffusers'
        `controlnet_conditioning_scale`).

        diffusers' names are understood too (`image`, `height`/`width`, `num_inference_steps`,
        `num_images_per_prompt`, `adapter_conditioning_scale` for the adapters and `controlnet_conditioning_scale`
        for the ControlNets, each one value or one per model of its kind); one condition list for one adapter with one
        image per prompt is a batch of per-prompt conditions, as diffusers' `image=[...]`.
        """
        options = _from_diffusers_names(options)
        if "image" in options:
            if conditions is not None:
                raise ConfigError("give the condition images once: as `conditions` or as diffusers' `image`, not both")
            conditions = options.pop("image")
        scales = {}  # diffusers' scales of one kind of model each: the other kind keeps its default weight
        for key in ("adapter_conditioning_scale", "controlnet_conditioning_scale"):
            if key in options:
                if weights is not None:
                    raise ConfigError(f"give weights or diffusers' {key}, not both")
                scales[key] = options.pop(key)
        unknown = set(options) - set(_REQUEST_FIELDS)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))}; options are {', '.join(_REQUEST_FIELDS)} "
                              "and generator, latents, prompt_embeds, negative_prompt_embeds, output_type, callback")
        if not isinstance(prompt, (str, Sequence)):
            raise ConfigError(f"prompt must be a string or a list of strings, not {type(prompt).__name__}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        names = self.spatial_names + list(self.controlnets)
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
            elif not isinstance(conditions, Sequence):
                raise ConditionError(f"conditions are an image, a path, a list (one per spatial adapter) or a dict by "
                                     f"adapter name, not {type(conditions).__name__}")
            conditions = list(conditions)
            if len(names) == 1 and len(conditions) == len(prompts) > 1 and not any(
                    isinstance(c, (list, tuple)) for c in conditions):
                conditions = [conditions]  # one adapter, one condition per prompt (diffusers' batched `image`)
            if len(conditions) != len(names):
                raise ConditionError(f"got {len(conditions)} condition images for {len(names)} spatial adapters and "
                                     f"ControlNets ({', '.join(names) or 'none'})")
            cond_of = dict(zip(names, conditions))
        if style_image is not None:
            if not self.style_names:
                raise ConfigError("style_image given but no style adapter is loaded")
            cond_of.update({n: style_image for n in self.style_names})
        used = list(cond_of)
        if scales:
            adapters = [n for n in used if n not in self.controlnets]
            controlnets = [n for n in used if n in self.controlnets]
            weights = {**self._align(scales.get("adapter_conditioning_scale"), adapters, "adapter_conditioning_scale", 1.0),
                       **self._align(scales.get("controlnet_conditioning_scale"), controlnets,
                                     "controlnet_conditioning_scale", 1.0)}
        weight_of = self._align(weights, used, "weights", 1.0)
        window_of = self._align(windows, used, "windows", None)
        uses = tuple(AdapterUse(n, tuple(c) if isinstance(c, list) else c, weight_of[n], Window.parse(window_of[n]))
                     for n, c in cond_of.items() if n not in self.controlnets)
        if any(n in self.controlnets for n in used):
            options["controlnets"] = tuple(ControlNetUse(n, cond_of[n], weight_of[n], Window.parse(window_of[n]))
                                           for n in used if n in self.controlnets)
        return GenerationRequest(prompt if isinstance(prompt, str) else tuple(prompt), uses, **options)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] | None = None, conditions: Any = None, *, weights: Any = None,
                 windows: Any = None, style_image: ConditionInput | None = None, generator: Any = None,
                 callback: loop.Callback | None = None, output_type: str = "pil", progress: bool = True,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, **options: Any) -> GenerationResult:
        """Generate images; `options` are `GenerationRequest` fields (steps, guidance_scale, size, seed, ...).

        As diffusers: `generator` may be a list (one per image), `latents` the initial noise, `prompt_embeds`
        (and SDXL's `pooled_prompt_embeds`) replace the prompt, `output_type` is pil, np, pt or latent.
        """
        given = self._given_embeds(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                   negative_pooled_prompt_embeds)
        if prompt is None:
            if given is None:
                raise ConfigError("give a prompt (or prompt_embeds)")
            prompt = [""] * given.text.context.shape[0]
        elif given is not None:
            raise ConfigError("give either a prompt or prompt_embeds, not both")
        req = self.request(prompt, conditions, weights=weights, windows=windows, style_image=style_image, **options)
        size = self._condition_size(req)
        if size is not None:  # re-checked against the request's size range
            req = dataclasses.replace(req, size=size)
        return self.generate(req, generator=generator, callback=callback, output_type=output_type, progress=progress,
                             latents=latents, prompt_embeds=given)

    def _given_embeds(self, text_: Any, negative: Any, pooled: Any, negative_pooled: Any) -> "text.GivenEmbeds | None":
        """Caller-computed prompt embeddings as `TextContext`s (SDXL needs the pooled ones with them, as diffusers)."""
        if text_ is None:
            if negative is not None or pooled is not None:
                raise ConfigError("negative_prompt_embeds / pooled_prompt_embeds go with prompt_embeds")
            return None
        from t2iadapter.bases import TextContext

        def context(x: Any, p: Any, what: str) -> TextContext:
            if not isinstance(x, torch.Tensor) or x.ndim != 3:
                raise ConfigError(f"{what} must be a [batch, tokens, width] tensor")
            width = self.base.unet.config.cross_attention_dim
            if x.shape[-1] != width:
                raise ConfigError(f"{what} are {x.shape[-1]} wide; this base's text width is {width}")
            if self.base.is_sdxl and p is None:
                raise ConfigError(f"an SDXL base needs pooled_{what} with {what} (as diffusers)")
            if not self.base.is_sdxl and p is not None:
                raise ConfigError(f"pooled_{what} are for SDXL bases; this base has one text encoder")
            return TextContext(x.to(self.device, self.dtype), None if p is None else p.to(self.device, self.dtype))

        text_ctx = context(text_, pooled, "prompt_embeds")
        neg_ctx = None if negative is None else context(negative, negative_pooled, "negative_prompt_embeds")
        if neg_ctx is not None and neg_ctx.context.shape != text_ctx.context.shape:
            raise ConfigError(f"negative_prompt_embeds {tuple(neg_ctx.context.shape)} must have prompt_embeds' shape "
                              f"{tuple(text_ctx.context.shape)}")
        return text.GivenEmbeds(text_ctx, neg_ctx)

    # ------------------------------------------------------------------ generate

    def _check(self, req: GenerationRequest) -> dict[str, str]:
        """Every adapter named is loaded; options fit the base and scheduler; with the fuser, each adapter's
        condition type (task) is known."""
        if not self.base.is_sdxl:
            for name in ("prompt_2", "negative_prompt_2", "original_size"):
                if getattr(req, name) is not None:
                    raise ConfigError(f"{name} is for SDXL bases (two text encoders); this base is not SDXL")
        if req.clip_skip:
            layers = min(enc.config.num_hidden_layers for enc in (self.base.text_encoder, self.base.text_encoder_2)
                         if enc is not None)
            if req.clip_skip >= layers:
                raise ConfigError(f"clip_skip {req.clip_skip} skips every layer of this base's {layers}-layer text "
                                  f"encoder; use 0..{layers - 1}")
        scheduler = schedulers.scheduler_class(req.scheduler, self.base.scheduler) if req.eta else None
        if scheduler is not None and "eta" not in inspect.signature(scheduler.step).parameters:
            name = req.scheduler if isinstance(req.scheduler, str) else scheduler.__name__
            raise ConfigError(f"eta={req.eta:g} has no effect with the scheduler {name}; use scheduler='ddim' (or eta=0)")
        for use in req.adapters:
            if use.name not in self.adapters:
                raise ConditionError(f"no adapter named {use.name!r} is loaded; loaded: {list(self.adapters)}")
        for use in req.controlnets:
            if use.name not in self.controlnets:
                raise ConditionError(f"no ControlNet named {use.name!r} is loaded; loaded: {list(self.controlnets)}")
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
            items = use.condition if isinstance(use.condition, tuple) else (use.condition,)  # one, or one per prompt
            x = torch.cat([conditions.condition_on_device(c, module.config.in_channels, size, canvas, self.device,
                                                          module.dtype, as_bytes=self.fast) for c in items])
            out[use.name] = [f.to(self.dtype) for f in module(x)]
        return out

    def load_style_encoder(self) -> None:
        """Load the CLIP-vision encoder that turns a style reference into tokens now, not at the first style request
        (a server does this at start-up); raises `MissingWeightsError` when its weights are not available."""
        encoder = self._style_encoder_fn()
        if callable(getattr(encoder, "load", None)):
            encoder.load()

    def _style_encoder_fn(self) -> Callable:
        if self._style_encoder is None:
            from t2iadapter import extractors

            kwargs = {"model": str(self._style_encoder_source)} if self._style_encoder_source else {}
            self._style_encoder = extractors.get("style", **kwargs)
        return self._style_encoder

    def _style_tokens(self, image: ConditionInput) -> torch.Tensor:
        item = conditions.style_image(image)
        if isinstance(item, torch.Tensor):
            return item
        return self._style_encoder_fn()(item)

    def _sizes(self, req: GenerationRequest) -> tuple[tuple[int, int], tuple[int, int]]:
        """(output size, canvas): the canvas rounds up to `size_multiple`; images are cropped back.

        The output size is the request's, else the init image's (rounded down to the VAE's factor), else the base's.
        (The keyword call, diffusers' habit, first takes the condition's size: `_condition_size`.)
        """
        w, h = req.size or (img2img.image_size(req.init_image, self.base.vae_scale_factor)
                            if req.init_image is not None else self.default_size)
        m = self.size_multiple
        return (w, h), (math.ceil(w / m) * m, math.ceil(h / m) * m)

    def _condition_size(self, req: GenerationRequest) -> tuple[int, int] | None:
        """diffusers' default height/width: the first spatial adapter's condition, rounded down to its adapter's
        pixel-unshuffle factor (the adapter pipelines), else the first ControlNet's, rounded down to the VAE's factor
        (the ControlNet pipelines); None: the request has a size or an init image, or no spatial condition."""
        if req.size is not None or req.init_image is not None:
            return None
        use = next((u for u in req.adapters if u.name in self.spatial_names), None)
        if use is not None:
            factor = self.adapters[use.name].config.downscale_factor
        elif req.controlnets:
            use, factor = req.controlnets[0], self.base.vae_scale_factor
        else:
            return None
        item = use.condition[0] if isinstance(use.condition, (list, tuple)) else use.condition
        return img2img.image_size(item, factor, "condition image")

    @torch.no_grad()
    def generate(self, req: GenerationRequest, *, generator: Any = None, callback: loop.Callback | None = None,
                 output_type: str = "pil", progress: bool = True, latents: torch.Tensor | None = None,
                 prompt_embeds: "text.GivenEmbeds | None" = None) -> GenerationResult:
        """Run one `GenerationRequest` (`generator`, `latents`, `prompt_embeds`: see `__call__`)."""
        _check_output_type(output_type)
        if callback is not None:
            _check_callback(callback)
        with self._compiled_call([_checked_request(req)]):
            run, seed, (w, h), source = self._denoise(req, generator, callback, progress, latents, prompt_embeds)
            # fuser_windows="active" re-fuses per step; ControlNets run every step; img2img encodes its image as the
            # loop starts (the generator draws in diffusers' order: image, noise, masked image)
            with self._running(self.base.unet, self.fuser, *self.controlnets.values(),
                               self.base.vae if source is not None else None):
                final = loop.denoise_fast(run) if self.fast else loop.denoise_eager(run)
            params = self._parameters(req, seed, (w, h))
            if output_type == "latent":
                return GenerationResult(list(final), params)
            with self._running(self.base.vae):
                images = self.decode(final)
        if source is not None and req.paste_back:
            images = source.paste(images)
        images = images[:, :, :h, :w]
        return GenerationResult(self._output(images, output_type), params)

    def _denoise(self, req: GenerationRequest, generator: Any, callback: loop.Callback | None, progress: bool,
                 latents: torch.Tensor | None = None, prompt_embeds: "text.GivenEmbeds | None" = None,
                 ) -> tuple[loop.Denoise, int | None, tuple[int, int], img2img.Source | None]:
        """One request's loop inputs (features, prompts, noise, fresh scheduler, ControlNets, start image), its seed,
        output size and start image; `generate` runs it alone, `generate_batch` with others."""
        tasks = self._check(req)
        (w, h), canvas = self._sizes(req)
        source = self._source(req, (w, h), canvas)  # (encoded as the loop starts: the VAE runs with the UNet then)
        batch = len(req.prompts) * req.num_images
        f = self.base.vae_scale_factor
        shape = (batch, self.base.vae.config.latent_channels, canvas[1] // f, canvas[0] // f)
        seed = req.seed
        if seed is not None and generator is not None:
            raise ConfigError("give seed or generator, not both (the generator would decide the noise, not the seed)")
        if seed is None and generator is None:
            seed = random.randrange(2**32)
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(int(seed))
        if latents is not None and source is not None:
            raise ConfigError("latents= is text-to-image's starting noise; with init_image the start is the image's "
                              "latents noised from the seed or generator: give one of the two")
        if isinstance(generator, (list, tuple)):
            if source is not None:
                raise ConfigError("a list of generators is for text-to-image; give one generator with init_image")
            if len(generator) != batch:
                raise ConfigError(f"got {len(generator)} generators for {batch} images; give one, or one per image")
            if latents is None:  # diffusers: each image's noise from its own generator
                from diffusers.utils.torch_utils import randn_tensor

                latents = randn_tensor(shape, generator=list(generator), device=torch.device("cpu"), dtype=torch.float32)
            generator = list(generator)
        elif not isinstance(generator, torch.Generator):
            raise ConfigError(f"generator must be a torch.Generator or a list of them, not {type(generator).__name__}")
        if latents is not None and (not isinstance(latents, torch.Tensor) or not latents.is_floating_point()):
            what = getattr(latents, "dtype", type(latents).__name__)
            raise ConfigError(f"latents must be a float torch tensor, not {what}")
        if latents is not None and not torch.isfinite(latents).all():
            raise ConfigError("latents contain NaN or infinite values")
        if latents is not None and tuple(latents.shape) != shape:
            raise ConfigError(f"latents must have shape {shape} (images, channels, height/{f}, width/{f} of the "
                              f"{canvas[0]}x{canvas[1]} canvas), got {tuple(latents.shape)}")
        cfg = self._cfg(req.guidance_scale)
        proj = self._guidance_dim
        guidance_cond = None if proj is None else \
            loop.guidance_embedding(req.guidance_scale, proj, batch).to(self.device, self.dtype)
        self._warn_unknown_words(req)

        def finish(maps: list[torch.Tensor]) -> list[torch.Tensor]:
            # one condition for all prompts: repeat; one per prompt: each prompt's images in a row, as the text
            maps = [m.repeat(batch, 1, 1, 1) if m.shape[0] == 1 else m.repeat_interleave(req.num_images, dim=0)
                    for m in maps]
            if cfg:
                maps = [torch.cat([m] * 2, dim=0) for m in maps]
            if self.fast:  # one layout for every call (the compiled graph's inputs), the UNet's own
                maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
            return maps

        with self._running(*[self.adapters[u.name] for u in req.adapters], self.fuser):  # the fuser may run here
            composition = Composition(self._features(req, (w, h), canvas), {u.name: u.weight for u in req.adapters},
                                      {u.name: u.window for u in req.adapters}, fuser=self.fuser if tasks else None,
                                      tasks=tasks, fuser_windows=req.fuser_windows, finish=finish)
        plain = req.clip_skip is None and req.prompt_2 is None and req.negative_prompt_2 is None and prompt_embeds is None
        with self._running(self.base.text_encoder, self.base.text_encoder_2):
            if self.fast and plain:
                prompts = text.encode_prompts_batched(self.base, req.prompts, req.negative_prompt, req.num_images, cfg)
            else:
                prompts = text.encode_prompts(self.base, req.prompts, req.negative_prompt, req.num_images, cfg,
                                              clip_skip=req.clip_skip,
                                              prompts_2=_as_tuple(req.prompt_2, len(req.prompts)),
                                              negative_2=req.negative_prompt_2, given=prompt_embeds)

        run = loop.Denoise(self.base, schedulers.make_scheduler(req.scheduler, self.base.scheduler), shape, generator,
                           prompts, composition, req.run_steps, req.guidance_scale,
                           prompts.added(self.base, canvas, self.device, req.original_size), req.eta, callback, progress,
                           controlnets=self._controlnets(req, (w, h), canvas, batch, cfg), source=source, latents=latents,
                           guidance_cond=guidance_cond)
        return run, seed, (w, h), source

    def _warn_unknown_words(self, req: GenerationRequest) -> None:
        """A word-list tokenizer (the demo base) spells unknown words letter by letter: say so.

        Not for the tiny presets: their text encoders are random test models, every word is noise there.
        """
        if self.base.source in ("tiny", "tiny-xl"):
            return
        unknown = text.unknown_words(self.base, req.prompts)
        if unknown:
            log.warning("the base %s does not know the word(s) %s; they act as noise (its words: "
                        "t2iadapter.demo.world.VOCABULARY)", self.base.source, ", ".join(unknown))

    def _controlnets(self, req: GenerationRequest, size: tuple[int, int], canvas: tuple[int, int], batch: int,
                     cfg: bool) -> controlnet.ControlNets:
        """The call's ControlNets with their condition images resized as the adapters' (issue 16)."""
        def on_device(cond: Any, channels: int) -> torch.Tensor:
            return conditions.condition_on_device(cond, channels, size, canvas, self.device, self.dtype)

        return controlnet.prepare(self.controlnets, req.controlnets, on_device, batch, cfg)

    def _source(self, req: GenerationRequest, size: tuple[int, int], canvas: tuple[int, int]) -> img2img.Source | None:
        """The image (and mask) to start from; an inpainting UNet without a mask is refused."""
        channels = self.base.unet.config.in_channels
        if req.init_image is None:
            if channels == img2img.INPAINT_UNET_CHANNELS:
                raise ConfigError("this base has an inpainting UNet (9 input channels); give init_image and "
                                  "mask_image (white = repaint)")
            return None
        return img2img.prepare(req.init_image, req.mask_image, req.denoise_strength, req.steps, size, canvas,
                               self.base.vae_scale_factor, channels)

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
        _check_output_type(output_type)
        requests = [_checked_request(r) for r in requests]
        if not requests:
            return []
        keys = {self.batch_key(r) for r in requests}
        if keys == {None} and len(requests) == 1:  # a request outside the batched loop runs as `generate` runs it
            req = requests[0]
            step = None if callback is None else (lambda i, _t, _latents: callback(i, req.run_steps))
            return [self.generate(req, callback=step, output_type=output_type, progress=progress)]
        if None in keys:
            raise ConfigError("img2img, inpainting, ControlNets, clip_skip and SDXL's prompt_2/original_size run one "
                              "request at a time (batch_key None); generate them alone")
        if len(keys) > 1:
            raise ConfigError(f"these requests cannot share a UNet call (size, steps, scheduler, guidance, eta, compose "
                              f"or adapter set differ): {sorted(map(str, keys))}")
        with self._compiled_call(requests, batched=True):
            prepared = [self._denoise(r, None, None, progress and i == 0) for i, r in enumerate(requests)]
            finals = loop.denoise_batch([run for run, _, _, _ in prepared], fast=self.fast, callback=callback)
            decoded = finals if output_type == "latent" else [self.decode(final) for final in finals]
        results = []
        for req, (_run, seed, (w, h), _source), images in zip(requests, prepared, decoded):
            out = list(images) if output_type == "latent" else self._output(images[:, :, :h, :w], output_type)
            results.append(GenerationResult(out, self._parameters(req, seed, (w, h))))
        return results

    def batch_key(self, req: GenerationRequest) -> tuple | None:
        """Requests with equal keys can share a UNet call (`generate_batch`): the request's key with its size resolved.

        None: the request runs alone — img2img/inpainting, ControlNets, `clip_skip` and SDXL's second prompts or
        original size are outside the batched loop.
        """
        alone = (req.init_image is not None or req.controlnets or req.clip_skip or req.prompt_2 is not None
                 or req.negative_prompt_2 is not None or req.original_size is not None)
        return None if alone else req.batch_key(size=self._sizes(req)[0])

    def _parameters(self, req: GenerationRequest, seed: int | None, size: tuple[int, int]) -> dict[str, Any]:
        source = {} if req.init_image is None else {"strength": req.denoise_strength, "inpaint": req.mask_image is not None,
                                                     "paste_back": req.paste_back}
        return {
            "prompt": req.prompt if isinstance(req.prompt, str) else (list(req.prompt) if len(req.prompt) > 1 else req.prompt[0]),
            "negative_prompt": req.negative_prompt if not isinstance(req.negative_prompt, tuple) else list(req.negative_prompt),
            "seed": seed,
            "steps": req.steps,
            "guidance_scale": req.guidance_scale,
            "size": list(size),
            "scheduler": req.scheduler if isinstance(req.scheduler, str) else type(req.scheduler or self.base.scheduler).__name__,
            "base": self.base.source,
            "adapters": [u.name for u in req.adapters],
            "weights": [u.weight for u in req.adapters],
            "windows": [[u.window.start, u.window.end] for u in req.adapters],
            "compose": req.compose,
            "num_images": req.num_images,
            **({"eta": req.eta} if req.eta else {}),
            **({"controlnets": [{"name": u.name, "weight": u.weight, "window": [u.window.start, u.window.end]}
                                for u in req.controlnets]} if req.controlnets else {}),
            **({"loras": dict(self.loras.scales)} if self.loras.scales else {}),
            **source,
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
