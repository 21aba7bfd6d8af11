"""The one device check, shared by the extractors and the generation layer: a name torch and this machine accept."""

from __future__ import annotations

from typing import Any

from t2iadapter.errors import ConfigError

# the advice for an absent GPU, in words for the Python API and the CLI alike
ON_CPU = "; run on the CPU instead (device 'cpu'; --device cpu on the command line)"


def check_device(device: Any) -> str:
    """`device` (a name or torch.device) as a string, or one ConfigError: unknown, or a GPU this machine lacks."""
    dev = str(device)
    if dev == "cpu":  # the default everywhere: no need to import torch to accept it
        return dev
    import torch

    try:
        parsed = torch.device(dev)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {dev!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {dev!r}: no CUDA GPU is available here{ON_CPU}")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"device {dev!r}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    elif parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"device {dev!r}: Apple MPS is not available here{ON_CPU}")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {dev!r} is not supported; use cpu, cuda, cuda:N or mps")
    return dev
