"""LoRAs on the base, through diffusers' own loaders (peft): diffusers/peft and kohya files, hub ids, several at once.

A plain diffusers pipeline object sharing the base's modules hosts the LoRAs, so `load_lora_weights`,
`set_adapters`, `delete_adapters` and `fuse_lora` are diffusers' (its kohya/diffusers format conversion
included); nothing here maps keys. Before loading, a LoRA is checked against the base: every UNet/text-encoder
module it names must exist with the input width it was trained for, so a LoRA for another family (SD1.x on
SDXL, SDXL on SD2.x, ...) gets one clear error instead of diffusers' partial load and warning.
Fast mode fuses the LoRAs into the weights before compiling (`fuse()`); after that they are fixed.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from t2iadapter import hub
from t2iadapter.errors import CheckpointError, ConfigError, MissingWeightsError


def parse_lora(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` (the CLI's `--lora`) → (path, scale); a Windows drive or a hub id's colon is no scale."""
    head, sep, tail = text.rpartition(":")
    source, scale = text, 1.0
    if sep:
        try:
            source, scale = head, float(tail)
        except ValueError:
            pass
    if not source:
        raise ConfigError(f"--lora {text!r}: name a LoRA file, folder or hub id, e.g. style.safetensors:0.8")
    if not math.isfinite(scale):
        raise ConfigError(f"--lora {text!r}: the scale must be a finite number, got {tail!r}")
    return source, scale


def _family(base: Any) -> str:
    if base.is_sdxl:
        return "SDXL"
    return f"SD with {base.unet.config.cross_attention_dim}-wide text (SD1.x: 768, SD2.x: 1024)"


class Loras:
    """The LoRAs loaded on a base: name → scale, hosted by a diffusers pipeline that shares the base's modules."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.scales: dict[str, float] = {}
        self.fused = False
        self._host = None

    @property
    def host(self):
        if self._host is None:
            try:
                import peft  # noqa: F401
            except ImportError:
                raise ConfigError("LoRAs need peft: pip install peft") from None
            self._host = self.base.diffusers_pipeline()
        return self._host

    def load(self, source: str | os.PathLike | dict, *, scale: float = 1.0, name: str | None = None,
             **kwargs: Any) -> str:
        """Load a LoRA (file, folder, hub id or state dict; `kwargs` go to diffusers, e.g. `weight_name=`)."""
        if self.fused or self.base.extras.get("fast") is not None:
            # (a LoRA loaded after optimize() missed the fused q/k/v projections: half of it acted, silently)
            raise ConfigError("this base is in fast mode (optimize()); load LoRAs before optimize(), which fuses them "
                              "into the weights")
        # checked before anything is loaded: a refused call leaves no LoRA behind
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ConfigError(f"LoRA scale must be a finite number (1.0: as trained, 0: off), got {scale!r}")
        name = self._name(source) if name is None else name
        if name in self.scales:
            raise ConfigError(f"a LoRA named {name!r} is already loaded; give another name= or unload it first")
        if not name or "." in name:
            raise ConfigError(f"LoRA name {name!r}: give a name without dots (peft's adapter names cannot hold one)")
        what = source if not isinstance(source, dict) else "(state dict)"
        if not isinstance(source, dict) and not Path(source).expanduser().exists() and not hub.is_id(str(source)):
            raise MissingWeightsError(f"LoRA {source}: no such file or folder")
        host = self.host
        try:
            state_dict, _ = host.lora_state_dict(source.copy() if isinstance(source, dict) else source, **kwargs)
        except (OSError, EnvironmentError) as e:
            raise MissingWeightsError(f"cannot read LoRA {what}: {str(e).splitlines()[0]}") from None
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{what} is not a LoRA diffusers can read: {str(e).splitlines()[0]}") from None
        self._check_fits(state_dict, what)
        try:
            host.load_lora_weights(source.copy() if isinstance(source, dict) else source, adapter_name=name, **kwargs)
        except (ValueError, RuntimeError, KeyError) as e:
            self._forget(name)
            raise ConfigError(f"LoRA {what} does not fit this base ({_family(self.base)}): "
                              f"{str(e).splitlines()[0]}") from None
        self.scales[name] = float(scale)
        self._apply()
        return name

    def _name(self, source: Any) -> str:
        """A free name for an unnamed LoRA: its file's stem with dots made underscores (`detail_v1.5` →
        `detail_v1_5`), or `lora`; `_2`, `_3`, … where taken (two `pytorch_lora_weights.safetensors` files)."""
        stem = "lora" if isinstance(source, dict) else Path(str(source).rstrip("/\\")).stem.replace(".", "_") or "lora"
        name, n = stem, 1
        while name in self.scales:
            n += 1
            name = f"{stem}_{n}"
        return name

    def unload(self, name: str) -> None:
        if self.fused:
            raise ConfigError("LoRAs are fused into the weights in fast mode; reload the pipeline to change them")
        if name not in self.scales:
            raise ConfigError(f"no LoRA named {name!r} is loaded; loaded: {list(self.scales)}")
        del self.scales[name]
        self._forget(name)
        self._apply()

    def fuse(self) -> None:
        """Merge the LoRAs (at their scales) into the base's weights and drop the LoRA layers (before compiling)."""
        if not self.scales or self.fused:
            return
        components = [c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(self.base, c, None) is not None]
        self.host.fuse_lora(components=components, adapter_names=list(self.scales))
        self.host.unload_lora_weights()
        self.fused = True

    def _apply(self) -> None:
        if self.scales:
            self.host.set_adapters(list(self.scales), adapter_weights=list(self.scales.values()))

    def _forget(self, name: str) -> None:
        try:
            self.host.delete_adapters(name)
        except (ValueError, KeyError, AttributeError):
            pass  # nothing of it was loaded

    def _check_fits(self, state_dict: dict, what: Any) -> None:
        """The modules a LoRA names exist in the base with the input width of its down/A matrix.

        One width that differs, or most of its modules missing, means another base family; a few missing
        modules are left to diffusers (it skips them with a warning, as for any pipeline).
        """
        if not any("lora" in key for key in state_dict):
            raise CheckpointError(f"{what} is not a LoRA: none of its {len(state_dict)} tensors is a LoRA weight "
                                  "(lora_A/lora_B, lora_down/lora_up); an adapter or ControlNet file loads as one")
        modules = {"unet": dict(self.base.unet.named_modules()),
                   "text_encoder": dict(self.base.text_encoder.named_modules())}
        if self.base.text_encoder_2 is not None:
            modules["text_encoder_2"] = dict(self.base.text_encoder_2.named_modules())
        named, missing = 0, []
        for key, tensor in state_dict.items():
            if not any(part in key for part in (".lora_A.", ".lora.down.", ".lora_down.", ".lora_linear_layer.down.")):
                continue
            prefix, _, rest = key.partition(".")
            if prefix not in modules:
                if prefix == "text_encoder_2":
                    raise ConfigError(f"LoRA {what} is for SDXL (it has a second text encoder); this base is "
                                      f"{_family(self.base)}")
                continue
            path = rest.split(".lora", 1)[0]
            if prefix != "unet" and "text_model" not in modules[prefix]:
                # transformers 5's CLIP text models lost their `text_model.` level; LoRAs made before keep it, and
                # diffusers strips it (`_load_lora_into_text_encoder`)
                path = path.removeprefix("text_model.")
            module = modules[prefix].get(path)
            named += 1
            if module is None:
                missing.append(f"{prefix}.{path}")
                continue
            width = getattr(module, "in_features", getattr(module, "in_channels", None))
            if width is not None and tensor.ndim >= 2 and tensor.shape[1] != width:
                raise ConfigError(f"LoRA {what} does not fit this base ({_family(self.base)}): {prefix}.{path} "
                                  f"takes {width} inputs, the LoRA {tensor.shape[1]}")
        if missing and 2 * len(missing) > named:
            raise ConfigError(f"LoRA {what} does not fit this base ({_family(self.base)}): {len(missing)} of its "
                              f"{named} modules are missing here, e.g. {missing[0]}")
