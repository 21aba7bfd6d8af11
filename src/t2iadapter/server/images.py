"""Images in and out of the API: base64/upload bytes → bounded PIL image, PIL image → PNG bytes with parameters."""
from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from PIL import Image

from t2iadapter.errors import ConditionError
from t2iadapter.extractors.images import open_image
from t2iadapter.pngmeta import png_info


def b64_bytes(text: str, what: str) -> bytes:
    """Decode base64 (standard alphabet, optional `data:...;base64,` prefix)."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConditionError(f"{what} is not valid base64") from None


def open_bounded(data: bytes, what: str, max_side: int) -> Image.Image:
    """Decode an image, refusing one wider or taller than `max_side` before its pixels are decoded."""
    return open_image(data, what=what, max_side=max_side)


def png_bytes(image: Image.Image, parameters: dict[str, Any] | None = None) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(parameters) if parameters is not None else None)
    return buf.getvalue()


def b64_png(image: Image.Image, parameters: dict[str, Any] | None = None) -> str:
    return base64.b64encode(png_bytes(image, parameters)).decode("ascii")
