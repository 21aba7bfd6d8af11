"""T2I-Adapter (arXiv 2302.08453): small adapters that give a frozen text-to-image diffusion model
structural control from a condition image, or style control from a reference image."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["AdapterPipeline", "load_adapter", "__version__"]

if TYPE_CHECKING:
    from t2iadapter.formats import load_adapter
    from t2iadapter.generation.pipeline import AdapterPipeline


def __getattr__(name: str) -> Any:
    # Lazy: `import t2iadapter` stays fast; torch/diffusers load on first use.
    if name == "load_adapter":
        from t2iadapter.formats import load_adapter

        return load_adapter
    if name == "AdapterPipeline":
        from t2iadapter.generation.pipeline import AdapterPipeline

        return AdapterPipeline
    raise AttributeError(f"module 't2iadapter' has no attribute {name!r}")
