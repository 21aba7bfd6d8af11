"""`t2iadapter serve`: the HTTP API and web page (FastAPI under uvicorn) over one base and registered adapters."""
from __future__ import annotations

import argparse
import logging
import os

from t2iadapter.commands import (DEMO_BASE, add_fast_arguments, add_threads_argument, check_fast_arguments, fast_precision,
                                 parse_adapters)
from t2iadapter.errors import ConfigError
from t2iadapter.server.limits import Limits

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the HTTP API and the drawing page",
        description="Serve an HTTP API (POST /v1/generate, /v1/extract, /v1/jobs; GET /v1/models, /health; docs at "
        "/docs) and a web page at / to draw or upload, extract, and generate. Clients refer to adapters by the names "
        "registered here. With --base demo and no --adapter, every shipped demo adapter is registered; with no "
        "--controlnet, every shipped demo ControlNet too.",
    )
    p.add_argument("--base", default=DEMO_BASE, help="base model: demo (default), tiny, a diffusers folder, a single file or a hub id")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="register an adapter (file, folder, demo/NAME or hub id) under NAME, or its file name; repeatable")
    p.add_argument("--controlnet", action="append", default=[], metavar="NAME=PATH",
                   help="register a diffusers ControlNet under NAME (folder, single file or hub id); repeatable")
    p.add_argument("--fuser", default=None, help="CoAdapter fuser checkpoint (enables compose=fuser)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=parse_port, default=7860, help="port (default 7860)")
    p.add_argument("--token", default=None, help="require `Authorization: Bearer TOKEN` (default: $T2IADAPTER_TOKEN)")
    d = Limits()  # the defaults are the Limits dataclass's
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb,
                   help=f"largest request body in MB (default {d.max_upload_mb:g}; larger: 413)")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help=f"most denoising steps per request (default {d.max_steps})")
    p.add_argument("--max-side", type=int, default=d.max_side, help=f"largest output width/height in pixels (default {d.max_side})")
    p.add_argument("--max-images", type=int, default=d.max_images, help=f"most images per request (default {d.max_images})")
    p.add_argument("--max-work", type=float, default=d.max_work,
                   help="most work per request in megapixel-steps, width x height x steps x images / 1e6 "
                   f"(default {d.max_work:g}: 512² x 50 steps x 4 images fits, 1024² x 20 steps x 4 does not)")
    p.add_argument("--max-input-side", type=int, default=d.max_input_side,
                   help=f"largest uploaded image width/height (default {d.max_input_side})")
    p.add_argument("--queue-size", type=int, default=d.queue_size,
                   help=f"requests waiting behind the running one (default {d.queue_size}; more: 429)")
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help=f"seconds per request, queue included (default {d.timeout:g}; then 504)")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"images per batch: compatible queued requests share UNet calls (default {d.max_batch}; 1: off)")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help=f"how long a worker waits for company before it runs a lone request (default {d.batch_wait_ms:g})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--devices", type=parse_devices, default=(), metavar="DEV,DEV",
                   help="one model worker per device behind the one queue, e.g. cuda:0,cuda:1 (default: --device)")
    add_fast_arguments(p, "on each worker")
    p.add_argument("--warmup", type=parse_sizes, default=(), metavar="WxH,WxH",
                   help="sizes each worker runs once at start-up, e.g. 512x512 (with --fast: compiled, or loaded from "
                   "--cache-dir, before serving)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp16 on GPU, fp32 on CPU")
    add_threads_argument(p)
    p.set_defaults(func=run)


def parse_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {text!r} must be a whole number, e.g. 7860") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} must be from 0 to 65535 (0: any free port)")
    return port


def parse_devices(text: str) -> tuple[str, ...]:
    devices = tuple(d.strip() for d in text.split(",") if d.strip())
    if not devices:
        raise argparse.ArgumentTypeError(f"--devices {text!r}: name devices, e.g. cuda:0,cuda:1")
    return devices


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    from t2iadapter.commands.generate import parse_size

    return tuple(parse_size(part) for part in text.split(",") if part.strip())


def settings_from(args: argparse.Namespace):
    """ServerSettings and Limits from the options; a missing demo model fails here, before anything loads."""
    from t2iadapter import assets
    from t2iadapter.server.limits import ServerSettings

    from t2iadapter.generation.pipeline import resolve_device

    device, _ = resolve_device(args.device, args.dtype)  # a bad --device is one line now, not a traceback at startup
    for dev in args.devices:  # and each of --devices, before any model loads
        resolve_device(dev, args.dtype)
    check_fast_arguments(args)
    if args.fast:
        import torch

        from t2iadapter.generation.fast import resolve_precision

        for dev in args.devices or (device,):  # fp8 on a CPU or an older GPU: one line now
            resolve_precision(fast_precision(args.fast), None, torch.device(dev))
    adapters = parse_adapters(args.adapter)
    fuser = args.fuser
    if args.base == "demo":
        assets.demo_base_path()
        if not adapters:
            shipped = assets.demo_adapter_names()
            adapters = {name: f"demo/{name}" for name in shipped if name != "fuser"}
            if fuser is None and "fuser" in shipped:
                fuser = "demo/fuser"
    controlnets = parse_adapters(getattr(args, "controlnet", []), "--controlnet")
    if args.base == "demo" and not controlnets:
        controlnets = {name: f"demo/{name}" for name in assets.demo_controlnet_names()}
    limits = Limits(max_upload_mb=args.max_upload_mb, max_steps=args.max_steps, max_side=args.max_side,
                    max_images=args.max_images, max_work=args.max_work, max_input_side=args.max_input_side,
                    queue_size=args.queue_size, timeout=args.timeout, max_batch=args.max_batch,
                    batch_wait_ms=args.batch_wait_ms)
    settings = ServerSettings(base=args.base, adapters=adapters, fuser=fuser, device=args.device, dtype=args.dtype,
                              devices=args.devices, fast=args.fast or False, warmup=args.warmup,
                              cache_dir=args.cache_dir, aot=args.aot,
                              controlnets=controlnets)
    return settings, limits


def run(args: argparse.Namespace) -> int:
    settings, limits = settings_from(args)
    token = args.token or os.environ.get("T2IADAPTER_TOKEN") or None
    if settings.fast:  # when compiling starts, how long it took, and whether the compiled-graph cache served
        logging.getLogger("t2iadapter.generation.compile_cache").setLevel(logging.INFO)

    try:
        import uvicorn

        from t2iadapter.server import create_app
    except ImportError as exc:  # the serve extra is not installed: one line, as every user error
        raise ConfigError(f"t2iadapter serve needs the serve extra (pip install 't2iadapter[serve]'); "
                          f"importing it failed: {exc}") from None

    app = create_app(settings, limits=limits, token=token)  # a base that cannot load fails here: one line, no warnings
    if not settings.adapters:
        log.warning("no adapters registered: the server generates from text only")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning("listening on %s without a token: anyone who can reach it can use the model", args.host)
    names = ", ".join(settings.adapters) or "none"
    print(f"serving {settings.base} with adapters {names} on http://{args.host}:{args.port}/ (API docs at /docs)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
