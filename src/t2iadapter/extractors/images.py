"""Image conversions shared by the extractors: anything image-like → uint8 arrays, arrays → PIL."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from t2iadapter.errors import ConditionError

ImageInput = Union[Image.Image, np.ndarray, str, Path]
ORIENTATION = 0x0112  # the EXIF tag that says how to turn the stored pixels for display


def require_file(path: "str | Path", what: str) -> None:
    """An image path names a file: one line saying whether it is a folder or missing (`what` names it)."""
    if Path(path).is_dir():
        raise ConditionError(f"{what} is a folder; name an image file")
    if not Path(path).is_file():
        raise ConditionError(f"{what} does not exist")


def open_image(source: "str | Path | bytes | dict | Image.Image", what: str | None = None,
               max_side: int | None = None) -> Image.Image:
    """The one image reader: a path, bytes, a `datasets` image dict or a PIL image, fully decoded.

    A truncated or unreadable file fails here (ConditionError, one line), not later; `max_side` refuses a
    larger image before its pixels are decoded. Conditions, extractors, the server and the trainer all read
    images through it.
    """
    if isinstance(source, Image.Image):
        return upright(source)
    if isinstance(source, dict) and (source.get("bytes") or source.get("path")):
        source = source["bytes"] or source["path"]
    if isinstance(source, (bytes, bytearray)):
        what = what or "image"
        if not source:
            raise ConditionError(f"{what} is empty")
        handle: Any = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        what = what or f"image {source}"
        require_file(source, what)
        handle = source
    else:
        raise ConditionError(f"expected an image file, bytes or PIL image, got {type(source).__name__}")
    try:
        image = Image.open(handle)
    except Image.DecompressionBombError:  # its header claims more than ~179M pixels: PIL refuses before decoding
        bound = f"; images may be at most {max_side} pixels a side" if max_side else ""
        limit = 2 * Image.MAX_IMAGE_PIXELS
        raise ConditionError(f"{what} is too large to decode (over {limit} pixels){bound}") from None
    except Exception:
        raise ConditionError(f"cannot read {what}: not an image PIL can read (PNG, JPEG or WebP)") from None
    w, h = image.size
    if max_side is not None and (w > max_side or h > max_side):
        raise ConditionError(f"{what} is {w}x{h}; images may be at most {max_side} pixels a side")
    try:
        image.load()
    except Exception as exc:
        raise ConditionError(f"cannot read {what}: it could not be decoded ({exc})") from None
    return upright(image)


def upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: turned by its EXIF Orientation (a phone photo), as diffusers'
    `load_image` and cv2.imread (the original T2I-Adapter reader) do; an image without one is returned as is."""
    from PIL import ImageOps

    if image.getexif().get(ORIENTATION, 1) in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


# 1-channel modes wider than 8 bits: 16-bit PNG/TIFF greyscale ("I;16"), 32-bit int ("I") and float ("F")
WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit int/float) greyscale image as 8-bit "L": value >> 8 after clipping to 0..65535, as
    cv2.imread reads a 16-bit PNG; PIL's own convert clips every value above 255 to white. Other modes as is."""
    if image.mode not in WIDE_GREY:
        return image
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
    return Image.fromarray((np.clip(values, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8), mode="L")


def to_rgb(image: ImageInput) -> np.ndarray:
    """HxWx3 uint8 RGB; alpha is composited on white as ControlNet's HWC3 does, 16-bit grey is scaled (`eight_bit`)."""
    if isinstance(image, (str, Path)):
        image = open_image(image)
    if isinstance(image, Image.Image):
        image = eight_bit(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
        elif image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        array = np.asarray(image)
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise ConditionError(f"expected a PIL image, a numpy array or a path, got {type(image).__name__}")
    if array.dtype != np.uint8:
        raise ConditionError(f"expected a uint8 image, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape[:2]:
        raise ConditionError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {array.shape}")
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        color = array[:, :, :3].astype(np.float32)
        alpha = array[:, :, 3:4].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def to_gray(image: ImageInput) -> np.ndarray:
    """HxW uint8 luma (ITU-R 601, as cv2.COLOR_RGB2GRAY)."""
    import cv2

    return cv2.cvtColor(to_rgb(image), cv2.COLOR_RGB2GRAY)


def to_labels(image: ImageInput) -> np.ndarray:
    """HxW integer class indices from a 1-channel label map (L, P, I;16, I, or a 2-D array)."""
    if isinstance(image, (str, Path)):
        image = open_image(image)
    if isinstance(image, Image.Image):
        if image.mode in ("RGB", "RGBA"):
            array = np.asarray(image)
        elif image.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            array = np.asarray(image)
        else:
            raise ConditionError(f"a label map must be a 1-channel image of class indices, got mode {image.mode}")
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise ConditionError(f"expected a label map image, array or path, got {type(image).__name__}")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        rgb = array[:, :, :3]
        if not (np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2])):
            raise ConditionError(
                "a label map must hold class indices in one channel; this image has colours "
                "(is it already a colour map?)"
            )
        array = rgb[:, :, 0]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ConditionError(f"a label map must be an HxW integer array, got shape {array.shape} dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise ConditionError("a label map cannot hold negative class indices")
    return array.astype(np.int64)


def to_pil(array: np.ndarray) -> Image.Image:
    """HxW (→ mode L) or HxWx3 (→ RGB) uint8 array as a PIL image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))


def binary(values: np.ndarray, threshold: float) -> Image.Image:
    """White (255) where `values` exceed `threshold`, black elsewhere: the sketch recipes' binarisation."""
    return to_pil(np.where(values > threshold, 255, 0).astype(np.uint8))
