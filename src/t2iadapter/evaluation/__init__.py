"""Controllability evaluation on the demo world: metrics over generated images."""

from t2iadapter.evaluation.metrics import (
    colour_accuracy,
    edge_f1,
    foreground_mask,
    iou,
    palette_error,
    spurious_foreground,
    structure_iou,
)

__all__ = ["colour_accuracy", "edge_f1", "foreground_mask", "iou", "palette_error", "spurious_foreground", "structure_iou"]
