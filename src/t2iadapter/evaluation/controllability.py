"""Controllability evaluation: generate held-out world scenes under several adapter settings and score them.

For each scene the prompt is its caption and the conditions are its exact maps, so structure
control is measured directly (foreground IoU against the true mask), colour fidelity against the
caption's colours, and the colour adapter against its palette. Nobody else ships this (DESIGN.md §9).
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from t2iadapter.demo import world
from t2iadapter.evaluation.metrics import as_rgb, colour_accuracy, foreground_mask, iou, palette_error, structure_iou

STRUCTURAL = ("sketch", "seg", "depth", "pose")


@dataclass(frozen=True)
class Setting:
    """One row of the table: which adapters act, with which weights/windows, composed how."""

    name: str
    adapters: tuple[str, ...] = ()
    weights: tuple[float, ...] | None = None
    windows: tuple[tuple[float, float], ...] | None = None
    compose: str = "sum"


def default_settings(available: Iterable[str], has_fuser: bool) -> list[Setting]:
    """Text only, each adapter, weighted and fuser composition of sketch+color, and a 0–0.5 step window."""
    names = list(available)
    out = [Setting("text only")]
    out += [Setting(n, (n,)) for n in (*STRUCTURAL, "color") if n in names]
    if {"sketch", "color"} <= set(names):
        out.append(Setting("sketch+color (sum)", ("sketch", "color"), (1.0, 1.0)))
        if has_fuser:
            out.append(Setting("sketch+color (fuser)", ("sketch", "color"), (1.0, 1.0), compose="fuser"))
    if "sketch" in names:
        out.append(Setting("sketch, window 0–0.5", ("sketch",), windows=((0.0, 0.5),)))
    return out


@dataclass
class Row:
    """Scores of one setting, averaged over scenes (None where a metric does not apply)."""

    setting: Setting
    iou: list[float] = field(default_factory=list)
    colour: list[float] = field(default_factory=list)
    palette: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float | None | str]:
        mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
        return {"setting": self.setting.name, "structure_iou": mean(self.iou), "colour_accuracy": mean(self.colour),
                "palette_error": mean(self.palette), "seconds_per_image": mean(self.seconds), "scenes": len(self.seconds),
                "n_iou": len(self.iou), "n_colour": len(self.colour), "n_palette": len(self.palette)}


def person_iou(image: np.ndarray, scene: world.Scene) -> float | None:
    """IoU inside the persons' boxes: the pose adapter only controls people."""
    people = [o for o in scene.objects if o.kind == "person"]
    if not people:
        return None
    box = np.zeros_like(scene.mask)
    truth = np.zeros_like(scene.mask)
    for o in people:
        x0, y0, x1, y1 = o.bbox
        box[y0:y1, x0:x1] = True
        truth |= o.mask
    return iou(foreground_mask(image) & box, truth & box)


def score(setting: Setting, image: Image.Image, scene: world.Scene, row: Row) -> None:
    arr = as_rgb(image, scene.size)
    structural = [a for a in setting.adapters if a in STRUCTURAL]
    if structural == ["pose"]:
        value = person_iou(arr, scene)
        if value is not None:
            row.iou.append(value)
    else:
        row.iou.append(structure_iou(arr, scene))
    row.colour.append(colour_accuracy(arr, scene, region="image"))
    if "color" in setting.adapters or not setting.adapters:
        row.palette.append(palette_error(arr, scene.color))


def evaluate(pipe, scenes: Sequence[world.Scene], settings: Sequence[Setting], *, steps: int = 25,
             guidance_scale: float = 5.0, progress: bool = True, keep_images: bool = False):
    """Generate every scene under every setting (same seed per scene) → (rows, images by setting name)."""
    from tqdm.auto import tqdm

    rows = [Row(s) for s in settings]
    images: dict[str, list[Image.Image]] = {s.name: [] for s in settings}
    bar = tqdm(total=len(scenes) * len(settings), desc="evaluating", disable=not progress)
    for scene in scenes:
        for row in rows:
            s = row.setting
            conds = {a: world.render_condition(scene, a) for a in s.adapters}
            start = time.perf_counter()
            image = pipe(scene.caption, conds, steps=steps, guidance_scale=guidance_scale, seed=scene.seed,
                         size=(scene.size, scene.size), weights=dict(zip(s.adapters, s.weights)) if s.weights else None,
                         windows=dict(zip(s.adapters, s.windows)) if s.windows else None, compose=s.compose,
                         progress=False).image
            row.seconds.append(time.perf_counter() - start)
            score(s, image, scene, row)
            if keep_images:
                images[s.name].append(image)
            bar.update()
    bar.close()
    return rows, images


def merge_summaries(parts: Sequence[Sequence[dict]]) -> list[dict]:
    """Combine the summaries of runs over disjoint scenes (e.g. parallel workers) into one, weighting by counts."""
    merged: dict[str, dict] = {}
    for part in parts:
        for s in part:
            m = merged.setdefault(s["setting"], {"setting": s["setting"], "scenes": 0, "n_iou": 0, "n_colour": 0,
                                                 "n_palette": 0, "_sums": {}})
            for key, n in (("structure_iou", "n_iou"), ("colour_accuracy", "n_colour"), ("palette_error", "n_palette"),
                           ("seconds_per_image", "scenes")):
                if s[key] is not None:
                    m["_sums"][key] = m["_sums"].get(key, 0.0) + s[key] * s[n]
            for n in ("scenes", "n_iou", "n_colour", "n_palette"):
                m[n] += s[n]
    out = []
    for m in merged.values():
        sums = m.pop("_sums")
        for key, n in (("structure_iou", "n_iou"), ("colour_accuracy", "n_colour"), ("palette_error", "n_palette"),
                       ("seconds_per_image", "scenes")):
            m[key] = sums[key] / m[n] if key in sums and m[n] else None
        out.append(m)
    return out


def format_table(rows: Sequence[Row] | Sequence[dict]) -> str:
    """A markdown table of the rows' means (rows, or their summaries)."""
    def fmt(v, pct=False):
        return "–" if v is None else (f"{100 * v:.0f}%" if pct else f"{v:.3f}")

    lines = ["| setting | structure IoU | colour accuracy | palette error | s/image |", "|---|---|---|---|---|"]
    for row in rows:
        s = row if isinstance(row, dict) else row.summary()
        lines.append(f"| {s['setting']} | {fmt(s['structure_iou'])} | {fmt(s['colour_accuracy'], True)} | "
                     f"{fmt(s['palette_error'])} | {fmt(s['seconds_per_image'])} |")
    return "\n".join(lines)
