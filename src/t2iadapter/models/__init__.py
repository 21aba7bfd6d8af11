"""Adapter networks: full (SD1/SD2, SDXL), light (colour), style and the CoAdapter fuser."""
from t2iadapter.models.adapters import FullAdapter, FullAdapterConfig, LightAdapter, LightAdapterConfig
from t2iadapter.models.base import AdapterModule, build_adapter, config_from_dict
from t2iadapter.models.fuser import TASKS, CoAdapterFuser, FuserConfig
from t2iadapter.models.style import StyleAdapter, StyleAdapterConfig

__all__ = [
    "AdapterModule",
    "CoAdapterFuser",
    "FullAdapter",
    "FullAdapterConfig",
    "FuserConfig",
    "LightAdapter",
    "LightAdapterConfig",
    "StyleAdapter",
    "StyleAdapterConfig",
    "TASKS",
    "build_adapter",
    "config_from_dict",
]
