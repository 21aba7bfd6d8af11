"""Controllability evaluation: generate held-out world scenes under several adapter settings and score them.

For each scene the prompt is its caption and the conditions are its exact maps, so structure
control is measured directly (foreground IoU against the true mask), colour fidelity against the
caption's colours, and the colour adapter against its palette; edge F1 against the true outlines
and the share of background painted as foreground (METRICS says what each averages). Nobody else ships this (DESIGN.md §9).
ControlNets (issue 16) are scored the same way, so adapter and ControlNet rows sit in one table: a
ControlNet's name says which condition it takes (`controlnet-sketch` gets the scene's sketch).
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from t2iadapter.demo import world
from t2iadapter.errors import ConfigError
from t2iadapter.evaluation.metrics import (
    as_rgb,
    colour_accuracy,
    edge_f1,
    foreground_mask,
    iou,
    palette_error,
    spurious_foreground,
    structure_iou,
)

STRUCTURAL = ("sketch", "seg", "depth", "pose")
CONDITIONS = (*STRUCTURAL, "color")  # what an evaluated adapter or ControlNet may take


def condition_of(name: str) -> str | None:
    """The world condition a model's name names (`controlnet-sketch`, `cn_depth` → sketch, depth), or None."""
    return next((part for part in re.split(r"[-_./\s]+", name.lower()) if part in CONDITIONS), None)


@dataclass(frozen=True)
class Setting:
    """One row of the table: which adapters (named by their condition) and ControlNets (named so that
    `condition_of` finds theirs) act, with which adapter weights/windows, composed how."""

    name: str
    adapters: tuple[str, ...] = ()
    weights: tuple[float, ...] | None = None
    windows: tuple[tuple[float, float], ...] | None = None
    compose: str = "sum"
    controlnets: tuple[str, ...] = ()  # issue 16: weight 1, the whole run

    def conditions(self) -> dict[str, str]:
        """Model name → the world condition it gets."""
        return {**{a: a for a in self.adapters}, **{c: condition_of(c) for c in self.controlnets}}


def default_settings(available: Iterable[str], has_fuser: bool, controlnets: Iterable[str] = ()) -> list[Setting]:
    """Text only, each adapter, each ControlNet, weighted and fuser composition of sketch+color, and a 0–0.5
    step window."""
    names = list(available)
    out = [Setting("text only")]
    out += [Setting(n, (n,)) for n in CONDITIONS if n in names]
    out += [Setting(c, controlnets=(c,)) for c in controlnets if condition_of(c) is not None]
    if {"sketch", "color"} <= set(names):
        out.append(Setting("sketch+color (sum)", ("sketch", "color"), (1.0, 1.0)))
        if has_fuser:
            out.append(Setting("sketch+color (fuser)", ("sketch", "color"), (1.0, 1.0), compose="fuser"))
    if "sketch" in names:
        out.append(Setting("sketch, window 0–0.5", ("sketch",), windows=((0.0, 0.5),)))
    return out


# Summary key → what it averages; every metric is a mean over the scenes it applies to, counted in "n_<key>".
METRICS: dict[str, str] = {
    "structure_iou": "foreground IoU against the true mask (pose: inside the persons' boxes)",
    "edge_f1": "F1 of the image's Canny edges against the true outlines, 2 px tolerance (ControlNet++)",
    "spurious_foreground": "share of true-background pixels painted as foreground",
    "colour_accuracy": "share of objects shown in their caption's colour (location-free)",
    "palette_error": "mean absolute palette difference from the colour condition",
    "seconds_per_image": "wall-clock seconds per generated image",
}


@dataclass
class Row:
    """Scores of one setting: per-scene values of each metric in METRICS (a metric may not apply to every scene)."""

    setting: Setting
    values: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in METRICS})

    def summary(self) -> dict[str, float | None | str]:
        """Means and counts: {"setting", metric: mean or None, "n_" + metric: count, "scenes"}."""
        out: dict[str, float | None | str] = {"setting": self.setting.name}
        for key, xs in self.values.items():
            out[key] = float(np.mean(xs)) if xs else None
            out[f"n_{key}"] = len(xs)
        out["scenes"] = len(self.values["seconds_per_image"])
        return out


def person_iou(image: np.ndarray, scene: world.Scene) -> float | None:
    """Foreground IoU against the true mask inside the persons' boxes: the pose adapter only controls people.

    The truth is all of the scene's foreground in the boxes (other objects there included), as the image shows it.
    """
    people = [o for o in scene.objects if o.kind == "person"]
    if not people:
        return None
    box = np.zeros_like(scene.mask)
    for o in people:
        x0, y0, x1, y1 = o.bbox
        box[y0:y1, x0:x1] = True
    return iou(foreground_mask(image) & box, scene.mask & box)


def score(setting: Setting, image: Image.Image, scene: world.Scene, row: Row) -> None:
    """Add one generated image's scores to its row."""
    arr = as_rgb(image, scene.size)
    values = row.values
    conditions = list(setting.conditions().values())
    structural = [c for c in conditions if c in STRUCTURAL]
    if structural == ["pose"]:
        value = person_iou(arr, scene)
        if value is not None:
            values["structure_iou"].append(value)
    else:
        values["structure_iou"].append(structure_iou(arr, scene))
    values["edge_f1"].append(edge_f1(arr, scene))
    values["spurious_foreground"].append(spurious_foreground(arr, scene))
    values["colour_accuracy"].append(colour_accuracy(arr, scene, region="image"))
    if "color" in conditions or not conditions:
        values["palette_error"].append(palette_error(arr, scene.color))


def evaluate(pipe, scenes: Sequence[world.Scene], settings: Sequence[Setting], *, steps: int = 25,
             guidance_scale: float = 5.0, progress: bool = True, keep_images: bool = False, batch: int = 1):
    """Generate every scene under every setting (same seed per scene) → (rows, images by setting name).

    `batch` > 1 runs up to that many scenes of a setting as one batch (`AdapterPipeline.generate_batch`: one UNet
    call per step for all, each scene with its own prompt, conditions and seed): the way to evaluate hundreds of
    scenes on a GPU, where one small image leaves the card idle. A scene's image then matches the unbatched one to
    float rounding, not bitwise (`generate_batch`); `seconds_per_image` is a batch's time over its images. Settings
    the batched loop does not run (ControlNets: `AdapterPipeline.batch_key`) still go one scene at a time.
    """
    from tqdm.auto import tqdm

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be a whole number >= 1, got {batch!r}")
    rows = [Row(s) for s in settings]
    images: dict[str, list[Image.Image]] = {s.name: [] for s in settings}
    bar = tqdm(total=len(scenes) * len(settings), desc="evaluating", disable=not progress)
    for first in range(0, len(scenes), batch):
        chunk = scenes[first:first + batch]
        for row in rows:
            s = row.setting
            requests = [pipe.request(scene.caption, {name: world.render_condition(scene, c)
                                                     for name, c in s.conditions().items()},
                                     steps=steps, guidance_scale=guidance_scale, seed=scene.seed,
                                     size=(scene.size, scene.size),
                                     weights=dict(zip(s.adapters, s.weights)) if s.weights else None,
                                     windows=dict(zip(s.adapters, s.windows)) if s.windows else None, compose=s.compose)
                        for scene in chunk]
            start = time.perf_counter()
            if len(requests) > 1 and pipe.batch_key(requests[0]) is not None:
                results = pipe.generate_batch(requests)
            else:  # one scene, or a setting outside the batched loop (a ControlNet): one at a time
                results = [pipe.generate(req, progress=False) for req in requests]
            seconds = (time.perf_counter() - start) / len(chunk)
            for scene, result in zip(chunk, results):
                row.values["seconds_per_image"].append(seconds)
                score(s, result.image, scene, row)
                if keep_images:
                    images[s.name].append(result.image)
            bar.update(len(chunk))
    bar.close()
    return rows, images


def merge_summaries(parts: Sequence[Sequence[dict]]) -> list[dict]:
    """Combine the summaries of runs over disjoint scenes (e.g. parallel workers) into one, weighting by counts."""
    merged: dict[str, dict] = {}
    for part in parts:
        for s in part:
            m = merged.setdefault(s["setting"], {"setting": s["setting"], "scenes": 0, "_sums": {}, "_counts": {}})
            m["scenes"] += s["scenes"]
            for key in METRICS:
                n = s.get(f"n_{key}", s["scenes"] if key == "seconds_per_image" else 0)
                if s.get(key) is not None and n:
                    m["_sums"][key] = m["_sums"].get(key, 0.0) + s[key] * n
                    m["_counts"][key] = m["_counts"].get(key, 0) + n
    out = []
    for m in merged.values():
        sums, counts = m.pop("_sums"), m.pop("_counts")
        for key in METRICS:
            m[key] = sums[key] / counts[key] if counts.get(key) else None
            m[f"n_{key}"] = counts.get(key, 0)
        out.append(m)
    return out


def format_table(rows: Sequence[Row] | Sequence[dict]) -> str:
    """A markdown table of the rows' means (rows, or their summaries)."""
    def fmt(v, pct=False):
        return "–" if v is None else (f"{100 * v:.0f}%" if pct else f"{v:.3f}")

    lines = ["| setting | structure IoU | edge F1 | spurious fg | colour accuracy | palette error | s/image |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        s = row if isinstance(row, dict) else row.summary()
        lines.append(f"| {s['setting']} | {fmt(s['structure_iou'])} | {fmt(s.get('edge_f1'))} | "
                     f"{fmt(s.get('spurious_foreground'), True)} | {fmt(s['colour_accuracy'], True)} | "
                     f"{fmt(s['palette_error'])} | {fmt(s['seconds_per_image'])} |")
    return "\n".join(lines)
