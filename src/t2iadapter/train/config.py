"""The training configuration: frozen dataclasses read from YAML/JSON/TOML, with `--set key=value` overrides.

Defaults follow the paper's recipe (arXiv 2302.08453 §4, DESIGN.md §6): frozen base, ε/v MSE,
AdamW β (0.9, 0.999), weight decay 1e-2, lr 1e-5, batch 8 per GPU, 512², cubic timesteps.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from t2iadapter.errors import ConfigError

ADAPTER_KINDS = ("full", "light", "full_xl", "style", "controlnet")
DATA_KINDS = ("world", "folder", "datasets", "webdataset")
TIMESTEP_SAMPLERS = ("cubic", "uniform", "cosine")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("no", "fp16", "bf16")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to train: a fresh one of `kind`, or one loaded from `init_from`."""

    kind: str = "full"  # full (SD1/SD2), full_xl (SDXL), light (colour), style (CLIP-vision tokens, paper §3.3),
    # or controlnet (a ControlNet initialised from the base UNet, issue 16; init_from: any ControlNet diffusers reads)
    condition: str = "sketch"  # condition name: the data key/column/folder and the CoAdapter task name
    in_channels: int = 1  # raw condition channels: 1 (sketch, canny), 3 (depth, seg, pose, colour)
    channels: tuple[int, ...] | None = None  # feature channels; None: what the base UNet takes
    num_res_blocks: int | None = None  # residual blocks per stage; None: the kind's default (2 full, 4 light)
    init_from: str | None = None  # start from this adapter checkpoint (any format load_adapter reads)
    extractor: str | None = None  # compute the condition on the fly from the image with this extractor
    options: dict[str, Any] = field(default_factory=dict)  # other fields of the adapter's config dataclass

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ConfigError(f"adapter kind {self.kind!r}: expected one of {', '.join(ADAPTER_KINDS)}")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"adapter in_channels must be 1 or 3, got {self.in_channels}")
        if self.kind == "controlnet":  # its layout is the base UNet's encoder: these would be ignored
            given = [k for k, v in (("channels", self.channels), ("num_res_blocks", self.num_res_blocks),
                                    ("options", self.options)) if v]
            if given:
                raise ConfigError(f"a controlnet takes its layout from the base UNet; drop {', '.join(given)} "
                                  "(in_channels, condition, init_from and extractor apply)")


@dataclass(frozen=True)
class FuserSpec:
    """The CoAdapter fuser (original `CoAdapterFuser`); present only for joint training of several adapters."""

    init_from: str | None = None  # start from this fuser checkpoint
    width: int | None = None  # token width; None: 768, or the base's context width for tiny bases
    num_heads: int = 8
    num_layers: int = 3


@dataclass(frozen=True)
class DataConfig:
    """Where samples come from and how they are shaped."""

    kind: str = "world"  # world | folder | datasets | webdataset
    path: str | None = None  # folder; dataset name/path; shard file, glob or list separated by spaces
    conditions: dict[str, str] = field(default_factory=dict)  # condition → its folder / column / tar key
    image_column: str = "image"  # datasets: the image column (webdataset: jpg/png/jpeg/webp are tried)
    text_column: str = "text"  # datasets: the caption column; webdataset: the caption key
    split: str = "train"  # datasets: which split
    resolution: int | None = None  # square training size (short side resized, centre-cropped); None: the base's own
    # (its UNet's sample size × the VAE factor: 512 for SD1.5, 1024 for SDXL, 256 for the demo, 64 for tiny)
    random_flip: bool = False  # flip image and conditions together (off: flipping breaks left/right captions)
    num_samples: int | None = None  # world: scenes used (None: all TRAIN seeds); others: cap on the samples
    num_workers: int = 0  # DataLoader worker processes (0: load in the training process)

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ConfigError(f"data kind {self.kind!r}: expected one of {', '.join(DATA_KINDS)}")
        if self.kind != "world" and not self.path:
            raise ConfigError(f"data kind {self.kind!r} needs data.path")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 64):
            raise ConfigError(f"data.resolution must be a positive multiple of 64, got {self.resolution}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ConfigError(f"data.num_samples must be >= 1 (or null: all), got {self.num_samples}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0 (0: load in the training process), got {self.num_workers}")
        bad = {k: v for k, v in self.conditions.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise ConfigError(f"data.conditions maps a condition name to its folder, column or key (text); got {bad}")


@dataclass(frozen=True)
class RecipeConfig:
    """Optimisation recipe (paper §4; original train scripts; CoAdapter dropout of DESIGN.md §6)."""

    timesteps: str = "cubic"  # cubic t=(1-u³)·T (paper §3.4, E[t/T]=0.75), uniform, cosine
    text_dropout: float | None = None  # prob. of an empty prompt; None: 0.5 for CoAdapter, 0 for one adapter
    keep_all_prob: float = 0.1  # CoAdapter: keep every condition with this prob.
    drop_all_prob: float = 0.1  # CoAdapter: drop every condition with this prob.
    keep_prob: float = 0.5  # CoAdapter: otherwise keep each condition independently with this prob.
    lr: float = 1e-5  # the paper's learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    weight_decay: float = 1e-2  # AdamW (PyTorch's default, as the original)
    warmup_steps: int = 0  # linear warm-up of the learning rate
    schedule: str = "constant"  # after warm-up: constant, cosine (to 0) or linear (to 0)
    grad_clip: float | None = None  # max global grad norm; None: no clipping (SDXL recipe: 1.0)
    grad_accumulation: int = 1  # micro-batches per optimiser step (SDXL recipe: 4)
    batch_size: int = 8  # samples per micro-batch per process (paper: 8 per GPU)
    max_steps: int = 1000  # optimiser steps
    max_minutes: float | None = None  # also stop (and save) after this much wall-clock training; None: no limit
    mixed_precision: str = "no"  # no | fp16 | bf16: the frozen base's dtype on GPU and the autocast dtype
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, ~30% slower
    cache_latents: bool = False  # keep each sample's VAE posterior after its first encode (data must fit in RAM)
    cache_text: bool = False  # keep each sample's text embedding after its first encode
    ema_decay: float | None = None  # EMA of the adapter weights (used for validation and saving); None: off
    seed: int = 0  # seeds data order, timesteps, noise and dropout
    compile: bool = False  # torch.compile the UNet (GPU; falls back to eager with a warning if it fails)
    channels_last: bool = False  # UNet and latents in channels-last memory format (faster convs on GPU)
    fused_adamw: bool = True  # fused AdamW kernel when on CUDA

    def __post_init__(self) -> None:
        if self.timesteps not in TIMESTEP_SAMPLERS:
            raise ConfigError(f"recipe.timesteps {self.timesteps!r}: expected one of {', '.join(TIMESTEP_SAMPLERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"recipe.schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"recipe.mixed_precision {self.mixed_precision!r}: expected one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "max_steps", "grad_accumulation"):
            if getattr(self, name) < 1:
                raise ConfigError(f"recipe.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("text_dropout", "keep_all_prob", "drop_all_prob", "keep_prob"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ConfigError(f"recipe.{name} must be a probability in [0, 1], got {value}")
        if self.keep_all_prob + self.drop_all_prob > 1:
            raise ConfigError("recipe.keep_all_prob + recipe.drop_all_prob must be <= 1")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in self.betas):
            raise ConfigError(f"recipe.betas needs two numbers (β1, β2), got {list(self.betas)}")
        for name in ("lr", "weight_decay", "ema_decay", "grad_clip", "max_minutes", "betas"):
            value = getattr(self, name, None)
            for v in value if isinstance(value, tuple) else (value,):
                if v is not None and not math.isfinite(v):
                    raise ConfigError(f"recipe.{name} must be a finite number, got {v}")
        if not all(0 <= b < 1 for b in self.betas):  # AdamW's own bounds
            raise ConfigError(f"recipe.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.lr <= 0:
            raise ConfigError(f"recipe.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"recipe.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"recipe.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"recipe.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"recipe.grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"recipe.max_minutes must be > 0 or null (no limit), got {self.max_minutes}")


@dataclass(frozen=True)
class CheckpointConfig:
    """Fault tolerance: how often to checkpoint and how many checkpoints to keep."""

    every: int = 500  # optimiser steps between checkpoints (0: only the final one)
    keep: int = 3  # newest checkpoints kept; older ones are deleted

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"checkpoint.every must be >= 0 (0: only the final checkpoint), got {self.every}")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass(frozen=True)
class ValidationConfig:
    """The validation grid (condition | base | with adapter), rendered every `every` steps at fixed seeds."""

    every: int = 0  # optimiser steps between grids (0: off)
    prompts: tuple[str, ...] = ()  # one prompt per condition image below
    conditions: tuple[Any, ...] = ()  # condition image per prompt; CoAdapter: a {condition: image path} mapping
    world_seeds: tuple[int, ...] = ()  # or: scenes of the procedural world (caption and exact conditions)
    seeds: tuple[int, ...] = (0,)  # sampling seeds; one grid row per (item, seed)
    steps: int = 20  # denoising steps
    guidance_scale: float = 7.5

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"validation.every must be >= 0 (0: off), got {self.every}")
        if self.steps < 1:
            raise ConfigError(f"validation.steps must be >= 1, got {self.steps}")
        if self.every and not (self.prompts or self.world_seeds):
            raise ConfigError(f"validation.every is {self.every} but there is nothing to render: give validation.prompts "
                              "with validation.conditions, or validation.world_seeds")
        for name in ("seeds", "world_seeds"):
            if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in getattr(self, name)):
                raise ConfigError(f"validation.{name} must be a list of integers >= 0, got {list(getattr(self, name))}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ConfigError(f"validation.guidance_scale must be a finite number >= 0, got {self.guidance_scale}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything `t2iadapter train` needs; stored beside every checkpoint it writes."""

    base: str = "tiny"  # preset (tiny, tiny-xl, demo), diffusers folder, single file or hub id
    adapters: tuple[AdapterSpec, ...] = (AdapterSpec(),)  # one adapter, or several + fuser (CoAdapter)
    fuser: FuserSpec | None = None  # set for CoAdapter joint training
    data: DataConfig = DataConfig()
    recipe: RecipeConfig = RecipeConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    validation: ValidationConfig = ValidationConfig()
    output_dir: str = "runs/adapter"  # checkpoints, logs, validation grids and the final adapter(s)
    log_every: int = 10  # steps between loss/lr/grad-norm scalars (each read syncs the GPU)

    def __post_init__(self) -> None:
        if not self.adapters:
            raise ConfigError("the config names no adapter (set `adapter:` or `adapters:`)")
        names = [a.condition for a in self.adapters]
        if len(set(names)) != len(names):
            raise ConfigError(f"each adapter needs its own condition name, got {names}")
        if any(a.kind == "controlnet" for a in self.adapters) and (len(self.adapters) > 1 or self.fuser is not None):
            raise ConfigError("a ControlNet (kind: controlnet) trains alone: one adapter spec, no fuser")
        if len(self.adapters) > 1 and self.fuser is None:
            raise ConfigError("several adapters are trained jointly through a CoAdapter fuser: add `fuser: {}`")
        if self.validation.prompts and len(self.validation.prompts) != len(self.validation.conditions):
            raise ConfigError("validation.prompts and validation.conditions need the same length")

    @property
    def is_coadapter(self) -> bool:
        return self.fuser is not None

    @property
    def text_dropout(self) -> float:
        """The effective text-dropout probability (DESIGN.md §6: 0.5 when training a CoAdapter)."""
        if self.recipe.text_dropout is not None:
            return self.recipe.text_dropout
        return 0.5 if self.is_coadapter else 0.0

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# reading files and overrides


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_file(path: str | Path) -> dict[str, Any]:
    """A config file as a nested dict (YAML, JSON or TOML, by suffix)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; name a .yaml, .json or .toml file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            raise ConfigError(f"{path}: a config is .yaml, .yml, .json or .toml")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{path}: cannot parse: {str(exc).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields")
    return data


def parse_value(text: str) -> Any:
    """A `--set` value: YAML scalars and flow lists/maps (`3`, `1e-4`, `true`, `null`, `[1, 2]`), else the string."""
    import yaml

    for number in (int, float):  # YAML 1.1 reads `1e-4` as a string
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except Exception:
        return text


def _schema_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted leaf path of a config dataclass (adapters expand to `adapter.<field>`)."""
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(hint):
            inner = [hint]
        if f.name == "adapters":
            paths += _schema_paths(AdapterSpec, prefix + "adapter.")
        elif inner:
            paths += _schema_paths(inner[0], prefix + f.name + ".")
        else:
            paths.append(prefix + f.name)
    return paths


def resolve_key(key: str) -> list[str]:
    """`max_steps` → ['recipe', 'max_steps']: a dotted path, or a leaf name that is unambiguous."""
    paths = _schema_paths(TrainConfig)
    if key in ("adapter", "adapters", "fuser", "data", "recipe", "checkpoint", "validation"):
        return [key]
    if "." in key:
        head = key.split(".")
        return head
    matches = [p for p in paths if p.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0].split(".")
    if not matches:
        raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(p for p in paths)}")
    raise ConfigError(f"config key {key!r} is ambiguous; write one of {', '.join(matches)}")


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` (dotted; list items by index: `adapters.1.condition`) in the nested dict `data`."""
    parts = resolve_key(key)
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if part == "adapter" and "adapters" in node:
            node = node["adapters"]
            part = "0"
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError):
                raise ConfigError(f"--set {key}: no list item {part!r}") from None
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    last = parts[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError):
            raise ConfigError(f"--set {key}: no list item {last!r}") from None
    else:
        node[last] = value


def _build(cls: type, data: Any, where: str) -> Any:
    """Construct dataclass `cls` from a dict, rejecting unknown keys and converting lists to tuples."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where or 'the config'}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        sub = [a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)]
        path = f"{where}.{name}" if where else name
        if name == "adapters":
            kwargs[name] = value
            continue
        if sub and value is None and type(None) not in typing.get_args(hint):
            value = {}  # a section whose keys are all commented out (YAML reads it as null): its defaults
        if sub and value is not None:
            kwargs[name] = _build(sub[0], value, path)
            continue
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, str) and _allowed(hint) and str not in _allowed(hint) and float in _allowed(hint):
            try:  # YAML 1.1 reads `1e-4` as a string
                value = float(value)
            except ValueError:
                pass
        allowed = _allowed(hint)
        if allowed and not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed and allowed):
            raise ConfigError(f"{path} = {value!r}: expected {_describe(hint)}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _allowed(hint: Any) -> tuple[type, ...]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        out: tuple[type, ...] = ()
        for arg in typing.get_args(hint):
            sub = _allowed(arg)
            if not sub:
                return ()
            out += sub
        return out
    if hint is type(None):
        return (type(None),)
    if hint is float:
        return (int, float)
    if hint in (int, str, bool):
        return (hint,)
    if origin is tuple:
        return (tuple,)
    if origin is dict:
        return (dict,)
    return ()


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from a nested dict (`adapter:` is shorthand for a one-item `adapters:` list)."""
    data = dict(data)
    if "adapter" in data and data["adapter"] is None:
        del data["adapter"]
    if "adapter" in data:
        if "adapters" in data:
            raise ConfigError("set either `adapter:` (one) or `adapters:` (several, with a fuser), not both")
        data["adapters"] = [data.pop("adapter")]
    adapters = data.get("adapters")
    if adapters is not None:
        if not isinstance(adapters, list):
            raise ConfigError("`adapters:` must be a list of adapter specs")
        data["adapters"] = tuple(_build(AdapterSpec, a, f"adapters.{i}") for i, a in enumerate(adapters))
    return _build(TrainConfig, data, "")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a config file (or the defaults) and apply `key=value` overrides."""
    data = read_file(path) if path is not None else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        apply_override(data, key.strip(), parse_value(text.strip()))
    return from_dict(data)
