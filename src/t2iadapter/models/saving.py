"""How an adapter module writes itself: our single file, diffusers' folder, the original layout (atomic writes).

This is the writing half of the formats; `t2iadapter.formats` (a layer above) reads every format,
detects layouts and converts. Modules call these through `AdapterModule.save_file`/`save_pretrained`.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from t2iadapter.errors import CheckpointError, ConfigError
from t2iadapter.models.adapters import FullAdapterConfig, LightAdapterConfig
from t2iadapter.models.base import AdapterModule, config_to_dict

StateDict = dict[str, torch.Tensor]

FORMAT_VERSION = "1"
METADATA_KEY = "t2iadapter_config"
OUR_FOLDER_WEIGHTS = "adapter.safetensors"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PICKLE_SUFFIXES = {".pth", ".pt", ".ckpt", ".bin"}
DIFFUSERS_TYPES = {"full": "full_adapter", "full_xl": "full_adapter_xl", "light": "light_adapter"}


def ours_to_diffusers(sd: StateDict, config: FullAdapterConfig | LightAdapterConfig) -> StateDict:
    """Inverse of `diffusers_to_ours`, with diffusers' `adapter.` prefix."""
    light = config.kind == "light"
    n = config.num_res_blocks
    out: StateDict = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "body" and light:
            i = int(parts[1])
            if parts[2] == "body":
                key = f"body.{i}.resnets.{parts[3]}.{'.'.join(parts[4:])}"
        elif parts[0] == "body":
            k = int(parts[1])
            i, j = divmod(k, n)
            rest = ".".join(parts[2:])
            key = f"body.{i}.in_conv.{'.'.join(parts[3:])}" if parts[2] == "in_conv" else f"body.{i}.resnets.{j}.{rest}"
        out[f"adapter.{key}"] = value
    return out


def config_from_diffusers(data: Mapping[str, Any]) -> Any:
    """Our config from a diffusers `T2IAdapter` config.json (values checked before anything is built)."""
    kind = {v: k for k, v in DIFFUSERS_TYPES.items()}.get(str(data.get("adapter_type", "full_adapter")))
    if kind is None:
        raise CheckpointError(f"unknown diffusers adapter_type {data.get('adapter_type')!r}"[:200])
    channels = data.get("channels", [320, 640, 1280, 1280])
    channels = tuple(channels) if isinstance(channels, (list, tuple)) else channels  # the config checks the values
    if not isinstance(channels, tuple) or not 1 <= len(channels) <= 64:
        raise ConfigError(f"channels must be a list of 1 to 64 integers, got {channels!r}"[:200])
    in_ch, n, factor = data.get("in_channels", 3), data.get("num_res_blocks", 2), data.get("downscale_factor", 8)
    if kind == "light":
        return LightAdapterConfig(in_channels=in_ch, channels=channels + channels[-1:], num_res_blocks=n, downscale_factor=factor)
    if kind == "full_xl":  # diffusers' FullAdapterXL: only stage 2 (0-based) downsamples, for any channel count
        return FullAdapterConfig(in_channels=in_ch, channels=channels, num_res_blocks=n, downscale_factor=factor,
                                 downsample=tuple(i == 2 for i in range(len(channels))))
    return FullAdapterConfig(in_channels=in_ch, channels=channels, num_res_blocks=n, downscale_factor=factor,
                             downsample=(False,) + (True,) * (len(channels) - 1))


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; choose another name or pass overwrite (--force)")


def _check_file_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():  # even with overwrite: a file never replaces a folder
        raise CheckpointError(f"{path} is a folder, and this format is one file; name a new file")
    _check_target(path, overwrite)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` into a temp file beside `path`, then give it the usual permissions (mkstemp makes it 0600)
    and rename it into place; a failure or a kill never leaves a half-written `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_save_safetensors(tensors: StateDict, path: Path, metadata: dict[str, str] | None) -> None:
    from safetensors.torch import save_file

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def _atomic_write_text(text: str, path: Path) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _metadata(module: AdapterModule) -> dict[str, str]:
    return {"format": "pt", METADATA_KEY: module.config_json(), "t2iadapter_format_version": FORMAT_VERSION}


def save_single_file(module: AdapterModule, path: str | Path, *, overwrite: bool = False) -> Path:
    """Our single file: safetensors, original key names, config JSON in the metadata."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: our single-file format is safetensors; name it *.safetensors")
    _check_file_target(path, overwrite)
    _atomic_save_safetensors(module.state_dict(), path, _metadata(module))
    return path


def diffusers_config(module: AdapterModule) -> dict[str, Any]:
    """diffusers' `T2IAdapter` config.json for this adapter, or ConfigError if diffusers cannot express it."""
    cfg = module.config
    if cfg.kind not in DIFFUSERS_TYPES:
        raise ConfigError(f"diffusers has no {cfg.kind} adapter; save it in our format (--to single)")
    if cfg.kind == "light":
        if len(cfg.channels) < 2 or cfg.channels[-1] != cfg.channels[-2]:
            raise ConfigError("diffusers' light adapter repeats its last channel count; this one does not: save it in "
                              "our format (--to single) or the original one (--to original)")
        channels = cfg.channels[:-1]
    else:
        standard = config_from_diffusers({"adapter_type": DIFFUSERS_TYPES[cfg.kind], "channels": list(cfg.channels),
                                      "in_channels": cfg.in_channels, "num_res_blocks": cfg.num_res_blocks,
                                      "downscale_factor": cfg.downscale_factor})
        if standard != cfg:
            raise ConfigError(
                "diffusers can only express the released layout (ksize=1, no skip conv, avg-pool downsample); "
                "save this adapter in our format (--to single) or the original one (--to original)"
            )
        channels = cfg.channels
    import diffusers  # only for its version string, which diffusers writes too

    return {
        "_class_name": "T2IAdapter",
        "_diffusers_version": diffusers.__version__,
        "adapter_type": DIFFUSERS_TYPES[cfg.kind],
        "channels": list(channels),
        "downscale_factor": cfg.downscale_factor,
        "in_channels": cfg.in_channels,
        "num_res_blocks": cfg.num_res_blocks,
    }


def save_pretrained(module: AdapterModule, directory: str | Path, *, overwrite: bool = False) -> Path:
    """A folder: diffusers' layout for full/light/full_xl (when expressible), ours for style/fuser."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():  # even with overwrite: a folder never replaces a file
        raise CheckpointError(f"{directory} is a file, and this format is a folder; name a new folder (or a "
                              ".safetensors/.pth file for the single-file formats)")
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise CheckpointError(f"{directory} exists and is not empty; choose another folder or pass overwrite (--force)")
    config = diffusers_config(module) if module.kind in DIFFUSERS_TYPES else None  # refused before any folder exists
    directory.mkdir(parents=True, exist_ok=True)
    if module.kind in DIFFUSERS_TYPES:
        _atomic_save_safetensors(ours_to_diffusers(module.state_dict(), module.config), directory / DIFFUSERS_WEIGHTS[0],
                                 _metadata(module))
    else:
        config = {"_t2iadapter_format_version": FORMAT_VERSION, **config_to_dict(module.config)}
        _atomic_save_safetensors(module.state_dict(), directory / OUR_FOLDER_WEIGHTS, _metadata(module))
    _atomic_write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", directory / "config.json")
    return directory


def save_original(module: AdapterModule, path: str | Path, *, overwrite: bool = False) -> Path:
    """The original TencentARC layout: a plain tensor dict, as .pth (torch.save) or .safetensors (no config)."""
    path = Path(path)
    _check_file_target(path, overwrite)
    sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    if path.suffix.lower() == ".safetensors":
        _atomic_save_safetensors(sd, path, None)
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        _atomic_write(path, lambda tmp: torch.save(sd, tmp))
    else:
        raise CheckpointError(f"{path}: the original format is .pth or .safetensors")
    return path
