"""`t2iadapter serve`: an HTTP API and a web page over one `AdapterPipeline` (FastAPI; the `serve` extra).

`create_app(pipeline(s)_or_settings, limits=..., token=...)` builds the app; one model worker thread per
device behind one bounded queue, each running batches of compatible requests (dynamic batching).

`create_app` is imported on first use: `Limits`/`ServerSettings` (which `t2iadapter serve` reads to build its
parser) need no FastAPI, so every other command runs without the `serve` extra.
"""
from typing import Any

from t2iadapter.server.limits import Limits, ServerSettings

__all__ = ["Limits", "ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from t2iadapter.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
