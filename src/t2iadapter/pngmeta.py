"""Generation parameters stored in (and read back from) a PNG text chunk, so a result can be reproduced."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from t2iadapter.errors import T2IAdapterError

CHUNK = "t2iadapter"


def png_info(parameters: dict[str, Any]):
    """A PngInfo with our JSON chunk plus a one-line human summary under `parameters`."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(CHUNK, json.dumps(parameters, sort_keys=True, default=str))
    summary = ", ".join(f"{k}: {v}" for k, v in parameters.items() if k not in ("prompt", "negative_prompt"))
    info.add_text("parameters", f"{parameters.get('prompt', '')}\nNegative prompt: {parameters.get('negative_prompt') or ''}\n{summary}")
    return info


def save_png(image, path: str | Path, parameters: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=png_info(parameters))
    return path


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The parameters a t2iadapter PNG carries; clear errors for other files."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise T2IAdapterError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
    except Exception as exc:
        raise T2IAdapterError(f"{path}: not a readable image ({exc})") from None
    if CHUNK not in text:
        raise T2IAdapterError(f"{path}: carries no t2iadapter generation parameters")
    try:
        params = json.loads(text[CHUNK])
    except (ValueError, RecursionError):  # (JSON nested past Python's recursion limit)
        params = None
    if not isinstance(params, dict) or not params:
        raise T2IAdapterError(f"{path}: its t2iadapter chunk is not a JSON object of generation parameters "
                              f"(edited or damaged); take the parameters from the program that wrote it")
    return params
