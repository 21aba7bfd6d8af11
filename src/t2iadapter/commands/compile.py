"""`t2iadapter compile`: fast mode's compiled graphs made ahead of time, as files `generate`/`serve` load (issue 18)."""
from __future__ import annotations

import argparse
import sys

from t2iadapter.commands import (FAST_CHOICES, add_aot_argument, add_base_arguments, add_threads_argument, fast_precision,
                                 parse_adapters)
from t2iadapter.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    from t2iadapter.commands.generate import parse_size

    p = sub.add_parser(
        "compile",
        help="compile fast mode ahead of time into the compiled-graph cache",
        description="Load a base and adapters, run fast mode once at every --size and --batch, and save torch's "
        "compiled graphs (its portable compile-cache artefacts) in the cache folder, so that `generate --fast`, "
        "`serve --fast` and `AdapterPipeline.optimize()` start without compiling. The files are keyed by torch "
        "version, GPU, base architecture, precision, the adapter set, size, images per call and guidance: give the "
        "same --adapter set and --fast precision the later runs use. A cache folder copied to another machine with "
        "the same GPU and torch is used there as is.",
    )
    add_base_arguments(p)
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="adapter the later runs load (file, folder, demo/NAME or hub id); repeatable, in their order")
    p.add_argument("--size", action="append", type=parse_size, default=[], required=True, metavar="WxH",
                   help="output size to compile, e.g. 512x512 (repeatable)")
    p.add_argument("--batch", action="append", type=int, default=[], metavar="N",
                   help="images per call to compile (repeatable; default 1)")
    p.add_argument("--fast", nargs="?", const="auto", default="auto", choices=FAST_CHOICES, metavar="PRECISION",
                   help="precision the later runs use: auto (default: bf16/fp16 on a GPU, fp32 on the CPU), bf16, fp16, "
                   "fp32 or fp8")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale of the later runs: above 1 (default 7.5) both CFG branches, 1 or less one")
    add_aot_argument(p)
    p.add_argument("--serve", action="store_true",
                   help="compile what `serve --fast` runs: batched calls of 1, 2, 4, ... up to the largest --batch images")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="folder of the compiled graphs (default: $T2IADAPTER_COMPILE_CACHE, else ~/.cache/t2iadapter/compiled)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    add_threads_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from t2iadapter.generation.request import GUIDANCE_RANGE, MAX_IMAGES, SIDE_RANGE

    for w, h in args.size:
        if not (SIDE_RANGE[0] <= w <= SIDE_RANGE[1] and SIDE_RANGE[0] <= h <= SIDE_RANGE[1]):
            raise ConfigError(f"--size {w}x{h}: sides must be {SIDE_RANGE[0]}..{SIDE_RANGE[1]} pixels")
    batches = sorted(set(args.batch or [1]))
    if batches[0] < 1:
        raise ConfigError(f"--batch must be at least 1, got {batches[0]}")
    if not args.serve and batches[-1] > MAX_IMAGES:  # one call's images (the request's own bound), before any loading
        raise ConfigError(f"--batch must be from 1 to {MAX_IMAGES} images per call, got {batches[-1]}")
    lo, hi = GUIDANCE_RANGE
    if args.guidance is not None and not lo <= args.guidance <= hi:  # NaN fails both comparisons
        raise ConfigError(f"--guidance must be a number from {lo:g} to {hi:g}, got {args.guidance}")
    if args.serve:
        top = batches[-1]
        batches = sorted({1, top} | {2**k for k in range(top.bit_length()) if 2**k <= top})
    named = parse_adapters(args.adapter)

    import torch

    from t2iadapter.generation import compile_cache, fast
    from t2iadapter.generation.pipeline import AdapterPipeline, resolve_device

    device, _ = resolve_device(args.device, None)
    precision = fast_precision(args.fast)
    fast.resolve_precision(precision, None, torch.device(device))  # fp8 where it cannot run: one line, before loading
    folder = compile_cache.cache_dir(args.cache_dir)
    pipe = AdapterPipeline.from_pretrained(args.base, named, device=device, config_dir=args.config_dir)
    pipe.optimize(precision=precision, cache_dir=folder, aot=args.aot)
    pipe.compile_cache.report = lambda line: print(line, flush=True)
    pipe.warm_up(args.size, batches, batched=args.serve, guidance_scale=args.guidance)
    cache = pipe.compile_cache
    done = fast.status(pipe)
    failed = {name: why for name, why in done["compiled"].items() if why != "ok"}
    if done["aot"] not in (None, "ok"):
        failed["unet (aot)"] = done["aot"]
    if failed:  # it ran eagerly: what the cache holds would not spare a later run its compile
        print(f"error: compiling {', '.join(failed)} failed ({next(iter(failed.values()))}); fix that (inductor needs "
              f"a working C++ compiler, $CXX, and on a GPU Triton) and run compile again", file=sys.stderr)
        return 1
    unsaved = [e.shape.describe() for e in cache.events if e.status != "loaded" and not e.saved]
    if unsaved:
        print(f"error: nothing was saved in {cache.folder} for {'; '.join(unsaved)} (a folder that cannot be written, "
              f"or torch's caches off): later runs would compile again; give a --cache-dir that can be written",
              file=sys.stderr)
        return 1
    files = sorted(f for f in cache.folder.glob("*") if f.suffix in (".bin", ".pt2") and not f.name.startswith("."))
    size = sum(f.stat().st_size for f in files) / 1e6
    print(f"{len(cache.events)} shape(s) ready in {cache.folder} ({len(files)} file(s), {size:.1f} MB)")
    return 0
