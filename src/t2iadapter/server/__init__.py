"""`t2iadapter serve`: an HTTP API and a web page over one `AdapterPipeline` (FastAPI; the `serve` extra).

`create_app(pipeline_or_settings, limits=..., token=...)` builds the app; the model runs on one
worker thread behind a bounded queue, so one generation runs at a time per device.
"""
from t2iadapter.server.app import create_app
from t2iadapter.server.limits import Limits, ServerSettings

__all__ = ["Limits", "ServerSettings", "create_app"]
