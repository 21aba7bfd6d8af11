"""OpenPose JSON keypoints → skeleton image in OpenPose colours (pytorch-openpose / ControlNet draw_bodypose)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from t2iadapter.errors import ConditionError
from t2iadapter.extractors.base import MAX_SIDE, OPENPOSE_ADAPTERS, Extractor, check

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# 18-point COCO body (OpenPose COCO order): nose, neck, r-shoulder, r-elbow, r-wrist, l-shoulder,
# l-elbow, l-wrist, r-hip, r-knee, r-ankle, l-hip, l-knee, l-ankle, r-eye, l-eye, r-ear, l-ear.
# Limbs as 1-based keypoint pairs; draw_bodypose draws only the first 17 (the last two, ear to
# shoulder, are in the table but never drawn).
LIMBS: tuple[tuple[int, int], ...] = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12),
    (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18),
)  # fmt: skip
DRAWN_LIMBS = 17
# One RGB colour per keypoint and per limb (index i colours keypoint i and limb i).
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
STICK_WIDTH = 4  # half-width of a limb ellipse, pixels
JOINT_RADIUS = 4
# BODY_25 → COCO-18: BODY_25 adds mid-hip (8) and six foot points (19-24).
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
DEFAULT_CANVAS = 512  # pixels a side when neither the options nor the JSON give a canvas size
MAX_COORD = 100_000  # pixels either way: no keypoint of a pose on a <= 4096² canvas is further out (cv2 takes int32)

Person = list[tuple[float, float] | None]  # 18 entries: (x, y) in pixels, None where not detected


def _is_json_text(source: Any) -> bool:
    """A str holding JSON rather than naming a file: it starts with { or [ and no such file exists."""
    if not (isinstance(source, str) and source.lstrip().startswith(("{", "["))):
        return False
    try:
        return not Path(source).is_file()
    except (OSError, ValueError):  # too long a name for the file system, or a NUL in it: not a file's name
        return True


def _canvas_side(value: Any, key: str) -> int:
    """canvas_width/canvas_height from the JSON: a whole number of pixels, 1..MAX_SIDE (0 or absent: the default)."""
    if value is None or value == 0:
        return DEFAULT_CANVAS
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or number != int(number) or not 1 <= number <= MAX_SIDE:
        raise ConditionError(f"pose JSON {key} must be a whole number of pixels from 1 to {MAX_SIDE}, got {value!r}")
    return int(number)


def _keypoint(triple: list[Any], person: int) -> tuple[float, float] | None:
    """One x, y, confidence triple → (x, y), or None where it was not detected (confidence <= 0)."""
    try:
        x, y, c = (float(v) for v in triple)
    except (TypeError, ValueError):
        raise ConditionError(f"person {person}: pose_keypoints_2d must hold numbers, got {triple!r}") from None
    if not all(map(math.isfinite, (x, y, c))):
        raise ConditionError(f"person {person}: pose_keypoints_2d holds a NaN or infinite value ({triple!r})")
    return (x, y) if c > 0 else None


def read_people(source: Any, *, width: int, height: int, normalized: str) -> tuple[list[Person], int, int]:
    """Parse OpenPose JSON ({"people": [{"pose_keypoints_2d": [x, y, c, ...]}]}) into pixel keypoints.

    `source` is a file (a Path is always one; a str unless it is JSON text: starts with { or [ and names no
    file), JSON text or the parsed object. Bad values are one ConditionError line.
    """
    if isinstance(source, os.PathLike) or (isinstance(source, str) and not _is_json_text(source)):
        try:
            with open(source, encoding="utf-8") as handle:
                data = json.load(handle)
        except OSError as exc:
            raise ConditionError(f"cannot read pose JSON {source}: {exc.strerror or exc}") from None
    elif isinstance(source, str):
        data = json.loads(source)
    else:
        data = source
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict) or not isinstance(data.get("people"), list):
        raise ConditionError('pose JSON must be an object with a "people" list (OpenPose output format)')
    width = width or _canvas_side(data.get("canvas_width"), "canvas_width")
    height = height or _canvas_side(data.get("canvas_height"), "canvas_height")
    raw: list[Person] = []
    for index, person in enumerate(data["people"]):
        values = person.get("pose_keypoints_2d") if isinstance(person, dict) else None
        if not isinstance(values, list) or len(values) not in (54, 75):
            raise ConditionError(
                f"person {index}: pose_keypoints_2d must hold 18 (COCO) or 25 (BODY_25) x,y,confidence triples"
            )
        triples = [values[i : i + 3] for i in range(0, len(values), 3)]
        if len(triples) == 25:
            triples = [triples[i] for i in BODY25_TO_COCO18]
        raw.append([_keypoint(triple, index) for triple in triples])
    points = [p for person in raw for p in person if p is not None]
    if normalized == "auto":
        scale = bool(points) and all(0.0 <= v <= 1.0 for p in points for v in p)
    else:
        scale = normalized == "yes"
    if scale:
        raw = [[None if p is None else (p[0] * width, p[1] * height) for p in person] for person in raw]
    for index, person in enumerate(raw):
        far = [p for p in person if p is not None and max(abs(p[0]), abs(p[1])) > MAX_COORD]
        if far:
            raise ConditionError(
                f"person {index}: keypoint {far[0]} lies beyond ±{MAX_COORD} pixels (the canvas is {width}x{height})"
            )
    return raw, width, height


def draw_bodypose(people: list[Person], width: int, height: int, style: str = "original") -> np.ndarray:
    """Draw skeletons on black as ControlNet 1.0's draw_bodypose (used by T2I-Adapter's openpose) or 1.1's."""
    import cv2
    import numpy as np

    canvas = np.zeros((height, width, 3), np.uint8)

    def joints(target: np.ndarray) -> None:
        for person in people:
            for i in range(18):
                if person[i] is not None:
                    x, y = person[i]
                    cv2.circle(target, (int(x), int(y)), JOINT_RADIUS, COLORS[i], thickness=-1)

    def limb_polygon(a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
        length = math.hypot(a[0] - b[0], a[1] - b[1])
        angle = math.degrees(math.atan2(a[1] - b[1], a[0] - b[0]))
        center = (int((a[0] + b[0]) / 2), int((a[1] + b[1]) / 2))
        return cv2.ellipse2Poly(center, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)

    if style == "original":
        # pytorch-openpose / ControlNet 1.0: joints first, then each limb blended in at 60 %.
        joints(canvas)
        for i in range(DRAWN_LIMBS):
            for person in people:
                a, b = person[LIMBS[i][0] - 1], person[LIMBS[i][1] - 1]
                if a is None or b is None:
                    continue
                layer = canvas.copy()
                cv2.fillConvexPoly(layer, limb_polygon(a, b), COLORS[i])
                canvas = cv2.addWeighted(canvas, 0.4, layer, 0.6, 0)
    else:
        # ControlNet 1.1 / controlnet-aux: limbs at full colour, the whole canvas dimmed to 60 %, joints on top.
        for i in range(DRAWN_LIMBS):
            for person in people:
                a, b = person[LIMBS[i][0] - 1], person[LIMBS[i][1] - 1]
                if a is None or b is None:
                    continue
                cv2.fillConvexPoly(canvas, limb_polygon(a, b), COLORS[i])
        canvas = (canvas * 0.6).astype(np.uint8)
        joints(canvas)
    return canvas


@dataclass
class PoseJson(Extractor):
    """OpenPose JSON → skeleton image; input is a .json path, JSON text or the parsed dict."""

    name = "pose-json"
    feeds = OPENPOSE_ADAPTERS
    channels = 3
    recipe = "OpenPose 18-point body keypoints drawn as draw_bodypose does (stick width 4, joint radius 4)"
    input_kind = "OpenPose JSON"
    input_suffixes = (".json",)

    width: int = 0  # canvas size; 0: the JSON's canvas_width/canvas_height, else 512
    height: int = 0
    normalized: str = "auto"  # "yes": coordinates are 0-1 fractions of the canvas; "no": pixels; "auto": all <= 1
    draw: str = "original"  # "original": ControlNet 1.0 drawing (t2iadapter_openpose_sd14v1); "aux": 1.1 (SDXL)

    def __post_init__(self) -> None:
        check(
            0 <= self.width <= MAX_SIDE and 0 <= self.height <= MAX_SIDE,
            f"pose-json needs 0 <= --width, --height <= {MAX_SIDE} (0: the JSON's canvas size), "
            f"got {self.width}x{self.height}",
        )
        check(
            self.normalized in ("auto", "yes", "no"),
            f"pose-json --normalized must be auto, yes or no, not {self.normalized!r}",
        )
        check(self.draw in ("original", "aux"), f"pose-json --draw must be original or aux, not {self.draw!r}")

    def __call__(self, image: Any) -> Image.Image:
        from t2iadapter.extractors import images

        try:
            people, width, height = read_people(image, width=self.width, height=self.height, normalized=self.normalized)
        except json.JSONDecodeError as exc:
            where = "" if _is_json_text(image) else f"{image}: "  # a file (the CLI's IN), not JSON text
            raise ConditionError(f"{where}not valid JSON: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConditionError(f"pose JSON has a malformed value: {exc}") from None
        return images.to_pil(draw_bodypose(people, width, height, self.draw))
