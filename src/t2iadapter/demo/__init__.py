"""The demo wing: the procedural world, the small SD1.5-layout base trained on it, and loading what ships.

world         procedural scenes: images, captions and exact condition maps (draws with the extractors' recipes)
architecture  the demo base's configs and builders (scripts/train_demo_base.py trains it)
loading       the shipped demo weights (t2iadapter/assets/demo) as a ready AdapterPipeline
The offline CLIP tokenizer it builds from the world's vocabulary is `t2iadapter.tokenizer` (the tiny presets use it too).
"""
from __future__ import annotations

from typing import Any

_ARCHITECTURE = ("DemoBaseConfig", "build_demo_base", "build_demo_tokenizer", "count_parameters", "save_demo_base",
                 "scheduler_config", "text_encoder_config", "unet_config", "vae_config")

__all__ = list(_ARCHITECTURE)


def __getattr__(name: str) -> Any:
    # Lazy: `t2iadapter.demo.world` imports without the diffusers/transformers configs of the base.
    if name in _ARCHITECTURE:
        from t2iadapter.demo import architecture

        return getattr(architecture, name)
    raise AttributeError(f"module 't2iadapter.demo' has no attribute {name!r}")
