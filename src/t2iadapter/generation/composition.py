"""Composition of adapter outputs (paper §3.4): weighted sum or CoAdapter fuser, gated per step by windows.

Each adapter's output (4 feature maps, or style tokens) is scaled by its weight. At step i the
adapters whose window holds i take part:
- `sum`: their maps are summed and their style tokens concatenated (F = Σ w_k·F_k);
- `fuser`, `fuser_windows="once"` (default; the original CoAdapter): the fuser runs once on every
  condition; each condition's modulated output is gated by its own window and the active ones are
  summed/concatenated. With one shared window this is exactly the original's gating of the fused
  features (`cond_tau`), and with all adapters active exactly `fuser(all)`;
- `fuser`, `fuser_windows="active"`: the fuser runs again on the adapters active at that step (it then
  never sees a condition outside its window).
The trainer composes with the same `fuse`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from t2iadapter.generation.request import Window
from t2iadapter.models.fuser import combine

Features = list[torch.Tensor] | torch.Tensor  # a spatial adapter's maps, or a style adapter's tokens [N, T, D]
Composed = tuple[list[torch.Tensor] | None, torch.Tensor | None]  # (maps, style tokens) for the UNet


def scaled(features: Features, weight: float) -> Features:
    return features * weight if isinstance(features, torch.Tensor) else [t * weight for t in features]


def fuse(fuser: torch.nn.Module, features: Mapping[str, Features]) -> Composed:
    """The CoAdapter fuser over {task: features}: (summed modulated maps, modulated style tokens)."""
    return fuser(dict(features)) if features else (None, None)


class Composition:
    """(maps, tokens) for any set of active adapters, each set composed once per call and cached."""

    def __init__(self, features: Mapping[str, Features], weights: Mapping[str, float], windows: Mapping[str, Window], *,
                 fuser: torch.nn.Module | None = None, tasks: Mapping[str, str] | None = None, fuser_windows: str = "once",
                 finish: Callable[[list[torch.Tensor]], list[torch.Tensor]] = lambda maps: maps) -> None:
        self.names = list(features)
        self.weighted = {n: scaled(features[n], weights[n]) for n in self.names}
        self.windows = dict(windows)
        self.fuser, self.tasks, self.mode = fuser, dict(tasks or {}), fuser_windows
        self.finish = finish  # batch/CFG expansion and memory layout of composed maps
        self.parts: dict[str, Features] | None = None
        if fuser is not None and fuser_windows == "once" and self.names:
            by_task = self.fuser.parts({self.tasks[n]: self.weighted[n] for n in self.names})
            self.parts = {n: by_task[self.tasks[n]] for n in self.names}
        self._cache: dict[frozenset, Composed] = {}

    @property
    def spatial(self) -> frozenset:
        """The adapters that give feature maps (not style tokens)."""
        return frozenset(n for n in self.names if not isinstance(self.weighted[n], torch.Tensor))

    def active(self, step: int, total: int) -> frozenset:
        return frozenset(n for n in self.names if self.windows[n].active(step, total))

    def at(self, step: int, total: int) -> Composed:
        return self.of(self.active(step, total))

    def of(self, active: frozenset) -> Composed:
        if active not in self._cache:
            order = [n for n in self.names if n in active]
            if self.fuser is None:
                maps, seq = combine([self.weighted[n] for n in order])
            elif self.parts is not None:
                maps, seq = combine([self.parts[n] for n in order])
            else:
                maps, seq = fuse(self.fuser, {self.tasks[n]: self.weighted[n] for n in order})
            self._cache[active] = (None if maps is None else self.finish(maps), seq)
        return self._cache[active]
