"""A training run's speed and memory: samples per second and the accelerator's peak memory (issue 16).

The adapter-vs-ControlNet comparison quotes these from the trainer's own log (`train_summary.json`), so
both kinds are measured by one piece of code. Times are read where the loop already waits for the device
(the loss read at each log step, and the end of the run), so measuring adds no synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUMMARY_FILE = "train_summary.json"  # written into the run's output_dir by the main process


@dataclass(frozen=True)
class Throughput:
    """Samples/s of one run: `overall` from the first step's start to the last step's end (data loading,
    warm-up and checkpoints included), `steady` between the first and the last log step (cuDNN autotuning,
    compilation and DataLoader start-up excluded; None with fewer than two log steps)."""

    steps: int  # optimiser steps this run did
    samples: int  # steps × batch × grad_accumulation × processes
    seconds: float  # loop wall time
    samples_per_second: float | None
    steady_samples_per_second: float | None


class Meter:
    """Collects (step, seconds) marks during a run and turns them into a `Throughput`."""

    def __init__(self, first_step: int, samples_per_step: int, start: float) -> None:
        self.first_step, self.samples_per_step, self.start = first_step, samples_per_step, start
        self.marks: list[tuple[int, float]] = []

    def mark(self, step: int, now: float) -> None:
        """A log step: the device has finished `step` at `now` (the loss was just read back)."""
        self.marks.append((step, now))

    def result(self, last_step: int, end: float) -> Throughput:
        steps = last_step - self.first_step
        samples = steps * self.samples_per_step
        seconds = end - self.start
        steady = None
        if len(self.marks) >= 2:
            (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
            if s1 > s0 and t1 > t0:
                steady = (s1 - s0) * self.samples_per_step / (t1 - t0)
        return Throughput(steps, samples, seconds, samples / seconds if seconds > 0 and steps else None, steady)


def loss_curve(losses: list[float], last_step: int, points: int = 20) -> list[dict[str, float]]:
    """The run's loss as `points` means over equal runs of consecutive steps (per-step diffusion losses are too
    noisy to read a plateau from): [{"first_step", "last_step", "loss"}], steps counted as the trainer does."""
    n = len(losses)
    if n == 0:
        return []
    first = last_step - n + 1
    points = max(1, min(points, n))
    curve = []
    for i in range(points):
        a, b = i * n // points, (i + 1) * n // points
        curve.append({"first_step": first + a, "last_step": first + b - 1, "loss": sum(losses[a:b]) / (b - a)})
    return curve


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """`torch.cuda.max_memory_allocated` since the run started, in GiB (this process); None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def device_name(device: torch.device) -> str:
    """The card's name (`NVIDIA H200`), or the device type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


__all__ = ["Meter", "SUMMARY_FILE", "Throughput", "device_name", "loss_curve", "peak_memory_gib", "reset_peak_memory"]
