"""FP8 fast mode (issue 18, `optimize(precision="fp8")`, `--fast fp8`): the UNet's transformer matmuls in float8.

torchao's float8 dynamic quantization of activations and weights with one scale per row
(`Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`, e4m3): each attention projection and
feed-forward matmul runs on the FP8 tensor cores, twice the bf16 rate on Ada, Hopper and Blackwell cards
(compute capability 8.9 and up). Which layers: `unet_hook.transformer_linears` (attention q/k/v/out,
feed-forwards, SDXL's linear proj_in/out); convolutions, norms, time and size embeddings, the text encoders,
the VAE and the adapters stay bf16.

The quantized UNet is a new module: it shares every tensor with the one handed in except the quantized
weights, which are new; the module handed in is not changed. Quality: the benchmark
(`benchmarks/bench_fast_v2.py`) reports the UNet's per-step relative error against bf16 and the demo model's
controllability (IoU) in both precisions.
"""
from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

import torch

from t2iadapter import unet_hook
from t2iadapter.errors import ConfigError

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 9)  # Ada (sm_89), Hopper (sm_90), Blackwell: FP8 tensor cores
MIN_TORCHAO = (0, 10)  # the Config API (`quantize_(model, Float8DynamicActivationFloat8WeightConfig(...))`)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of `device`, or None when it is not a CUDA GPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def check_supported(device: str | torch.device) -> None:
    """Refuse fp8 (one ConfigError line) on the CPU, on other accelerators, and on GPUs older than compute capability 8.9."""
    device = torch.device(device)
    capability = device_capability(device)
    if capability is None:
        raise ConfigError(f"fp8 needs an NVIDIA GPU with compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or "
                          f"newer (Ada, Hopper, Blackwell); this pipeline runs on {device.type} (use bf16 there)")
    if tuple(capability) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"fp8 needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper, "
                          f"Blackwell); {name} has {capability[0]}.{capability[1]} (use --fast bf16 there)")


def quantization_config() -> tuple[Any, Any]:
    """torchao's `quantize_` and the float8 config (per-row scales, no global inductor settings); a clear ConfigError
    when torchao is missing or too old."""
    try:
        import torchao
        from torchao.quantization import quantize_
    except ImportError as exc:
        raise ConfigError(f"fp8 needs torchao (pip install 't2iadapter[fp8]'); importing it failed: {exc}") from None
    version = getattr(torchao, "__version__", "0")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    except ImportError:
        raise ConfigError(f"fp8 needs torchao {'.'.join(map(str, MIN_TORCHAO))} or newer; found {version}") from None
    kwargs: dict[str, Any] = {"granularity": PerRow()}
    if "set_inductor_config" in inspect.signature(Float8DynamicActivationFloat8WeightConfig).parameters:
        kwargs["set_inductor_config"] = False  # torchao's defaults change global inductor/matmul settings; ours stay
    return quantize_, Float8DynamicActivationFloat8WeightConfig(**kwargs)


def shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of a module tree whose parameters and buffers are the original's tensors (no weight is copied).

    Replacing a weight in the copy (what quantization does) leaves the original as it was. A compiled forward
    (fast mode's `CompiledForward` on the instance) is not carried over: the copy has its class's forward.
    """
    from t2iadapter.generation.fast import CompiledForward

    memo: dict[int, Any] = {id(t): t for t in (*module.parameters(), *module.buffers())}
    compiled = {id(m.__dict__["forward"]): m.__dict__["forward"] for m in module.modules()
                if isinstance(m.__dict__.get("forward"), CompiledForward)}
    memo.update(compiled)
    out = copy.deepcopy(module, memo)
    for m in out.modules():
        if id(m.__dict__.get("forward")) in compiled:
            del m.__dict__["forward"]
    return out


def quantize_unet(unet: torch.nn.Module) -> tuple[torch.nn.Module, list[str]]:
    """(a copy of `unet` with its transformer Linear layers in float8, their names); `unet` itself is not changed.

    The UNet must be bf16 (per-row float8 scales are computed from bf16 weights). Layers whose dimensions are not
    multiples of 16 (what the FP8 matmul takes) stay bf16.
    """
    if unet.dtype != torch.bfloat16:
        raise ConfigError(f"fp8 quantizes a bf16 UNet; this one is {str(unet.dtype).replace('torch.', '')}")
    quantize_, config = quantization_config()
    candidates = unet_hook.transformer_linears(unet)
    names = [n for n in candidates
             if unet.get_submodule(n).in_features % 16 == 0 and unet.get_submodule(n).out_features % 16 == 0]
    if not names:
        raise ConfigError("fp8: this UNet has no transformer Linear layer with dimensions that are multiples of 16")
    wanted = set(names)
    out = shared_copy(unet)
    quantize_(out, config, filter_fn=lambda _module, fqn: fqn in wanted)
    converted = [n for n in names if is_fp8(out.get_submodule(n).weight)]
    if not converted:
        raise ConfigError("fp8: torchao converted none of the UNet's Linear layers (is the torchao build for this torch?)")
    log.info("fp8: %d of the UNet's Linear layers run in float8 (%d kept bf16: dimensions not multiples of 16)",
             len(converted), len(candidates) - len(converted))
    return out, converted


def is_fp8(weight: torch.Tensor) -> bool:
    """Whether a weight is a torchao float8 tensor (its stored data in a float8 dtype)."""
    if type(weight) is torch.Tensor or type(weight) is torch.nn.Parameter:
        return weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    qdata = getattr(weight, "qdata", None)
    if qdata is None:
        qdata = getattr(getattr(weight, "original_weight_tensor", None), "tensor_impl", None)
        qdata = getattr(qdata, "float8_data", None)
    return qdata is not None and qdata.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
