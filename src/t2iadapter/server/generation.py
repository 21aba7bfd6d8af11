"""A validated HTTP body → a `GenerationRequest` → what the model workers run (`AdapterPipeline.generate_batch`)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from t2iadapter.errors import ConditionError, ConfigError
from t2iadapter.generation.request import AdapterUse, ControlNetUse, GenerationRequest, Window, use_defaults
from t2iadapter.server.images import b64_bytes, b64_png, open_bounded
from t2iadapter.server.limits import Limits
from t2iadapter.server.schemas import GenerateRequest, GenerateResponse, ImageOut


class UnknownName(LookupError):
    """A client named a model that is not registered (→ 404); the name is never used as a path."""


def check_name(name: str, known: list[str], what: str) -> None:
    if name not in known:
        raise UnknownName(f"no {what} named {name!r} is registered; known: {', '.join(known) or 'none'}")


def prepare(req: GenerateRequest, pipe: Any, limits: Limits, uploads: dict[str, bytes] | None = None) -> GenerationRequest:
    """The `GenerationRequest` of a validated body: names, bounds and images checked before it takes a queue slot."""
    if req.steps > limits.max_steps:
        raise ConfigError(f"steps={req.steps} is above this server's limit of {limits.max_steps}")
    if req.num_images > limits.max_images:
        raise ConfigError(f"num_images={req.num_images} is above this server's limit of {limits.max_images}")
    source = source_images(req, limits)
    default = pipe.default_size
    if "init_image" in source:  # img2img: the image's own size (rounded down to the VAE's factor), as the pipeline
        f = pipe.base.vae_scale_factor
        default = tuple(max(v - v % f, f) for v in source["init_image"].size)
    w, h = req.width or default[0], req.height or default[1]
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
    controlnets = list(getattr(pipe, "controlnets", {}))  # issue 16: conditions by name, options in `controlnets`
    for name in list(raw):
        check_name(name, registered + controlnets, "adapter or ControlNet")
    for name in list(req.adapters):
        check_name(name, registered, "adapter")
    for name in list(req.controlnets):
        check_name(name, controlnets, "ControlNet")
    for kind, options in (("adapter", req.adapters), ("ControlNet", req.controlnets)):
        missing = sorted(set(options) - set(raw))
        if missing:
            raise ConfigError(f"{kind} {', '.join(map(repr, missing))} has options but no condition image; add its "
                              f"image under conditions or drop its options")
    images = {name: open_bounded(data, f"condition for {name!r}", limits.max_input_side) for name, data in raw.items()}
    style = [n for n in images if n in pipe.style_names]
    if len(style) > 1:
        raise ConfigError(f"give one style image, not {len(style)} ({', '.join(style)})")
    use = use_defaults()
    uses = []
    for name in [n for n in registered if n in images]:  # registration order: the order adapters compose in
        opts = req.adapters.get(name)
        uses.append(AdapterUse(name, images[name], opts.weight if opts else use["weight"],
                               Window.parse(opts.window) if opts else use["window"]))
    return GenerationRequest(req.prompt, tuple(uses), negative_prompt=req.negative_prompt, steps=req.steps,
                             guidance_scale=req.guidance_scale, size=(w, h), seed=req.seed, scheduler=req.scheduler,
                             num_images=req.num_images, compose=req.compose, fuser_windows=req.fuser_windows,
                             strength=req.strength, paste_back=req.paste_back, eta=req.eta, **source,
                             controlnets=_controlnet_uses(req, controlnets, images))


def _controlnet_uses(req: GenerateRequest, controlnets: list[str], images: dict[str, Any]) -> tuple[ControlNetUse, ...]:
    """The request's ControlNets (issue 16), in registration order, with their options or the defaults."""
    use = use_defaults()
    uses = []
    for name in [n for n in controlnets if n in images]:
        opts = req.controlnets.get(name)
        uses.append(ControlNetUse(name, images[name], opts.weight if opts else use["weight"],
                                  Window.parse(opts.window) if opts else use["window"]))
    return tuple(uses)


def source_images(req: GenerateRequest, limits: Limits) -> dict[str, Any]:
    """img2img / inpainting: the base64 init and mask images, decoded within the server's input bounds."""
    out = {}
    for name in ("init_image", "mask_image"):
        text = getattr(req, name)
        if text is not None:
            out[name] = open_bounded(b64_bytes(text, name), name, limits.max_input_side)
    if "mask_image" in out and "init_image" in out and out["mask_image"].size != out["init_image"].size:
        # as the pipeline would (img2img.prepare), but before the request takes a queue slot
        sizes = ["x".join(map(str, out[n].size)) for n in ("mask_image", "init_image")]
        raise ConditionError(f"mask_image is {sizes[0]} but init_image is {sizes[1]}; give a mask of the image's size")
    return out


def make_runner(pipe: Any, base_label: str) -> Callable[[list[Any], Callable[[int, int], None]], list[GenerateResponse]]:
    """What a model worker runs: a batch of jobs (their GenerationRequests) through `pipe.generate_batch`, each
    result encoded as PNGs with parameters. A pipeline without `generate_batch` runs them one by one."""

    def run(jobs: list[Any], progress: Callable[[int, int], None]) -> list[GenerateResponse]:
        start = time.monotonic()
        requests = [job.payload for job in jobs]
        if hasattr(pipe, "generate_batch"):
            results = pipe.generate_batch(requests, callback=lambda step, total: progress(step + 1, total))
        else:
            steps = requests[0].steps
            results = [pipe.generate(r, callback=lambda step, _t, _l: progress(step + 1, steps), progress=False)
                       for r in requests]
        seconds = round(time.monotonic() - start, 4)
        out = []
        for job, result in zip(jobs, results):
            params = dict(result.parameters, base=base_label)
            images = [ImageOut(png=b64_png(im, dict(params, index=i)), width=im.width, height=im.height)
                      for i, im in enumerate(result.images)]
            out.append(GenerateResponse(images=images, parameters=params, seconds=seconds,
                                        queued_seconds=round(start - job.created, 4)))
        return out

    return run


def batch_key(pipe: Any, request: GenerationRequest) -> Any:
    """The request's batch key on this pipeline (None: it runs alone)."""
    return pipe.batch_key(request) if hasattr(pipe, "batch_key") else None


def warm(pipe: Any, sizes: list[tuple[int, int]], max_batch: int) -> None:
    """Run each size once at every batch the UNet will meet (1, 2, 4, ... up to `max_batch`: fast mode pads
    batches to powers of two) with every spatial adapter (blank conditions), so fast mode compiles (or loads its
    compiled graphs, `generation.compile_cache`) before the first user arrives."""
    batches = sorted({1, max_batch} | {2**k for k in range(max_batch.bit_length()) if 2**k <= max_batch})
    pipe.warm_up(sizes, batches, batched=True)
