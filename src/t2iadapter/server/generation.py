"""A validated generation request → the work the model worker runs (one `AdapterPipeline` call)."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from t2iadapter.errors import ConfigError
from t2iadapter.pipeline import Window
from t2iadapter.server.images import b64_bytes, b64_png, open_bounded
from t2iadapter.server.limits import Limits
from t2iadapter.server.schemas import GenerateRequest, GenerateResponse, ImageOut


class UnknownName(LookupError):
    """A client named a model that is not registered (→ 404); the name is never used as a path."""


@dataclass(frozen=True)
class Generation:
    """Everything one pipeline call needs, checked against the registered models and the limits."""

    request: GenerateRequest
    conditions: dict[str, Image.Image]  # spatial adapter name → condition image
    style_image: Image.Image | None
    weights: dict[str, float]
    windows: dict[str, Window]
    size: tuple[int, int]


def check_name(name: str, known: list[str], what: str) -> None:
    if name not in known:
        raise UnknownName(f"no {what} named {name!r} is registered; known: {', '.join(known) or 'none'}")


def prepare(req: GenerateRequest, pipe: Any, limits: Limits, uploads: dict[str, bytes] | None = None) -> Generation:
    """Check names, bounds and images before the request takes a queue slot."""
    if req.steps > limits.max_steps:
        raise ConfigError(f"steps={req.steps} is above this server's limit of {limits.max_steps}")
    if req.num_images > limits.max_images:
        raise ConfigError(f"num_images={req.num_images} is above this server's limit of {limits.max_images}")
    w, h = req.width or pipe.default_size[0], req.height or pipe.default_size[1]
    if w > limits.max_side or h > limits.max_side:
        raise ConfigError(f"size {w}x{h} is above this server's limit of {limits.max_side} pixels a side")
    limits.check_work(w, h, req.steps, req.num_images)
    if req.compose == "fuser" and pipe.fuser is None:
        raise ConfigError("compose='fuser' needs a CoAdapter fuser; this server was started without --fuser")
    registered = list(pipe.adapters)
    raw = {name: b64_bytes(text, f"condition for {name!r}") for name, text in req.conditions.items()}
    for name, data in (uploads or {}).items():
        if name in raw:
            raise ConfigError(f"condition for {name!r} given twice (in the JSON and as an upload)")
        raw[name] = data
    for name in list(raw) + list(req.adapters):
        check_name(name, registered, "adapter")
    missing = sorted(set(req.adapters) - set(raw))
    if missing:
        raise ConfigError(f"adapters {missing} have options but no condition image")
    images = {name: open_bounded(data, f"condition for {name!r}", limits.max_input_side) for name, data in raw.items()}
    style = [n for n in images if n in pipe.style_names]
    if len(style) > 1:
        raise ConfigError(f"give one style image, not {len(style)} ({', '.join(style)})")
    opts = {name: req.adapters.get(name) for name in images}
    return Generation(
        request=req,
        conditions={n: im for n, im in images.items() if n not in style},
        style_image=images[style[0]] if style else None,
        weights={n: (o.weight if o else 1.0) for n, o in opts.items()},
        windows={n: Window.parse(o.window if o else None) for n, o in opts.items()},
        size=(w, h),
    )


def make_work(gen: Generation, pipe: Any, base_label: str, queued_at: float) -> Callable[[Callable[[int, int], None]], GenerateResponse]:
    """The function the worker thread calls: run the pipeline, report each step, encode PNGs with parameters."""
    req = gen.request

    def work(progress: Callable[[int, int], None]) -> GenerateResponse:
        start = time.monotonic()
        progress(0, req.steps)
        result = pipe(
            req.prompt,
            conditions=gen.conditions,
            negative_prompt=req.negative_prompt,
            steps=req.steps,
            guidance_scale=req.guidance_scale,
            size=gen.size,
            seed=req.seed,
            num_images=req.num_images,
            scheduler=req.scheduler,
            weights=gen.weights,
            windows=gen.windows,
            compose=req.compose,
            style_image=gen.style_image,
            callback=lambda step, _t, _latents: progress(step + 1, req.steps),
            progress=False,
        )
        params = dict(result.parameters, base=base_label)
        images = [
            ImageOut(png=b64_png(im, dict(params, index=i)), width=im.width, height=im.height)
            for i, im in enumerate(result.images)
        ]
        return GenerateResponse(images=images, parameters=params, seconds=round(time.monotonic() - start, 4),
                                queued_seconds=round(start - queued_at, 4))

    return work
