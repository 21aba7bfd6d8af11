"""`POST /v1/extract`: which extractors the server offers, their options from JSON, a small instance cache."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from PIL import Image

from t2iadapter import extractors
from t2iadapter.errors import ConfigError
from t2iadapter.server.generation import check_name

# Options that name files or devices are the operator's choice, never a client's.
SERVER_ONLY_OPTIONS = frozenset({"model", "device"})


def offered() -> list[str]:
    """Extractors that turn an image into a condition image (not JSON/label-map inputs, not style tokens)."""
    return [n for n in extractors.names() if extractors.info(n).input_kind == "image" and extractors.info(n).channels]


def describe(name: str) -> dict[str, Any]:
    cls = extractors.info(name)
    return {
        "name": name,
        "channels": cls.channels,
        "feeds": list(cls.feeds),
        "needs_weights": bool(cls.weights),
        "recipe": cls.recipe,
        "options": {k: default for k, (_t, default) in cls.options().items() if k not in SERVER_ONLY_OPTIONS},
    }


class ExtractorPool:
    """Builds extractors on demand, keeps the last few (model-based ones hold weights), runs one at a time."""

    def __init__(self, keep: int = 4) -> None:
        self._cache: OrderedDict[tuple, extractors.Extractor] = OrderedDict()
        self._keep = keep
        self._lock = threading.Lock()
        self.names = offered()

    def build(self, name: str, options: dict[str, Any]) -> extractors.Extractor:
        """Check the name and options (typed like the CLI's) and return a ready extractor."""
        check_name(name, self.names, "extractor")
        forbidden = sorted(SERVER_ONLY_OPTIONS & set(options))
        if forbidden:
            raise ConfigError(f"option {', '.join(forbidden)} is set by the server operator, not per request")
        cls = extractors.info(name)
        values = cls.coerce({k: str(v) for k, v in options.items()})
        key = (name, tuple(sorted(values.items())))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        extractor = extractors.get(name, **values)
        with self._lock:
            self._cache[key] = extractor
            while len(self._cache) > self._keep:
                self._cache.popitem(last=False)
        return extractor

    def run(self, extractor: extractors.Extractor, image: Image.Image) -> Image.Image:
        """Blocking: call from a worker thread."""
        with self._lock:
            out = extractor(image)
        if not isinstance(out, Image.Image):
            raise ConfigError(f"extractor {extractor.name!r} does not produce an image")
        return out
