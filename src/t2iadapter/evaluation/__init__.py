"""Controllability evaluation on the demo world: metrics over generated images."""

from t2iadapter.evaluation.metrics import (
    colour_accuracy,
    foreground_mask,
    iou,
    palette_error,
    structure_iou,
)

__all__ = ["colour_accuracy", "foreground_mask", "iou", "palette_error", "structure_iou"]
