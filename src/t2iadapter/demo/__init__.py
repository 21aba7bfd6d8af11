"""The embedded demo: the small SD1.5-layout base model trained on the procedural world."""

from t2iadapter.demo.architecture import (
    DemoBaseConfig,
    build_demo_base,
    build_demo_tokenizer,
    count_parameters,
    save_demo_base,
    scheduler_config,
    text_encoder_config,
    unet_config,
    vae_config,
)

__all__ = [
    "DemoBaseConfig",
    "build_demo_base",
    "build_demo_tokenizer",
    "count_parameters",
    "save_demo_base",
    "scheduler_config",
    "text_encoder_config",
    "unet_config",
    "vae_config",
]
