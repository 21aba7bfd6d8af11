"""Offline extractors that need no weights: canny, colour palette, classic sketch, binarised drawing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from t2iadapter.extractors.base import (
    CANNY_ADAPTERS,
    COLOR_ADAPTERS,
    MAX_SIDE,
    SKETCH_ADAPTERS,
    Extractor,
    check,
)

# Upper bounds on options: beyond them a result cannot change, or the work (or memory) explodes:
# cv2.GaussianBlur's kernel is ~6σ wide, so σ=1e9 asks for gigabytes and σ=300 on 4096² took 203 s.
MAX_CANNY = 10_000  # canny thresholds; above 2040 (the largest 8-bit 3x3 Sobel gradient) nothing is an edge
MAX_SIGMA = 32.0  # sketch-classic blur; 1.3 s on a 4096² image on one core
MAX_AREA = MAX_SIDE * MAX_SIDE  # binarize speck size in pixels (the colour palette factor is at most MAX_SIDE)
# sketch-classic normalises by the 99th percentile of the gradient where there is one: over all pixels, a line
# drawing whose edges cover < 1 % of the page has a percentile of 0-ish blur tails and came out black.
EDGE_EPSILON = 1e-3  # Sobel magnitude of luma in [0, 1]; one 8-bit grey level's unblurred step gives 4/255 ≈ 0.016

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from t2iadapter.extractors.images import ImageInput


@dataclass
class Canny(Extractor):
    """Canny edges, white on black; original T2I-Adapter `get_cond_canny`: cv2.Canny(img, 100, 200)."""

    name = "canny"
    feeds = CANNY_ADAPTERS
    channels = 1
    recipe = "cv2.Canny(image, low, high) on the RGB image (original: 100/200)"

    low: int = 100  # hysteresis thresholds of cv2.Canny; the released adapters used 100/200
    high: int = 200  # at most MAX_CANNY: 3x3 Sobel gradients of 8-bit images stay below 2040

    def __post_init__(self) -> None:
        check(
            0 <= self.low <= self.high <= MAX_CANNY,
            f"canny needs 0 <= low <= high <= {MAX_CANNY}, got low={self.low} high={self.high}",
        )

    def __call__(self, image: ImageInput) -> Image.Image:
        import cv2

        from t2iadapter.extractors import images

        return images.to_pil(cv2.Canny(images.to_rgb(image), self.low, self.high))


def palette(rgb: np.ndarray, factor: int = 64) -> np.ndarray:
    """HxWx3 uint8 → its colour palette: INTER_CUBIC down to W/factor×H/factor, INTER_NEAREST back up (original)."""
    import cv2

    height, width = rgb.shape[:2]
    small = cv2.resize(rgb, (max(1, width // factor), max(1, height // factor)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)


@dataclass
class Color(Extractor):
    """Spatial colour palette; original `get_cond_color`: INTER_CUBIC down to W/64×H/64, INTER_NEAREST up."""

    name = "color"
    feeds = COLOR_ADAPTERS
    channels = 3
    recipe = "cv2.resize to (W//64, H//64) INTER_CUBIC, then back to (W, H) INTER_NEAREST"

    factor: int = 64  # the released colour adapter was trained on 1/64 palettes

    def __post_init__(self) -> None:
        check(1 <= self.factor <= MAX_SIDE, f"color needs 1 <= --factor <= {MAX_SIDE}, got {self.factor}")

    def __call__(self, image: ImageInput) -> Image.Image:
        from t2iadapter.extractors import images

        return images.to_pil(palette(images.to_rgb(image), self.factor))


@dataclass
class SketchClassic(Extractor):
    """Network-free edge sketch: Sobel magnitude of a Gaussian-blurred luma, binarised (as PiDiNet > 0.5)."""

    name = "sketch-classic"
    feeds = SKETCH_ADAPTERS
    channels = 1
    recipe = "Gaussian blur → Sobel magnitude / 99th percentile of its edge pixels → > threshold → white on black"

    sigma: float = 1.0  # Gaussian blur before the gradient; larger drops texture, keeps outlines (<= MAX_SIGMA)
    threshold: float = 0.5  # on magnitude / 99th percentile of the edge pixels; the sketch recipe binarises at 0.5

    def __post_init__(self) -> None:
        check(
            0 <= self.sigma <= MAX_SIGMA, f"sketch-classic needs 0 <= --sigma <= {MAX_SIGMA:g}, got {self.sigma}"
        )
        check(0 < self.threshold < 1, f"sketch-classic needs 0 < --threshold < 1, got {self.threshold}")

    def __call__(self, image: ImageInput) -> Image.Image:
        import cv2
        import numpy as np

        from t2iadapter.extractors import images

        gray = images.to_gray(image).astype(np.float32) / 255.0
        if self.sigma > 0:
            gray = cv2.GaussianBlur(gray, (0, 0), self.sigma)
        magnitude = cv2.magnitude(
            cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
        )
        edges = magnitude[magnitude > EDGE_EPSILON]
        if edges.size == 0:  # flat image: no edges at all
            return images.to_pil(np.zeros(gray.shape, np.uint8))
        return images.binary(magnitude / float(np.percentile(edges, 99)), self.threshold)


@dataclass
class Binarize(Extractor):
    """A user's own drawing → clean 1-channel sketch, white strokes on black (the sketch adapters' input)."""

    name = "binarize"
    feeds = SKETCH_ADAPTERS
    channels = 1
    recipe = "luma < threshold (dark strokes on a light ground; auto-detected) → 255, specks < min_area removed"

    threshold: float = 0.5  # fraction of full scale that separates strokes from paper
    strokes: str = (
        "auto"  # "dark" (pen on paper), "light" (chalk on a board) or "auto": the minority side of the median
    )
    min_area: int = 4  # connected stroke pieces smaller than this many pixels are dropped as noise; 0 keeps all

    def __post_init__(self) -> None:
        check(0 < self.threshold < 1, f"binarize needs 0 < --threshold < 1, got {self.threshold}")
        check(
            self.strokes in ("auto", "dark", "light"),
            f"binarize --strokes must be auto, dark or light, not {self.strokes!r}",
        )
        check(
            0 <= self.min_area <= MAX_AREA, f"binarize needs 0 <= --min-area <= {MAX_AREA}, got {self.min_area}"
        )

    def __call__(self, image: ImageInput) -> Image.Image:
        import cv2
        import numpy as np

        from t2iadapter.extractors import images

        gray = images.to_gray(image)
        level = self.threshold * 255.0
        dark = self.strokes == "dark" or (self.strokes == "auto" and float(np.median(gray)) >= level)
        mask = (gray < level) if dark else (gray > level)
        sketch = mask.astype(np.uint8) * 255
        if self.min_area > 1:
            count, labels, stats, _ = cv2.connectedComponentsWithStats(sketch, connectivity=8)
            small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < self.min_area)
            small = small[small != 0]  # component 0 is the background
            if small.size:
                sketch[np.isin(labels, small)] = 0
        return images.to_pil(sketch)
