"""Files shipped inside the package: the embedded demo model and its adapters (fp16 safetensors)."""
from __future__ import annotations

from pathlib import Path

from t2iadapter.errors import MissingWeightsError

ROOT = Path(__file__).resolve().parent
DEMO = ROOT / "demo"


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
