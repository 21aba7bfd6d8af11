"""What every adapter module shares: its config, its kind, saving, and construction from a config."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from t2iadapter.errors import ConfigError

#: kind name -> (config class, module class); filled by the model modules as they are imported.
REGISTRY: dict[str, tuple[type, type]] = {}


def register(kind: str, config_cls: type, module_cls: type) -> None:
    REGISTRY[kind] = (config_cls, module_cls)


# Upper bounds far above every released or sensible model, so a crafted config (a file's metadata, a
# config.json) is refused at once instead of building a billion blocks or gigabyte tensors.
MAX_COUNT = 64  # stages, residual blocks per stage, transformer layers
MAX_WIDTH = 16384  # channels, token widths
MAX_TOKENS = 1024  # style tokens, task rows, attention heads


def check_ints(kind: str, bounds: dict[str, tuple[Any, int]]) -> None:
    """Each value (an int, or a tuple of ints) must be an int in [1, bound]; one clear ConfigError otherwise."""
    for name, (value, hi) in bounds.items():
        listed = name in ("channels", "unet_channels")
        values = value if listed and isinstance(value, tuple) else (value,)
        if (listed and not isinstance(value, tuple)) or not values or len(values) > MAX_COUNT or \
                any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi for v in values):
            what = f"a list of 1 to {MAX_COUNT} integers" if listed else "an integer"
            raise ConfigError(f"{kind} adapter config: {name} must be {what} between 1 and {hi}, got {value!r}"[:300])


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass, with its kind (`{"kind": ..., **fields}`)."""
    out = {"kind": config.kind}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def config_from_dict(data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from `config_to_dict`'s output; unknown kinds or fields are errors."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"an adapter config is a JSON object, got {type(data).__name__}")
    data = dict(data)
    kind = data.pop("kind", None)
    if not isinstance(kind, str) or kind not in REGISTRY:  # (a list or dict is unhashable: a TypeError)
        raise ConfigError(f"unknown adapter kind {kind!r}; expected one of {sorted(REGISTRY)}")
    config_cls = REGISTRY[kind][0]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown {kind} config fields {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    config = config_cls(**kwargs)
    if REGISTRY[config.kind] != REGISTRY[kind]:  # full vs full_xl is a label read off the layout, not a class
        raise ConfigError(f"config says kind {kind!r} but its fields describe {config.kind!r}")
    return config


def build_adapter(config: Any) -> "AdapterModule":
    """A freshly initialised adapter module for `config`: a config dataclass, or its dict (`config_to_dict`'s form)."""
    if isinstance(config, Mapping):
        config = config_from_dict(config)
    kind = getattr(config, "kind", None)
    if not isinstance(kind, str) or kind not in REGISTRY:
        raise ConfigError(f"unknown adapter kind {kind!r}; build_adapter takes an adapter config (e.g. FullAdapterConfig) "
                          f"or its dict with a 'kind' of {sorted(REGISTRY)}")
    return REGISTRY[kind][1](config)


class AdapterModule(nn.Module):
    """Base of every adapter: carries its frozen config and kind, saves itself in our formats."""

    config_class: ClassVar[type]

    def __init__(self, config: Any) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    def config_json(self) -> str:
        return json.dumps(self.config_dict(), sort_keys=True)

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write a folder: diffusers' layout for full/light/full_xl, ours (safetensors + config.json) otherwise."""
        from t2iadapter.models import saving

        return saving.save_pretrained(self, directory, overwrite=overwrite)

    def save_file(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write our single-file format: safetensors with the config in its metadata."""
        from t2iadapter.models import saving

        return saving.save_single_file(self, path, overwrite=overwrite)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
