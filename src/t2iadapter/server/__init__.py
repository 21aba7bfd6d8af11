"""`t2iadapter serve`: an HTTP API and a web page over one `AdapterPipeline` (FastAPI; the `serve` extra).

`create_app(pipeline(s)_or_settings, limits=..., token=...)` builds the app; one model worker thread per
device behind one bounded queue, each running batches of compatible requests (dynamic batching).
"""
from t2iadapter.server.app import create_app
from t2iadapter.server.limits import Limits, ServerSettings

__all__ = ["Limits", "ServerSettings", "create_app"]
