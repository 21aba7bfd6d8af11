"""Files shipped inside the package: the embedded demo model, its adapters and ControlNets (fp16 safetensors)."""
from __future__ import annotations

from pathlib import Path

from t2iadapter.errors import MissingWeightsError

ROOT = Path(__file__).resolve().parent
DEMO = ROOT / "demo"
DEMO_CONTROLNETS = DEMO / "controlnets"  # `demo/<name>` ControlNets: our single files (issue 16), when shipped


def demo_base_path() -> Path:
    """The demo base model: a diffusers pipeline folder."""
    path = DEMO / "base"
    if not (path / "model_index.json").is_file():
        raise MissingWeightsError(f"the embedded demo base model is missing from {path}; reinstall t2iadapter")
    return path


def demo_adapter_names() -> list[str]:
    return sorted(p.stem for p in (DEMO / "adapters").glob("*.safetensors")) if (DEMO / "adapters").is_dir() else []


def demo_adapter_path(name: str) -> Path:
    """`demo/<name>` → the shipped single-file adapter."""
    path = DEMO / "adapters" / f"{name}.safetensors"
    if not path.is_file():
        known = ", ".join(f"demo/{n}" for n in demo_adapter_names()) or "none shipped"
        raise MissingWeightsError(f"no demo adapter named {name!r} (known: {known})")
    return path


def demo_controlnet_names() -> list[str]:
    """The shipped demo ControlNets (`demo/controlnet-sketch`, ...); none until one is trained and shipped."""
    return sorted(p.stem for p in DEMO_CONTROLNETS.glob("*.safetensors")) if DEMO_CONTROLNETS.is_dir() else []


def demo_controlnet_path(name: str) -> Path:
    """`demo/<name>` → the shipped single-file ControlNet (one clear error when it is not shipped)."""
    path = DEMO_CONTROLNETS / f"{name}.safetensors"
    if not path.is_file():
        known = ", ".join(f"demo/{n}" for n in demo_controlnet_names()) or "none is shipped yet"
        raise MissingWeightsError(f"no demo ControlNet named {name!r} (shipped: {known}; "
                                  "scripts/train_demo_adapters.py --controlnet-sketch trains one)")
    return path
