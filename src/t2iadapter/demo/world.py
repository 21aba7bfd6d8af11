"""The embedded demo's procedural world: seeded scenes with captions and exact condition maps.

Every scene is a light, low-saturation background with 1–4 saturated, shaded objects (circle,
square, triangle, star, ring, stick-figure person) drawn far to near. From the same geometry the
generator renders the condition maps the T2I-Adapter paper (arXiv 2302.08453, §3.3/§4) trains on:
sketch (outlines), segmentation (colour per kind), depth (near = bright), OpenPose skeletons,
the colour palette (the original recipe: bicubic down by 64, nearest up) and the foreground mask.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from t2iadapter.extractors import classic, pose

logger = logging.getLogger(__name__)

# Training and held-out evaluation seeds never overlap; built-in demo scenes use a third range.
TRAIN_SEEDS = range(0, 1_000_000)
EVAL_SEEDS = range(10_000_000, 10_100_000)
BUILTIN_SEEDS: tuple[int, ...] = (20_000_005, 20_000_024, 20_000_018, 20_000_028, 20_000_064)

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "person")
SIZES: tuple[str, ...] = ("small", "large")

# Named object colours: saturated, hues well apart (0°, 30°, 52°, 130°, 185°, 225°, 275°, 325°),
# max channel ≤ 230 so the shading below never clips (clipping would shift the hue).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 36, 36),
    "orange": (230, 128, 20),
    "yellow": (228, 200, 24),
    "green": (36, 170, 62),
    "cyan": (24, 186, 206),
    "blue": (40, 76, 222),
    "purple": (140, 56, 206),
    "pink": (228, 84, 170),
}

# Segmentation colour per kind (fixed; black is background).
SEG_COLOURS: dict[str, tuple[int, int, int]] = {
    "circle": (230, 25, 75),
    "square": (60, 180, 75),
    "triangle": (255, 225, 25),
    "star": (0, 130, 200),
    "ring": (245, 130, 48),
    "person": (145, 30, 180),
}

# Fewest share of an object's pixels that nearer objects may leave visible.
MIN_VISIBLE = 0.4

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below", "in front of", "behind")

# Every word a caption can contain (the demo tokenizer's vocabulary).
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(["a", "and", *SIZES, *COLOURS, *KINDS, *(w for r in RELATIONS for w in r.split())])
)

# Condition maps render_condition() can return; "canny" is derived from the image as the original does.
CONDITIONS: tuple[str, ...] = ("sketch", "seg", "depth", "pose", "color", "canny", "mask", "image")
_RENDERED: tuple[str, ...] = ("image", "sketch", "seg", "depth", "pose", "color", "mask")

# OpenPose (COCO-18) keypoint order; limb pairs (0-based) and colours are the pose extractor's (the original's).
KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
)  # fmt: skip
OPENPOSE_LIMBS: tuple[tuple[int, int], ...] = tuple((a - 1, b - 1) for a, b in pose.LIMBS[: pose.DRAWN_LIMBS])
OPENPOSE_COLOURS: tuple[tuple[int, int, int], ...] = pose.COLORS

# Stick-figure limbs drawn into the image (the torso is neck → mid-hip, drawn separately).
_FIGURE_LIMBS: tuple[tuple[int, int], ...] = (
    (2, 5), (2, 3), (3, 4), (5, 6), (6, 7), (8, 11), (8, 9), (9, 10), (11, 12), (12, 13),
)  # fmt: skip


@dataclass(frozen=True, eq=False)
class SceneObject:
    """One object of a scene: what it is, where it is, and the pixels it shows."""

    kind: str  # one of KINDS
    colour: str  # a key of COLOURS
    size: str  # "small" or "large"
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the whole shape, exclusive end
    depth: float  # 0 = farthest plane, 1 = nearest
    depth_rank: int  # 0 = nearest object of the scene
    mask: np.ndarray = field(repr=False)  # bool HxW, the visible pixels (after occlusion)
    keypoints: np.ndarray | None = field(default=None, repr=False)  # float32 18x2 (x, y), persons only

    @property
    def centre(self) -> tuple[float, float]:
        """Centre of the bounding box (x, y)."""
        return (self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2


@dataclass(frozen=True, eq=False)
class Scene:
    """A rendered scene: the image, its caption, every exact condition map and per-object metadata."""

    seed: int
    size: int
    caption: str
    objects: tuple[SceneObject, ...]
    image: np.ndarray = field(repr=False)  # uint8 HxWx3 RGB
    sketch: np.ndarray = field(repr=False)  # uint8 HxW, white outlines on black
    seg: np.ndarray = field(repr=False)  # uint8 HxWx3, SEG_COLOURS per kind on black
    depth: np.ndarray = field(repr=False)  # uint8 HxWx3 grey, near = bright, background dark
    pose: np.ndarray = field(repr=False)  # uint8 HxWx3, OpenPose skeletons on black
    color: np.ndarray = field(repr=False)  # uint8 HxWx3, colour palette of the image
    mask: np.ndarray = field(repr=False)  # bool HxW, foreground


@dataclass(frozen=True)
class SceneBatch:
    """Many scenes stacked (the fast path for training): arrays N×… per requested map, and captions."""

    seeds: tuple[int, ...]
    captions: tuple[str, ...]
    maps: dict[str, np.ndarray]  # name -> uint8/bool array with a leading batch axis


@dataclass(frozen=True)
class _Shape:
    """Geometry of one object before rendering."""

    kind: str
    colour: str
    size: str
    cx: float
    cy: float
    extent: float  # side of the square the shape fits in, pixels
    angle: float  # rotation, radians
    depth: float
    keypoints: np.ndarray | None  # 18x2 for persons


@dataclass(frozen=True)
class _Layout:
    """A scene's random choices: background and shapes (far to near), caption."""

    size: int
    shapes: tuple[_Shape, ...]
    background: np.ndarray  # uint8 HxWx3
    light: tuple[float, float]  # unit light direction (x, y) for the shading
    caption: str


def _polygon(shape: _Shape, points: np.ndarray) -> np.ndarray:
    """Unit-square points (x, y in [-0.5, 0.5]) rotated, scaled and placed, as int32 for cv2."""
    c, s = math.cos(shape.angle), math.sin(shape.angle)
    rot = np.array([[c, -s], [s, c]], dtype=np.float64)
    pts = points @ rot.T * shape.extent + (shape.cx, shape.cy)
    return np.round(pts).astype(np.int32)


def _star_points(inner: float = 0.45) -> np.ndarray:
    """A five-pointed star inscribed in the unit square, point up."""
    a = -math.pi / 2 + np.arange(10) * math.pi / 5
    r = np.where(np.arange(10) % 2 == 0, 0.5, 0.5 * inner)
    return np.stack([r * np.cos(a), r * np.sin(a) + 0.04], axis=1)


_SQUARE = np.array([[-0.42, -0.42], [0.42, -0.42], [0.42, 0.42], [-0.42, 0.42]])
_TRIANGLE = np.array([[0.0, -0.5], [0.5, 0.4], [-0.5, 0.4]])
_STAR = _star_points()


def _person_keypoints(rng: np.random.Generator, cx: float, cy: float, height: float) -> np.ndarray:
    """18 COCO/OpenPose keypoints of a front-facing stick figure with random arm and leg angles."""
    kp = np.zeros((18, 2), dtype=np.float64)
    head_y, neck_y, hip_y = 0.09, 0.21, 0.52
    kp[0] = (0.0, head_y)
    kp[1] = (0.0, neck_y)
    kp[14], kp[15] = (-0.03, head_y - 0.025), (0.03, head_y - 0.025)
    kp[16], kp[17] = (-0.065, head_y - 0.01), (0.065, head_y - 0.01)
    for side, (sh, el, wr) in ((-1.0, (2, 3, 4)), (1.0, (5, 6, 7))):
        kp[sh] = (side * 0.13, neck_y + 0.01)
        up = rng.uniform(math.radians(10), math.radians(150))  # from hanging down towards raised
        bend = up + rng.uniform(-0.6, 0.9)
        kp[el] = kp[sh] + 0.16 * np.array([side * math.sin(up), math.cos(up)])
        kp[wr] = kp[el] + 0.15 * np.array([side * math.sin(bend), math.cos(bend)])
    for side, (hp, kn, an) in ((-1.0, (8, 9, 10)), (1.0, (11, 12, 13))):
        kp[hp] = (side * 0.07, hip_y)
        spread = rng.uniform(0.02, 0.45)
        knee = spread + rng.uniform(-0.25, 0.1)
        kp[kn] = kp[hp] + 0.22 * np.array([side * math.sin(spread), math.cos(spread)])
        kp[an] = kp[kn] + 0.22 * np.array([side * math.sin(knee), math.cos(knee)])
    lo, hi = kp.min(axis=0), kp.max(axis=0)
    kp -= (lo + hi) / 2  # centre the figure on (cx, cy)
    scale = height / max(hi[1] - lo[1] + 0.16, 1e-6)  # + head radius above the nose and below the feet
    return (kp * scale + (cx, cy)).astype(np.float32)


def _draw_shape(shape: _Shape, canvas: np.ndarray, value: int | tuple[int, ...]) -> None:
    """Draw the filled shape into `canvas` (mask or image) with cv2, no anti-aliasing (exact masks)."""
    if shape.kind == "circle":
        cv2.circle(canvas, (round(shape.cx), round(shape.cy)), round(shape.extent / 2), value, -1, cv2.LINE_8)
    elif shape.kind == "ring":
        outer = round(shape.extent / 2)
        thickness = max(2, round(outer * 0.42))
        radius = outer - thickness // 2
        cv2.circle(canvas, (round(shape.cx), round(shape.cy)), radius, value, thickness, cv2.LINE_8)
    elif shape.kind in ("square", "triangle", "star"):
        pts = {"square": _SQUARE, "triangle": _TRIANGLE, "star": _STAR}[shape.kind]
        cv2.fillPoly(canvas, [_polygon(shape, pts)], value, cv2.LINE_8)
    elif shape.kind == "person":
        kp = np.round(shape.keypoints).astype(np.int32)
        limb = max(2, round(shape.extent * 0.055))
        for a, b in _FIGURE_LIMBS:
            cv2.line(canvas, tuple(kp[a]), tuple(kp[b]), value, limb, cv2.LINE_8)
        hip = np.round((shape.keypoints[8] + shape.keypoints[11]) / 2).astype(np.int32)
        cv2.line(canvas, tuple(kp[1]), tuple(hip), value, round(limb * 1.6), cv2.LINE_8)
        cv2.circle(canvas, tuple(kp[0]), max(3, round(shape.extent * 0.075)), value, -1, cv2.LINE_8)
    else:
        raise ValueError(f"unknown object kind {shape.kind!r}; expected one of {KINDS}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light, low-saturation background: tinted linear gradient, soft noise, or vignette."""
    style = int(rng.integers(3))
    low = 32  # smooth fields are computed at 32² and upsampled bilinearly
    yy, xx = np.mgrid[0:low, 0:low].astype(np.float32) / (low - 1)
    if style == 0:  # linear gradient in a random direction
        a = rng.uniform(0, 2 * math.pi)
        t = (xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a) + 0.5
        v0, v1 = rng.uniform(0.55, 0.97, size=2)
        value = v0 + (v1 - v0) * t
    elif style == 1:  # soft noise: a coarse random grid upsampled bicubically
        cells = int(rng.integers(2, 7))
        grid = rng.uniform(0.55, 0.95, size=(cells, cells)).astype(np.float32)
        value = cv2.resize(grid, (low, low), interpolation=cv2.INTER_CUBIC)
    else:  # vignette: bright centre, darker corners
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        inner, outer = rng.uniform(0.8, 0.97), rng.uniform(0.5, 0.7)
        value = inner + (outer - inner) * np.clip(r / 0.75, 0, 1)
    value = np.clip(value, 0.45, 0.98).astype(np.float32)
    tint = np.array(cv2.cvtColor(np.uint8([[[rng.integers(180), 255, 255]]]), cv2.COLOR_HSV2RGB)[0, 0], np.float32)
    sat = rng.uniform(0.0, 0.1)  # channel = value · (1 − sat · (1 − tint/255)): saturation ≤ sat
    rgb = value[..., None] * (1.0 - sat * (1.0 - tint / 255.0)) * 255.0 + 0.5
    rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)
    return rgb.astype(np.uint8)  # values stay in [114, 250]: no clipping needed


def _relation(a: _Shape, b: _Shape, overlap: bool) -> str:
    """The spatial relation of a to b: in front of/behind when they overlap, else the dominant axis."""
    if overlap:
        return "in front of" if a.depth > b.depth else "behind"
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _caption(rng: np.random.Generator, shapes: Sequence[_Shape], full_masks: Sequence[np.ndarray]) -> str:
    """A caption naming every object (size, colour, kind), pairing them with spatial relations."""
    order = [int(i) for i in rng.permutation(len(shapes))]
    parts = []
    for k in range(0, len(order), 2):
        a = shapes[order[k]]
        phrase = f"a {a.size} {a.colour} {a.kind}"
        if k + 1 < len(order):
            ia, ib = order[k], order[k + 1]
            b = shapes[ib]
            inter = np.count_nonzero(full_masks[ia] & full_masks[ib])
            smaller = min(np.count_nonzero(full_masks[ia]), np.count_nonzero(full_masks[ib]))
            phrase += f" {_relation(a, b, inter > 0.08 * max(smaller, 1))} a {b.size} {b.colour} {b.kind}"
        parts.append(phrase)
    return " and ".join(parts)


def _sample_shapes(rng: np.random.Generator, size: int) -> list[_Shape]:
    """1–4 objects with kinds, colours, sizes, positions (kept apart) and distinct depths, far to near."""
    n = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.3, 0.3, 0.2]))
    depths = np.sort(rng.choice(np.linspace(0.0, 1.0, 9), size=n, replace=False))
    shapes: list[_Shape] = []
    placed: list[tuple[float, float, float]] = []
    for i in range(n):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        big = bool(rng.integers(2))
        extent = size * (rng.uniform(0.40, 0.52) if big else rng.uniform(0.20, 0.27))
        if kind == "person":
            extent *= 1.25  # tall and thin: same visual weight as the other kinds
        half = extent / 2
        best, best_gap = (size / 2, size / 2), -math.inf
        for _ in range(40):  # keep centres apart so that no object is mostly hidden
            cx, cy = rng.uniform(half, size - half, size=2) if half < size / 2 else (size / 2, size / 2)
            gap = min((math.hypot(cx - px, cy - py) - 0.6 * (half + ph) for px, py, ph in placed), default=0.0)
            if gap > best_gap:
                best, best_gap = (float(cx), float(cy)), gap
            if gap >= 0:
                break
        cx, cy = best
        placed.append((cx, cy, half))
        angle = float(rng.uniform(-0.5, 0.5)) if kind in ("square", "triangle", "star") else 0.0
        kp = _person_keypoints(rng, cx, cy, extent) if kind == "person" else None
        shapes.append(
            _Shape(kind, colour, "large" if big else "small", cx, cy, extent, angle, float(depths[i]), kp)
        )
    return shapes


def _layout(seed: int, size: int) -> tuple[_Layout, list[np.ndarray]]:
    """The random choices of scene `seed`, and each shape's full (unoccluded) bool mask."""
    if size < 64 or size % 64:
        raise ValueError(f"world size must be a positive multiple of 64 (the palette recipe), got {size}")
    rng = np.random.default_rng(seed)
    background = _background(rng, size)
    a = rng.uniform(0, 2 * math.pi)
    for _ in range(8):  # resample the objects while one of them would be mostly hidden
        shapes = _sample_shapes(rng, size)
        masks = []
        for shape in shapes:
            m = np.zeros((size, size), np.uint8)
            _draw_shape(shape, m, 1)
            masks.append(m.view(bool))
        shown = [np.count_nonzero(v) / max(np.count_nonzero(m), 1) for v, m in zip(_visible_masks(masks), masks)]
        if min(shown) >= MIN_VISIBLE:
            break
    caption = _caption(rng, shapes, masks)
    layout = _Layout(size, tuple(shapes), background, (math.cos(a), math.sin(a)), caption)
    return layout, masks


def _visible_masks(full_masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each shape's visible pixels: its mask minus every nearer (later) shape's mask."""
    visible, covered = [], np.zeros_like(full_masks[0])
    for m in reversed(full_masks):
        visible.append(m & ~covered)
        covered = covered | m
    return visible[::-1]


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1), exclusive end, of a bool mask."""
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    return x, y, x + w, y + h


def palette(image: np.ndarray) -> np.ndarray:
    """The colour condition as the original makes it: the colour extractor's palette (bicubic down by 64, nearest up)."""
    return classic.palette(image, 64)


def draw_openpose(keypoints: Iterable[np.ndarray], size: int, stickwidth: int | None = None) -> np.ndarray:
    """OpenPose body drawing: joints as coloured dots, limbs as coloured ellipses blended at 0.6, on black.

    The pose extractor's colours and limbs, drawn at scene scale: stick width and joint radius grow with the
    image (the extractor's are fixed at 4 px) and positions are rounded, not truncated, so small scenes keep
    their limbs; the demo's pose adapter was trained on exactly these maps.
    """
    canvas = np.zeros((size, size, 3), np.uint8)
    stick = stickwidth if stickwidth is not None else max(2, round(size / 64))
    people = [np.asarray(k, np.float64) for k in keypoints]
    for kp in people:
        for i, (x, y) in enumerate(kp):
            cv2.circle(canvas, (round(x), round(y)), stick, OPENPOSE_COLOURS[i], -1)
    for kp in people:
        # Blending only touches the skeleton's box (plus the stick width), the same result as full-frame.
        x0, y0 = np.floor(kp.min(axis=0)).astype(int) - 2 * stick
        x1, y1 = np.ceil(kp.max(axis=0)).astype(int) + 2 * stick + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
        view = canvas[y0:y1, x0:x1]
        for i, (a, b) in enumerate(OPENPOSE_LIMBS):
            (xa, ya), (xb, yb) = kp[a] - (x0, y0), kp[b] - (x0, y0)
            length = math.hypot(xb - xa, yb - ya)
            angle = math.degrees(math.atan2(yb - ya, xb - xa))
            poly = cv2.ellipse2Poly(
                (round((xa + xb) / 2), round((ya + yb) / 2)), (round(length / 2), stick), round(angle), 0, 360, 1
            )
            limb = view.copy()
            cv2.fillConvexPoly(limb, poly, OPENPOSE_COLOURS[i])
            view[...] = cv2.addWeighted(view, 0.4, limb, 0.6, 0)
    return canvas


def _ramp(shape: _Shape, box: tuple[int, int, int, int], direction: tuple[float, float]) -> np.ndarray:
    """Over a box, the signed distance along `direction` from the shape's centre, in half-extents (float32)."""
    x0, y0, x1, y1 = box
    r = max(shape.extent / 2, 1.0)
    xs = (np.arange(x0, x1, dtype=np.float32) - shape.cx) * (direction[0] / r)
    ys = (np.arange(y0, y1, dtype=np.float32) - shape.cy) * (direction[1] / r)
    return ys[:, None] + xs[None, :]


def _render(layout: _Layout, full_masks: Sequence[np.ndarray], names: Iterable[str]) -> dict[str, np.ndarray]:
    """Render the requested maps (names from _RENDERED) of a layout."""
    names = set(names)
    size = layout.size
    visible = _visible_masks(full_masks)
    boxes = [_bbox(m) for m in visible]
    out: dict[str, np.ndarray] = {}
    label = np.zeros((size, size), np.uint8)  # 0 = background, i + 1 = shape i (visible)
    for i, m in enumerate(visible):
        np.copyto(label, np.uint8(i + 1), where=m)
    if names & {"image", "color"}:
        image = layout.background.copy()
        for shape, m, box in zip(layout.shapes, visible, boxes, strict=True):
            x0, y0, x1, y1 = box
            if x1 <= x0:
                continue
            # Light from one direction for the whole scene: the lit side ×1.1, the far side ×0.68.
            shade = np.clip(0.92 - 0.2 * _ramp(shape, box, layout.light), 0.68, 1.1)
            colour = shade[..., None] * np.array(COLOURS[shape.colour], np.float32) + 0.5
            np.copyto(image[y0:y1, x0:x1], colour.astype(np.uint8), where=m[y0:y1, x0:x1, None])
        out["image"] = image
        if "color" in names:
            out["color"] = palette(image)
    if "mask" in names:
        out["mask"] = label > 0
    if "sketch" in names:
        kernel = np.ones((3, 3), np.uint8)
        edges = cv2.dilate(label, kernel) != cv2.erode(label, kernel)
        out["sketch"] = edges.view(np.uint8) * np.uint8(255)
    if "seg" in names:
        seg = np.zeros((size, size, 3), np.uint8)
        for shape, m, (x0, y0, x1, y1) in zip(layout.shapes, visible, boxes, strict=True):
            colour = np.array(SEG_COLOURS[shape.kind], np.uint8)
            np.copyto(seg[y0:y1, x0:x1], colour, where=m[y0:y1, x0:x1, None])
        out["seg"] = seg
    if "depth" in names:
        ramp = np.linspace(0.0, 50.0, size, dtype=np.float32).astype(np.uint8)  # floor: far (top) dark
        grey = np.repeat(ramp[:, None], size, axis=1)
        for shape, m, box in zip(layout.shapes, visible, boxes, strict=True):
            x0, y0, x1, y1 = box
            if x1 <= x0:
                continue
            # Constant depth per object, gently shaded: its lower part a little nearer.
            d = 90.5 + 150.0 * shape.depth + 12.0 * _ramp(shape, box, (0.0, 1.0))
            np.copyto(grey[y0:y1, x0:x1], d.astype(np.uint8), where=m[y0:y1, x0:x1])
        out["depth"] = cv2.merge([grey, grey, grey])
    if "pose" in names:
        people = [s.keypoints for s in layout.shapes if s.kind == "person"]
        out["pose"] = draw_openpose(people, size) if people else np.zeros((size, size, 3), np.uint8)
    return out


def generate(seed: int, size: int = 256) -> Scene:
    """Scene `seed` at `size`² with every condition map (deterministic for a seed and size)."""
    layout, full = _layout(seed, size)
    maps = _render(layout, full, _RENDERED)
    visible = _visible_masks(full)
    n = len(layout.shapes)
    objects = tuple(
        SceneObject(
            kind=s.kind,
            colour=s.colour,
            size=s.size,
            bbox=_bbox(full[i]),
            depth=s.depth,
            depth_rank=n - 1 - i,
            mask=visible[i],
            keypoints=None if s.keypoints is None else s.keypoints.copy(),
        )
        for i, s in enumerate(layout.shapes)
    )
    return Scene(seed=seed, size=size, caption=layout.caption, objects=objects, **maps)


def generate_batch(seeds: Iterable[int], size: int = 256, names: Sequence[str] = ("image",)) -> SceneBatch:
    """Only the requested maps (names from CONDITIONS) of many scenes, stacked: the fast path for training."""
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown map(s) {unknown}; expected names from {CONDITIONS}")
    need = set(names) - {"canny"} | ({"image"} if "canny" in names else set())
    seeds = tuple(int(s) for s in seeds)
    captions, stacks = [], {n: [] for n in names}
    for seed in seeds:
        layout, full = _layout(seed, size)
        maps = _render(layout, full, need)
        if "canny" in names:
            maps["canny"] = cv2.Canny(maps["image"], 100, 200)
        captions.append(layout.caption)
        for n in names:
            stacks[n].append(maps[n])
    arrays = {n: np.stack(v) if v else np.zeros((0, size, size), np.uint8) for n, v in stacks.items()}
    return SceneBatch(seeds=seeds, captions=tuple(captions), maps=arrays)


def render_condition(scene: Scene, name: str) -> np.ndarray:
    """The condition map `name` (one of CONDITIONS) of a scene, as a new array."""
    if name == "canny":
        return cv2.Canny(scene.image, 100, 200)  # the original's canny extractor, on the image
    if name not in CONDITIONS:
        raise ValueError(f"unknown condition {name!r}; expected one of {CONDITIONS}")
    return getattr(scene, name).copy()


def builtin_scenes(size: int = 256) -> tuple[Scene, ...]:
    """The hand-picked scenes of the demo grid (BUILTIN_SEEDS: a person, overlaps, several kinds)."""
    return tuple(generate(seed, size) for seed in BUILTIN_SEEDS)
