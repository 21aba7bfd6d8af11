"""Condition extractors: image → condition image for every released adapter (DESIGN.md §5).

`get(name, **options)` returns a callable; `names()` lists them. Offline extractors need no
weights; model-based ones load theirs lazily from a local folder or the hub (`model=`).
Importing this package imports neither numpy, OpenCV, torch nor transformers.
"""

from __future__ import annotations

from typing import Any

from t2iadapter.errors import ConfigError
from t2iadapter.extractors.annotators import Hed, Lineart, OpenPose, Sketch
from t2iadapter.extractors.base import Extractor
from t2iadapter.extractors.classic import Binarize, Canny, Color, SketchClassic
from t2iadapter.extractors.hf import Depth, Seg, Style, ZoeDepth
from t2iadapter.extractors.palettes import SegPalette
from t2iadapter.extractors.pose import PoseJson

REGISTRY: dict[str, type[Extractor]] = {
    cls.name: cls
    for cls in (
        Canny, Color, SketchClassic, Binarize, PoseJson, SegPalette,
        Sketch, Hed, Lineart, Depth, ZoeDepth, OpenPose, Seg, Style,
    )
}  # fmt: skip

__all__ = ["REGISTRY", "Extractor", "get", "info", "names", "table"]


def names() -> list[str]:
    """Names of all extractors, offline ones first, in registry order."""
    return list(REGISTRY)


def info(name: str) -> type[Extractor]:
    """The extractor class for `name` (its `feeds`, `channels`, `weights`, `recipe`), without building it."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown extractor {name!r}; choose one of: {', '.join(REGISTRY)}") from None


def get(name: str, **options: Any) -> Extractor:
    """A ready-to-call extractor: `get("canny", low=100, high=200)(image) -> PIL.Image`."""
    cls = info(name)
    known = cls.options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(
            f"extractor {name!r} has no option {', '.join(unknown)} (its options: {', '.join(known) or 'none'})"
        )
    return cls(**options)


def table() -> list[tuple[str, str, str, str]]:
    """Rows (extractor, adapters it feeds, needs weights, where the weights come from) for docs and --list."""
    rows = []
    for name, cls in REGISTRY.items():
        source = f"hub {cls.weights} (or --model DIR)" if cls.weights else "-"
        rows.append((name, ", ".join(cls.feeds), "yes" if cls.weights else "no", source))
    return rows
