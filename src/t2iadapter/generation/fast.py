"""Fast mode (issue 7, `AdapterPipeline.optimize()`): half precision, channels-last, SDPA, torch.compile with static shapes, CUDA graphs.

What `optimize()` sets up, and what the fast denoising loop (`loop.denoise_fast`) does with it:
- weights in bf16 (fp16 where the card lacks bf16) on GPU; every conv net in channels-last memory;
  with `precision="fp8"` the UNet's transformer matmuls in float8 (`generation.fp8`, torchao; GPUs of compute
  capability 8.9 and up);
- attention through PyTorch's fused SDPA (flash / memory-efficient kernels), q/k/v in one matmul;
- the UNet, the VAE decoder and the spatial adapters wrapped in `torch.compile` with `dynamic=False`;
  the UNet with CUDA graphs (`reduce-overhead`), so a 30-step loop is 30 graph replays;
- every step of a call has the same UNet inputs: features of an adapter outside its window are
  zeros, not absent (a call without spatial adapters passes zeros too, so it shares the graph), and
  adapter weights are applied before the UNet, so weights and windows are data, never graph
  constants; a call of the same size and batch reuses the compiled graphs;
- no host synchronisation inside the loop: the scheduler does its arithmetic on host numbers
  (timesteps and sigmas on the CPU), the UNet gets device timesteps prepared before the loop.
  Ancestral/SDE samplers still draw their per-step noise with the CPU generator (as diffusers does).
If compiling fails, the module runs eagerly and one warning is logged (`CompiledForward.error`).
Compiled graphs are saved as files and loaded by later processes (`generation.compile_cache`, issue 18).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from t2iadapter.errors import ConfigError
from t2iadapter.generation.aot import AotUnet

log = logging.getLogger(__name__)

# The modes torch.compile knows; "reduce-overhead" and "max-autotune" add CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# optimize(precision=...): the networks' dtype, or fp8 (bf16 networks, the UNet's transformer matmuls in float8)
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.bfloat16}


@dataclass(frozen=True)
class FastSettings:
    """How `optimize()` prepared a base; a second pipeline on the same base reuses its compiled modules."""

    dtype: torch.dtype
    compile: bool = True
    mode: str = "reduce-overhead"  # UNet: inductor + CUDA graphs; decoder/adapters get the no-cudagraphs variant
    backend: Any = "inductor"  # any torch.compile backend; tests pass a counting backend
    fuse_qkv: bool = True  # one q/k/v projection matmul per attention layer (copies of the weights)
    compile_vae: bool = True
    compile_adapters: bool = True
    precision: str = ""  # bf16 | fp16 | fp32 | fp8 ("" : the dtype's name)
    precompile: bool = False  # torch's caching precompile (compile_cache.enable_precompile) was on when compiled
    aot: bool = False  # the UNet through AOTInductor packages (`generation.aot`); decoder and adapters eager

    @property
    def fp8(self) -> bool:
        return self.precision == "fp8"


def precision_name(dtype: torch.dtype) -> str:
    """bf16 / fp16 / fp32 for a torch dtype."""
    return next(name for name, d in PRECISIONS.items() if d == dtype and name != "fp8")


def resolve_precision(precision: str | None, dtype: torch.dtype | None, device: torch.device) -> tuple[str, torch.dtype]:
    """(precision name, networks' dtype) of `optimize(precision=, dtype=)`: fp8 is refused where it cannot run."""
    if precision is None:
        target = dtype or default_dtype(device)
        if target not in PRECISIONS.values():
            raise ConfigError(f"fast mode runs in bf16, fp16 or fp32, not {target}")
        return precision_name(target), target
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if dtype is not None and dtype != PRECISIONS[precision]:
        raise ConfigError(f"precision={precision!r} runs the networks in {precision_name(PRECISIONS[precision])}; "
                          f"dtype={str(dtype).replace('torch.', '')} contradicts it (give one of them)")
    if precision == "fp8":
        from t2iadapter.generation import fp8

        fp8.check_supported(device)
    return precision, PRECISIONS[precision]


def compile_kwargs(backend: Any, mode: str | None, *, cudagraphs: bool) -> dict[str, Any]:
    """torch.compile keyword arguments: inductor gets the mode's options (+1x1 convs as matmuls); others none."""
    if backend != "inductor":
        return {"backend": backend}
    mode = mode or "default"
    if mode not in COMPILE_MODES:
        raise ConfigError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    import torch._inductor

    options = dict(torch._inductor.list_mode_options(mode))
    options["conv_1x1_as_mm"] = True  # 1x1 convs (proj_in/out, shortcuts) become matmuls with fused epilogues
    if not cudagraphs:
        options["triton.cudagraphs"] = False
    return {"backend": "inductor", "options": options}


def _fresh(value: Any) -> Any:
    """A shallow copy of lists/dicts, so a failed compiled call cannot leave a popped list for the eager retry."""
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


class CompiledForward:
    """A module's forward through torch.compile; on any compile/run failure, eager from then on (one warning)."""

    def __init__(self, eager, name: str, **compile_kw: Any) -> None:
        self.eager = eager
        self.name = name
        self.compiled = torch.compile(eager, dynamic=False, **compile_kw)
        self.error: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.error is None:
            try:
                return self.compiled(*args, **{k: _fresh(v) for k, v in kwargs.items()})
            except Exception as exc:  # noqa: BLE001 - any compiler failure: keep generating, eagerly
                cause = exc.__cause__ or exc  # dynamo wraps a backend's own error as BackendCompilerFailed
                self.error = f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
                log.warning("torch.compile of %s failed (%s); it runs eagerly from now on", self.name, self.error)
        return self.eager(*args, **kwargs)


def eager_forward(module: torch.nn.Module):
    """The module's own forward, under any CompiledForward or AotUnet wrapper."""
    fwd = module.forward
    return fwd.eager if isinstance(fwd, (CompiledForward, AotUnet)) else fwd


def uncompile(module: torch.nn.Module) -> None:
    """The module's own forward again: the CompiledForward or AotUnet `optimize()` installed is taken off."""
    wrapper = module.__dict__.get("forward")
    if isinstance(wrapper, (CompiledForward, AotUnet)):
        del module.forward  # the class's forward
        if wrapper.eager != module.forward:  # another instance forward was there before the wrapper: it again
            module.forward = wrapper.eager


def compile_module(module: torch.nn.Module, name: str, settings: FastSettings, *, cudagraphs: bool) -> CompiledForward:
    """Replace `module.forward` (an instance attribute, so `module(...)` uses it) by a compiled wrapper."""
    wrapper = CompiledForward(eager_forward(module), name,
                              **compile_kwargs(settings.backend, settings.mode, cudagraphs=cudagraphs))
    module.forward = wrapper
    return wrapper


def compiled_modules(base: Any, adapters: Mapping[str, torch.nn.Module] = {}) -> dict[str, CompiledForward]:
    """Name → wrapper of every compiled module of a base and the given adapters."""
    found = {}
    for name, module in [("unet", base.unet), ("vae.decoder", base.vae.decoder)] + [(f"adapter:{n}", m) for n, m in adapters.items()]:
        if isinstance(module.forward, CompiledForward):
            found[name] = module.forward
    return found


def status(pipe: Any) -> dict[str, Any]:
    """What fast mode did to a pipeline: settings, compiled modules and any compile failure (for logs/benchmarks)."""
    settings = pipe.base.extras.get("fast")
    aot = pipe.base.unet.forward if isinstance(pipe.base.unet.forward, AotUnet) else None
    return {
        "fast": bool(getattr(pipe, "fast", False)),
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "settings": None if settings is None else {"compile": settings.compile, "mode": settings.mode,
                                                   "backend": str(settings.backend), "fuse_qkv": settings.fuse_qkv,
                                                   "precision": settings.precision},
        "compiled": {n: (w.error or "ok") for n, w in compiled_modules(pipe.base, pipe.adapters).items()},
        "aot": None if aot is None else (aot.error or "ok"),  # the UNet through AOTInductor: ok or its failure
    }


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def optimize_base(base: Any, settings: FastSettings, aot_store: Any = None) -> None:
    """Fast mode for the shared base (once per base and settings): SDPA, fused QKV, channels-last, compile (the UNet
    through `aot_store`'s AOTInductor packages when `settings.aot`)."""
    from t2iadapter import unet_hook

    previous = base.extras.get("fast")
    if previous == settings:
        return
    if previous is not None:
        changed = ", ".join(f"{f.name} {getattr(previous, f.name)} → {getattr(settings, f.name)}" for f in fields(settings)
                            if getattr(previous, f.name) != getattr(settings, f.name))
        # a warning, not an error (switching on purpose is allowed), since compiling again can take minutes
        log.warning("optimize() again on a base already optimized with other settings (%s): its modules are "
                    "prepared and compiled again", changed)
        if previous.fp8 and not settings.fp8:
            raise ConfigError("this base's UNet runs in fp8 (its bf16 weights were let go); load the base again for "
                              f"{settings.precision}")
    quantized = previous is not None and previous.fp8  # attention already set up and quantized: keep it as it is
    if quantized and previous.fuse_qkv != settings.fuse_qkv:
        raise ConfigError(f"this base's fp8 UNet was made with fuse_qkv={previous.fuse_qkv}; load the base again to change it")
    unet, vae = base.unet, base.vae
    if not quantized:
        unet_hook.use_sdpa(unet, fused_qkv=settings.fuse_qkv)
    unet.to(memory_format=torch.channels_last)
    vae.to(memory_format=torch.channels_last)
    if settings.fp8 and not quantized:
        from t2iadapter.generation import fp8

        # a new module sharing the other tensors; the UNet handed in keeps its weights (and, if nobody else holds
        # it, is let go with them)
        base.unet, _ = fp8.quantize_unet(unet)
        unet = base.unet
    if settings.compile and settings.aot:
        unet.forward = AotUnet(eager_forward(unet), unet, aot_store)
    elif settings.compile:
        cudagraphs = unet.device.type == "cuda"
        compile_module(unet, "unet", settings, cudagraphs=cudagraphs)
    else:  # a wrapper an earlier optimize() installed comes off
        uncompile(unet)
    if settings.compile and settings.compile_vae and not settings.aot:
        compile_module(vae.decoder, "vae.decoder", settings, cudagraphs=False)
    else:
        uncompile(vae.decoder)
    base.extras["fast"] = settings


def optimize_adapters(adapters: Mapping[str, Any], settings: FastSettings) -> None:
    """Spatial adapters in channels-last, compiled without CUDA graphs (they run once per call)."""
    for name, module in adapters.items():
        if module.kind not in ("full", "full_xl", "light"):
            continue  # style adapter and fuser: small transformers on a few tokens, run once; eager is fine
        module.to(memory_format=torch.channels_last)
        if not (settings.compile and settings.compile_adapters and not settings.aot):
            uncompile(module)  # compiled by an earlier optimize(): eager again
        elif not isinstance(module.forward, CompiledForward):
            compile_module(module, f"adapter:{name}", settings, cudagraphs=False)


# ---------------------------------------------------------------------------------------------
# pieces of the pipeline's fast path


class LoopClock:
    """Host-sync-free timestep feed: the scheduler keeps host values, the UNet gets device copies made up front."""

    def __init__(self, timesteps: torch.Tensor, device: torch.device) -> None:
        on_device = timesteps.to(device)
        # one tensor per step (storage offset 0, so every step presents the compiled graph the same input)
        self.unet_timesteps = [on_device[i].clone() for i in range(len(on_device))]
        self.cudagraphs = device.type == "cuda"

    def unet_timestep(self, i: int) -> torch.Tensor:
        if self.cudagraphs:
            # a new step: outputs of the previous replay are consumed, its memory may be reused
            torch.compiler.cudagraph_mark_step_begin()
        return self.unet_timesteps[i]
