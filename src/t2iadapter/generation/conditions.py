"""Condition inputs → adapter input tensors: the one path every front end and the trainer's validation take.

Anything a user gives (path, PIL image, HxW(xC) array, [C,H,W] tensor) becomes [1, C, H', W'] in [0, 1]:
converted to the adapter's channel count (1 ↔ 3), resized to the output size as diffusers' adapter
pipelines do (PIL LANCZOS, /255), zero-padded right/bottom to the canvas the UNet needs. Fast mode's
byte path (`condition_bytes` → `bytes_to_condition`) gives the same float32 values with 8-bit transfers.
Files are read by `extractors.images.open_image`, the one image reader.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from t2iadapter.errors import ConditionError
from t2iadapter.extractors.images import open_image

ConditionInput = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike


def load_condition(cond: ConditionInput, what: str = "condition image") -> torch.Tensor | Image.Image:
    """A PIL image (paths are read, images kept) or a float [C, H, W] tensor (arrays: uint8 /255); `what` names the
    image in errors (init_image, mask_image)."""
    if isinstance(cond, (str, os.PathLike)):
        image = open_image(cond, what=f"{what} {cond}")
        return image.copy()
    if isinstance(cond, np.ndarray):
        if cond.ndim == 2:
            cond = cond[..., None]
        if cond.ndim != 3:
            raise ConditionError(f"condition array must be HxW or HxWxC, got shape {cond.shape}")
        arr = cond.astype(np.float32) / 255.0 if cond.dtype == np.uint8 else cond.astype(np.float32)
        return _checked(torch.from_numpy(arr).permute(2, 0, 1), what)
    if isinstance(cond, Image.Image):
        if 0 in cond.size:
            raise ConditionError(f"{what} is empty ({cond.size[0]}x{cond.size[1]} pixels)")
        return cond
    if isinstance(cond, torch.Tensor):
        return _checked(cond, what)
    if isinstance(cond, (list, tuple)):  # diffusers' ControlNet pipelines take one image per prompt
        raise ConditionError(f"{what} is one image for the whole call (every prompt and image of it), not a "
                             f"{type(cond).__name__}; for a different one per prompt, make one call per prompt")
    raise ConditionError(f"a condition must be an image, array, tensor or path, not {type(cond).__name__}")


def _checked(x: torch.Tensor, what: str) -> torch.Tensor:
    """A float tensor's values must be finite and in [0, 1] (8-bit data divided by 255 first); one pass, one sync."""
    if x.ndim >= 2 and 0 in x.shape[-2:]:
        raise ConditionError(f"{what} is empty (shape {tuple(x.shape)})")
    if x.numel() and not x.dtype.is_complex:
        low, high = torch.aminmax(x.detach().float())  # NaN and ±inf show in the extremes
        low, high = low.item(), high.item()
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ConditionError(f"{what} contains NaN or infinite values")
        if high > 1.0 + 1e-3:
            raise ConditionError(f"{what} values go up to {high:g}; tensors and float arrays are in "
                                 f"[0, 1] (divide 8-bit data by 255, or pass a uint8 array or PIL image)")
        if low < -1e-3:
            raise ConditionError(f"{what} values go down to {low:g}; tensors and float arrays are in [0, 1] "
                                 f"(a tensor in diffusers' [-1, 1]: pass x / 2 + 0.5)")
    return x


def _resized_pil(image: Image.Image, channels: int, size: tuple[int, int]) -> np.ndarray:
    """HxWxC array of the image in L/RGB, resized to `size` (w, h) with LANCZOS (diffusers' adapter pipelines)."""
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    arr = np.asarray(image.resize(size, resample=Image.LANCZOS))
    return arr[..., None] if arr.ndim == 2 else arr


def _pad(x: torch.Tensor, canvas: tuple[int, int]) -> torch.Tensor:
    cw, ch = canvas
    if (x.shape[-1], x.shape[-2]) != (cw, ch):
        x = F.pad(x, (0, cw - x.shape[-1], 0, ch - x.shape[-2]))
    return x


def prepare_condition(cond: ConditionInput, channels: int, size: tuple[int, int], canvas: tuple[int, int]) -> torch.Tensor:
    """[1, channels, H', W'] in [0, 1]: channel-converted, resized to `size` (w, h), zero-padded to `canvas`."""
    return _prepared(load_condition(cond), channels, size, canvas)


def _prepared(item: Image.Image | torch.Tensor, channels: int, size: tuple[int, int],
              canvas: tuple[int, int]) -> torch.Tensor:
    """`prepare_condition` of what `load_condition` returned (checked already: scanned once per call)."""
    w, h = size
    if isinstance(item, Image.Image):
        arr = _resized_pil(item, channels, size).astype(np.float32) / 255.0
        return _pad(torch.from_numpy(arr).permute(2, 0, 1)[None], canvas)
    x = item[None] if item.ndim == 3 else item
    if x.ndim != 4 or x.shape[0] != 1:
        raise ConditionError(f"condition tensor must be [C, H, W] or [1, C, H, W], got {tuple(item.shape)}")
    x = x.float()
    c = x.shape[1]
    if c == 4:
        x, c = x[:, :3], 3
    if c == 3 and channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif c == 1 and channels == 3:
        x = x.repeat(1, 3, 1, 1)
    elif c != channels:
        raise ConditionError(f"condition has {c} channels; this adapter takes {channels} (or 1/3 to convert); "
                             f"tensors are [C, H, W], arrays H x W x C")
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return _pad(x, canvas)


def condition_bytes(image: Any, channels: int, size: tuple[int, int]) -> torch.Tensor | None:
    """An 8-bit PIL condition as a uint8 [1, C, h, w] tensor, resized exactly as `prepare_condition` does.

    Crossing to the device as bytes and dividing by 255 there gives the same float32 values as the
    eager path (IEEE division), with a quarter of the transfer. None for anything but a PIL image.
    """
    if not isinstance(image, Image.Image):
        return None
    arr = _resized_pil(image, channels, size)
    if arr.dtype != np.uint8:
        return None
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1)[None]  # a writable copy


def bytes_to_condition(x: torch.Tensor, canvas: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [1, C, h, w] → [0, 1] on `device` in `dtype`, zero-padded right/bottom to `canvas` (w, h)."""
    return _pad(x.to(device).float() / 255.0, canvas).to(dtype)


def condition_on_device(cond: ConditionInput, channels: int, size: tuple[int, int], canvas: tuple[int, int],
                        device: torch.device, dtype: torch.dtype, *, as_bytes: bool = False) -> torch.Tensor:
    """`prepare_condition(...)` on `device` in `dtype`; `as_bytes` sends 8-bit images as bytes (same values)."""
    item = load_condition(cond)
    x = condition_bytes(item, channels, size) if as_bytes else None
    if x is None:
        return _prepared(item, channels, size, canvas).to(device, dtype)
    return bytes_to_condition(x, canvas, device, dtype)


def style_image(cond: ConditionInput) -> Image.Image | torch.Tensor:
    """A style reference as a PIL image for the CLIP-vision extractor; 3-D tensors are tokens and pass through."""
    if isinstance(cond, torch.Tensor) and cond.ndim == 3:
        return cond  # already CLIP-vision tokens [N, L, width]
    item = load_condition(cond)
    if isinstance(item, torch.Tensor):
        arr = (item.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        item = Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr)
    return item
