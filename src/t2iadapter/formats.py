"""Reading and writing adapter checkpoints in every format users have.

Formats (DESIGN.md §4):
- original TencentARC files (`.pth`/`.ckpt` pickles or `.safetensors`, with or without an
  `adapter.` prefix): full, light, style, fuser; SD1 vs SDXL and the input channels are read
  from the tensors' shapes. Our module names *are* the original key names, so this is 1:1.
- diffusers folders (`config.json` + `diffusion_pytorch_model.safetensors` or `.bin`), and bare
  diffusers-keyed weight files: keys `adapter.body.{stage}.resnets.{j}.*` mapped to ours.
- our single file: safetensors with the config JSON in its metadata (`t2iadapter_config`).
- our folder for kinds diffusers does not know (style, fuser): `config.json` + `adapter.safetensors`.
- hub ids (`org/repo`, or `org/repo/path/in/repo.pth`), through huggingface_hub when online.

Pickles are only ever read with `torch.load(weights_only=True)`; anything needing more is refused.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from t2iadapter.errors import CheckpointError, ConfigError, UnsafeCheckpointError
from t2iadapter.models import (
    AdapterModule,
    FullAdapterConfig,
    FuserConfig,
    LightAdapterConfig,
    StyleAdapterConfig,
    build_adapter,
    config_from_dict,
)
from t2iadapter.models.saving import (  # noqa: F401 - the writing half, re-exported: formats is the one front door
    DIFFUSERS_TYPES,
    DIFFUSERS_WEIGHTS,
    FORMAT_VERSION,
    METADATA_KEY,
    OUR_FOLDER_WEIGHTS,
    PICKLE_SUFFIXES,
    config_from_diffusers,
    diffusers_config,
    ours_to_diffusers,
    save_original,
    save_pretrained,
    save_single_file,
)

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# reading raw files


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_weights(path: str | Path) -> tuple[StateDict, dict[str, str]]:
    """Tensors and (safetensors) metadata of one weights file; pickles only with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    suffix = path.suffix.lower()  # .SAFETENSORS, .PTH: the case names no other format
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), _safetensors_metadata(path)
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path}: cannot read this safetensors file (truncated or corrupt?): {exc}") from None
    if suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors, .pth, .pt, .ckpt or .bin"
        )
    return _unwrap(load_pickle(path), path), {}


def load_pickle(path: str | Path) -> Any:
    """`torch.load(weights_only=True)` on the CPU, its warnings kept quiet and its errors made one line."""
    import warnings

    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4", printed before the refusal
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refused: this pickle needs more than tensors to load (it could run code). Nothing in it was "
            f"executed. If you trust its source, convert it to safetensors yourself. Detail: {_torch_detail(exc)}"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read this checkpoint (truncated or corrupt?): {_torch_detail(exc)}") from None


# Lines of torch.load's messages that say nothing about the file at hand.
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _torch_detail(exc: BaseException) -> str:
    """The informative sentence of a torch.load error (they run to several paragraphs of advice)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE)] or lines or [type(exc).__name__]
    first = lines[0].removeprefix("WeightsUnpickler error:").strip() or lines[0]
    head, dot, _rest = first.partition(". ")
    return head + ("." if dot else "")


def _unwrap(obj: Any, path: Path) -> StateDict:
    """The tensor dict inside a loaded pickle (also inside Lightning's `state_dict`)."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: holds no state dict (got {type(obj).__name__})")
    if not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{path}: a state dict's keys are names (strings), got {sorted({type(k).__name__ for k in obj})}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(obj):
        other = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]
        raise CheckpointError(f"{path}: entries that are not tensors: {other}")
    return tensors


# ---------------------------------------------------------------------------------------------
# key layouts


_DIFF_RESNET = re.compile(r"^body\.(\d+)\.resnets\.(\d+)\.(.+)$")
_DIFF_STAGE = re.compile(r"^body\.(\d+)\.(in_conv|out_conv)\.(.+)$")


def _strip_prefix(sd: StateDict) -> StateDict:
    if sd and all(k.startswith("adapter.") for k in sd):
        return {k[len("adapter.") :]: v for k, v in sd.items()}
    return dict(sd)


def is_diffusers_layout(sd: StateDict) -> bool:
    return any(".resnets." in k for k in sd)


def diffusers_to_ours(sd: StateDict, config: FullAdapterConfig | LightAdapterConfig) -> StateDict:
    """diffusers `adapter.body.{i}.resnets.{j}.*` keys → original/ours (`body.{i*n+j}.*` or `body.{i}.body.{j}.*`)."""
    sd = _strip_prefix(sd)
    light = config.kind == "light"
    n = config.num_res_blocks
    out: StateDict = {}
    for key, value in sd.items():
        if m := _DIFF_RESNET.match(key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            out[f"body.{i}.body.{j}.{rest}" if light else f"body.{i * n + j}.{rest}"] = value
        elif m := _DIFF_STAGE.match(key):
            i, name, rest = int(m[1]), m[2], m[3]
            out[f"body.{i}.{name}.{rest}" if light else f"body.{i * n}.{name}.{rest}"] = value
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# detection from tensor shapes


def _split_input_channels(cin: int) -> tuple[int, int]:
    """(raw channels, unshuffle factor) from conv_in's input width: 64/192 → SD1, 256/768 → SDXL."""
    known = {64: (1, 8), 192: (3, 8), 256: (1, 16), 768: (3, 16)}
    if cin in known:
        return known[cin]
    if cin % 64 == 0:
        return cin // 64, 8
    raise CheckpointError(f"input width {cin} is not channels x 8^2 or x 16^2; not a T2I-Adapter?")


def _indices(sd: StateDict, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in sd if (m := rx.match(k))})


def detect_config(sd: StateDict) -> Any:
    """The adapter config that a state dict (original or diffusers keys, any prefix) describes."""
    sd = _strip_prefix(sd)
    if "style_embedding" in sd and "proj" in sd:
        emb, proj = sd["style_embedding"], sd["proj"]
        layers = _indices(sd, r"^transformer_layes\.(\d+)\.")
        # Heads cannot be read from shapes; every released style adapter uses 8.
        return StyleAdapterConfig(width=emb.shape[-1], context_dim=proj.shape[1], num_layers=len(layers), num_tokens=emb.shape[1])
    if "task_embedding" in sd and "seq_proj" in sd:
        chans = tuple(sd[f"spatial_ch_projs.{i}.weight"].shape[0] for i in _indices(sd, r"^spatial_ch_projs\.(\d+)\."))
        emb = sd["task_embedding"]
        layers = _indices(sd, r"^transformer_layes\.(\d+)\.")
        return FuserConfig(unet_channels=chans, width=emb.shape[1], num_layers=len(layers), num_tasks=emb.shape[0])
    diffusers = is_diffusers_layout(sd)
    if "conv_in.weight" in sd:
        in_ch, factor = _split_input_channels(sd["conv_in.weight"].shape[1])
        if diffusers:
            stages = _indices(sd, r"^body\.(\d+)\.")
            n = len(_indices(sd, r"^body\.0\.resnets\.(\d+)\."))
            channels = tuple(sd[f"body.{i}.resnets.0.block1.weight"].shape[0] for i in stages)
            ksize, skip, conv_down = 1, False, False
        else:
            blocks = _indices(sd, r"^body\.(\d+)\.")
            num_stages = 4  # one per UNet encoder scale in every released layout
            if len(blocks) % num_stages:
                raise CheckpointError(f"{len(blocks)} residual blocks cannot form {num_stages} stages")
            n = len(blocks) // num_stages
            channels = tuple(sd[f"body.{i * n}.block1.weight"].shape[0] for i in range(num_stages))
            ksize = sd["body.0.block2.weight"].shape[-1]
            skip = any(".skep." in k for k in sd)
            conv_down = any(".down_opt.op." in k for k in sd)
        if conv_down:
            downs = tuple(f"body.{i * n}.down_opt.op.weight" in sd for i in range(len(channels)))
        elif factor == 16:  # no config: diffusers' full_adapter_xl layout (only the 3rd stage downsamples)
            downs = tuple(i == 2 for i in range(len(channels)))
        else:
            downs = (False,) + (True,) * (len(channels) - 1)
        return FullAdapterConfig(
            in_channels=in_ch,
            channels=channels,
            num_res_blocks=n,
            downscale_factor=factor,
            downsample=downs,
            ksize=ksize,
            skip_conv=skip,
            conv_downsample=conv_down,
        )
    if "body.0.in_conv.weight" in sd and "body.0.out_conv.weight" in sd:
        stages = _indices(sd, r"^body\.(\d+)\.")
        inner = r"^body\.0\.resnets\.(\d+)\." if diffusers else r"^body\.0\.body\.(\d+)\."
        in_ch, factor = _split_input_channels(sd["body.0.in_conv.weight"].shape[1])
        return LightAdapterConfig(
            in_channels=in_ch,
            channels=tuple(sd[f"body.{i}.out_conv.weight"].shape[0] for i in stages),
            num_res_blocks=len(_indices(sd, inner)),
            downscale_factor=factor,
        )
    first = sorted(sd)[:4]
    raise CheckpointError(
        "does not look like a T2I-Adapter checkpoint: no conv_in/body (full), body.*.out_conv (light), "
        f"style_embedding (style) or task_embedding (fuser) keys; first keys: {first}"
    )


# ---------------------------------------------------------------------------------------------
# building a module from tensors


def _floating_dtype(sd: StateDict) -> torch.dtype:
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _check_counts(config: Any, sd: StateDict, source: str) -> None:
    """Before building anything: the blocks/layers/scales a config describes are those the tensors hold, so a
    crafted config (say `num_res_blocks: 1000000000`) is one clear error, not a module of a billion blocks."""
    if config.kind == "light":
        counts = {"stages": (len(config.channels), r"^body\.(\d+)\."),
                  "blocks in stage 0": (config.num_res_blocks, r"^body\.0\.body\.(\d+)\.")}
    elif config.kind in ("full", "full_xl"):
        counts = {"residual blocks": (len(config.channels) * config.num_res_blocks, r"^body\.(\d+)\.")}
    elif config.kind == "style":
        counts = {"transformer layers": (config.num_layers, r"^transformer_layes\.(\d+)\.")}
    else:
        counts = {"transformer layers": (config.num_layers, r"^transformer_layes\.(\d+)\."),
                  "scales": (len(config.unet_channels), r"^spatial_ch_projs\.(\d+)\.")}
    for what, (want, pattern) in counts.items():
        have = len(_indices(sd, pattern))
        if have != want:
            raise CheckpointError(f"{source}: its config describes {want} {what}, its tensors hold {have}; "
                                  "the config or the file is wrong")


def adapter_from_state_dict(sd: StateDict, config: Any = None, *, source: str = "state dict") -> AdapterModule:
    """An adapter holding exactly these tensors (dtype kept, no copy); strict key and shape check."""
    sd = _strip_prefix(sd)
    odd = sorted({str(v.dtype) for v in sd.values() if not v.is_floating_point()})
    if odd:
        raise CheckpointError(f"{source}: adapter weights are floating point, this file holds {', '.join(odd)} tensors")
    if config is None:
        try:
            config = detect_config(sd)
        except (KeyError, IndexError) as exc:  # a tensor the layout needs is missing, or has too few dimensions
            raise CheckpointError(f"{source}: not an adapter layout this library knows (no config inside, and its "
                                  f"tensors are incomplete or malformed: {type(exc).__name__} {exc})") from None
        except CheckpointError as exc:  # not an adapter's tensors: say which file (one of several --adapter)
            raise CheckpointError(f"{source}: {exc}") from None
    if config.kind in DIFFUSERS_TYPES and is_diffusers_layout(sd):
        sd = diffusers_to_ours(sd, config)
    _check_counts(config, sd, source)
    with torch.device("meta"):
        module = build_adapter(config)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: keys do not match a {config.kind} adapter "
            f"(missing {len(missing)}: {missing[:4]}; unexpected {len(unexpected)}: {unexpected[:4]})"
        )
    wrong = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{source}: tensor shapes do not match a {config.kind} adapter: {wrong[:3]}")
    dtype = _floating_dtype(sd)
    module.to_empty(device="cpu")
    module.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)  # (all floating: checked)
    return module.eval()


# ---------------------------------------------------------------------------------------------
# loading


def _config_from_metadata(meta: Mapping[str, str]) -> Any | None:
    if METADATA_KEY not in meta:
        return None
    try:
        return config_from_dict(json.loads(meta[METADATA_KEY]))
    except (ValueError, RecursionError, ConfigError) as exc:  # (JSON nested past Python's recursion limit)
        raise CheckpointError(f"the config stored in this file is invalid: {exc}") from None


def _load_folder(path: Path) -> AdapterModule:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: folder has no config.json (expected a diffusers or t2iadapter adapter folder)")
    try:
        data = json.loads(cfg_path.read_text())
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg_path}: a config.json holds a JSON object")
    if "kind" in data:  # our folder format
        weights = path / OUR_FOLDER_WEIGHTS
        try:
            config = config_from_dict({k: v for k, v in data.items() if not k.startswith("_")})
        except ConfigError as exc:
            raise CheckpointError(f"{cfg_path}: the config is invalid: {exc}") from None
    else:
        cls = data.get("_class_name", "T2IAdapter")
        if cls == "ControlNetModel":
            raise _controlnet_given(path)
        if cls != "T2IAdapter":
            raise CheckpointError(f"{path}: a diffusers {cls}, not a T2IAdapter; load each adapter folder on its own")
        try:
            config = config_from_diffusers(data)
        except ConfigError as exc:
            raise CheckpointError(f"{cfg_path}: {exc}") from None
        weights = next((path / w for w in DIFFUSERS_WEIGHTS if (path / w).is_file()), path / DIFFUSERS_WEIGHTS[0])
    sd, _ = read_weights(weights)
    return adapter_from_state_dict(sd, config, source=str(path))


CONTROLNET_METADATA_KEY = "t2iadapter_controlnet_config"  # our ControlNet single file: its diffusers config (JSON)


def is_controlnet_checkpoint(path: str | os.PathLike) -> bool:
    """Our ControlNet single file, or a diffusers ControlNet folder (what `info` shows and adapter loaders refuse)."""
    path = Path(path)
    if path.is_dir():
        try:
            return json.loads((path / "config.json").read_text()).get("_class_name") == "ControlNetModel"
        except (OSError, ValueError, AttributeError, RecursionError):
            return False
    if path.is_file() and path.suffix.lower() == ".safetensors":
        try:
            return CONTROLNET_METADATA_KEY in _safetensors_metadata(path)
        except Exception:  # noqa: BLE001 - unreadable: the adapter loader says so
            return False
    return False


def _controlnet_given(path: Path) -> CheckpointError:
    return CheckpointError(f"{path} is a ControlNet, not an adapter: give it as one (--controlnet, controlnets=)")


def _load_file(path: Path) -> AdapterModule:
    sd, meta = read_weights(path)
    if CONTROLNET_METADATA_KEY in meta:
        raise _controlnet_given(path)
    return adapter_from_state_dict(sd, _config_from_metadata(meta), source=str(path))


def resolve(source: str | os.PathLike) -> Path:
    """A local path for a file, folder, packaged demo name (`demo/sketch`) or hub id."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text.startswith("demo/"):
        from t2iadapter import assets

        return assets.demo_adapter_path(text[len("demo/") :])
    from t2iadapter import hub

    if hub.is_id(text):
        return hub.adapter_path(text)  # `org/repo` (the adapter's folder) or `org/repo/file/in/repo`, cache first
    raise CheckpointError(f"{text}: no such file or folder")


def _is_diffusers_adapter(obj: Any) -> bool:
    return type(obj).__name__ == "T2IAdapter" and hasattr(obj, "config") and hasattr(obj, "state_dict")


def from_diffusers_module(adapter: Any) -> AdapterModule:
    """Our module from a loaded diffusers `T2IAdapter` (its config and weights through the diffusers-folder path).

    A `MultiAdapter` is refused: pass its adapters one by one (each gets its own weight and window here).
    """
    try:
        config = config_from_diffusers(dict(adapter.config))
    except ConfigError as exc:
        raise CheckpointError(f"diffusers T2IAdapter: {exc}") from None
    sd = {k: v.detach().cpu() for k, v in adapter.state_dict().items()}
    return adapter_from_state_dict(sd, config, source="diffusers T2IAdapter")


def load_adapter(
    source: str | os.PathLike | AdapterModule,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> AdapterModule:
    """Load any adapter checkpoint (format detected), returning a module that carries its config and kind."""
    if isinstance(source, AdapterModule):
        module = copy.deepcopy(source) if dtype is not None or device is not None else source  # never move the caller's
    elif _is_diffusers_adapter(source):
        module = from_diffusers_module(source)
    elif type(source).__name__ == "MultiAdapter":
        raise CheckpointError("a diffusers MultiAdapter: pass its adapters one by one (pipe.adapter.adapters), each "
                              "then takes its own weight and window")
    elif isinstance(source, torch.nn.Module) or not isinstance(source, (str, os.PathLike)):
        raise CheckpointError(f"an adapter is a path, demo/NAME, hub id, an AdapterModule or a diffusers T2IAdapter, "
                              f"not {type(source).__name__}")
    else:
        path = resolve(source)
        module = _load_folder(path) if path.is_dir() else _load_file(path)
        log.info("loaded %s adapter from %s (%s)", module.kind, path, module.config)
    if dtype is not None or device is not None:
        module = module.to(device=device, dtype=dtype)
    return module


# ---------------------------------------------------------------------------------------------
# writing


def _check_config_survives(module: AdapterModule) -> None:
    """The original format keeps no config: refuse an adapter whose tensors tell a reader another one (heads, pooling)."""
    read_back = detect_config(module.state_dict())  # what a reader of the config-less file will build
    if read_back != module.config:
        lost = ", ".join(f"{f.name} {getattr(module.config, f.name)!r} (read back as {getattr(read_back, f.name, None)!r})"
                         for f in dataclasses.fields(module.config)
                         if getattr(module.config, f.name) != getattr(read_back, f.name, None))
        raise ConfigError(f"the original format keeps no config, and the tensors of this {module.kind} adapter do not "
                          f"tell its {lost}; write our single file instead (--to single: the config inside)")


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str | None = None, *, overwrite: bool = False) -> tuple[AdapterModule, str]:
    """Load `src` in any format and write `dst` as `to` (diffusers | original | single; guessed from dst)."""
    module = load_adapter(src)
    dst = Path(dst)
    if to is None:
        suffix = dst.suffix.lower()
        to = "single" if suffix == ".safetensors" else "original" if suffix in PICKLE_SUFFIXES else "diffusers"
    if to == "single":
        save_single_file(module, dst, overwrite=overwrite)
    elif to == "original":
        _check_config_survives(module)
        save_original(module, dst, overwrite=overwrite)
    elif to == "diffusers":
        if module.kind not in DIFFUSERS_TYPES:
            raise ConfigError(f"diffusers has no {module.kind} adapter; use --to single or --to original")
        save_pretrained(module, dst, overwrite=overwrite)
    else:
        raise ConfigError(f"unknown target format {to!r}; choose diffusers, original or single")
    return module, to
