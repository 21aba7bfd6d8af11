"""`t2iadapter train`: data, recipe, accelerate loop, checkpoints and resume (issue 4; paper arXiv 2302.08453 §4).

`load_config(path, overrides)` reads a TrainConfig; `train(config, resume=None)` runs it. The
loop, data and checkpoint modules import torch/diffusers only when used.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from t2iadapter.train.config import TrainConfig, load_config

if TYPE_CHECKING:
    from t2iadapter.train.loop import TrainResult

__all__ = ["TrainConfig", "load_config", "train"]


def train(config: TrainConfig, resume: str | None = None, **kwargs) -> "TrainResult":
    """Run one training job (CPU, one GPU, or one process of an `accelerate launch`/torchrun job)."""
    from t2iadapter.train.loop import Trainer

    return Trainer(config, **kwargs).run(resume=resume)
