"""`POST /v1/extract`: which extractors the server offers, their options from JSON, a small instance cache."""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from t2iadapter import extractors
from t2iadapter.errors import ConfigError, MissingWeightsError
from t2iadapter.server.generation import check_name
from t2iadapter.server.jobs import QueueFull, release_memory

log = logging.getLogger(__name__)

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


class ExtractorUnavailable(Exception):
    """An extractor whose weights this server lacks (→ 503): the operator's to fix, not the client's (→ 422)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"extractor {name!r} is not available on this server: its weights are not installed (the "
                         "server log says which); use an extractor that needs no weights (GET /v1/models) or ask the "
                         "operator")


# After an extractor's weights were found missing, refuse it at once for this long: looking again asks the hub,
# which without a network can take seconds (a DNS or connect timeout) on the one extraction thread.
RECHECK_WEIGHTS_S = 60.0


class ExtractorPool:
    """Builds extractors on demand, keeps the last few (model-based ones hold weights), runs one at a time.

    Extractions run on one thread of their own, in arrival order; at most `max_waiting` wait behind the
    running one (one more: QueueFull → 429). Nothing here blocks the event loop: `build` does no work
    and holds its lock only for a dict lookup, and `run` awaits the extraction thread.
    """

    def __init__(self, keep: int = 4, max_waiting: int = 8) -> None:
        self._cache: OrderedDict[tuple, extractors.Extractor] = OrderedDict()
        self._keep = keep
        self._lock = threading.Lock()  # the cache only; never held while an extractor runs
        self._executor: ThreadPoolExecutor | None = None
        self._max_waiting = max_waiting
        self._active = 0  # extractions running or waiting (counted on the event loop)
        self._missing: dict[str, float] = {}  # extractor name → when its weights were last found missing
        self.names = offered()

    def build(self, name: str, options: dict[str, Any]) -> extractors.Extractor:
        """Check the name and options (typed and bounded like the CLI's) and return a ready extractor."""
        check_name(name, self.names, "extractor")
        if time.monotonic() - self._missing.get(name, -math.inf) < RECHECK_WEIGHTS_S:
            raise ExtractorUnavailable(name)
        forbidden = sorted(SERVER_ONLY_OPTIONS & set(options))
        if forbidden:
            raise ConfigError(f"option {', '.join(forbidden)} is set by the server operator, not per request")
        cls = extractors.info(name)
        try:
            texts = {k: str(v) for k, v in options.items()}
        except ValueError:  # an integer with thousands of digits
            raise ConfigError("extractor option values must be short numbers, booleans or strings") from None
        values = cls.coerce(texts)
        key = (name, tuple(sorted(values.items())))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        extractor = extractors.get(name, **values)  # the options' bounds are checked here; weights load on first use
        with self._lock:
            self._cache[key] = extractor
            while len(self._cache) > self._keep:
                self._cache.popitem(last=False)
        return extractor

    async def run(self, extractor: extractors.Extractor, image: Image.Image) -> Image.Image:
        """Run on the extraction thread; QueueFull when `max_waiting` extractions already wait."""
        if self._active > self._max_waiting:
            raise QueueFull(retry_after=1, what="extraction")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="t2iadapter-extract")
        self._active += 1
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._executor, _extract, extractor, image)
        except MissingWeightsError as exc:  # its advice (--model DIR) is for the operator: a client may not set it
            log.warning("extractor %s cannot run: %s", extractor.name, exc)
            self._missing[extractor.name] = time.monotonic()
            raise ExtractorUnavailable(extractor.name) from None
        finally:
            self._active -= 1
        if not isinstance(out, Image.Image):
            raise ConfigError(f"extractor {extractor.name!r} does not produce an image")
        return out

    def close(self) -> None:
        """Drop waiting extractions and let the running one finish on its own (it cannot be interrupted)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _extract(extractor: extractors.Extractor, image: Image.Image) -> Any:
    try:
        return extractor(image)
    finally:
        if image.width * image.height >= BIG_IMAGE:
            release_memory()


BIG_IMAGE = 1024 * 1024  # after extracting from an image this large, hand freed memory back to the OS
