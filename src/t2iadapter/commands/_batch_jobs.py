"""`t2iadapter generate --batch JOBS.jsonl --out DIR`: a list of generations, resumable, split across ranks.

(A part of `generate`, not a sub-command: the CLI skips modules named `_*`.)

One JSON object a line, with the HTTP API's fields (`POST /v1/generate`): prompt, negative_prompt,
conditions ({adapter: image path relative to the JSONL file, or base64}), adapters ({adapter: {weight,
window}}), seed, steps, guidance_scale, width, height, scheduler, compose, fuser_windows, num_images.
A field left out takes the command line's value (`--steps`, `--guidance`, ...), which defaults to
`GenerationRequest`'s; a line without a seed gets `--seed` (default 0) + its index, so a rerun is the same.

Line i (0-based, blank lines not counted) writes `DIR/job-00000i.png` (`-k` for its k-th image); a line
whose outputs all exist is skipped (resume by running the same command again). Started under
`torchrun` or `accelerate launch`, each process reads RANK/WORLD_SIZE/LOCAL_RANK, takes the lines with
i % WORLD_SIZE == RANK and runs on cuda:LOCAL_RANK: the shards are disjoint and cover the list, so
outputs never collide, and no process talks to another (the launcher is the scheduler).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2iadapter.errors import ConfigError, T2IAdapterError

FIELDS = ("prompt", "negative_prompt", "conditions", "adapters", "seed", "steps", "guidance_scale", "width", "height",
          "scheduler", "compose", "fuser_windows", "num_images", "eta")


@dataclass(frozen=True)
class Rank:
    """This process's place in a torchrun/accelerate launch (0 of 1 when started alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Rank":
        env = os.environ if environ is None else environ
        try:
            rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
            local = int(env.get("LOCAL_RANK", rank))
        except ValueError:
            raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
        if not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
        return cls(rank, world, local)

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """Every WORLD_SIZE-th item from RANK on: the shards are disjoint and together cover `items`."""
        return list(items[self.rank :: self.world])

    def device(self, asked: str | None) -> str | None:
        """The device to run on: the one asked for, else cuda:LOCAL_RANK in a multi-process launch on GPUs."""
        if asked or self.world == 1:
            return asked
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else None

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.world}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`generate`'s batch-job options."""
    p.add_argument("--batch", metavar="JOBS.jsonl", default=None,
                   help="run one generation per line (the HTTP API's JSON fields) into the folder --out; resumable; "
                   "under torchrun/accelerate launch each process takes its share")
    p.add_argument("--max-batch", type=int, default=1, metavar="N",
                   help="with --batch: run up to N compatible lines as one batch (same size, steps, scheduler, "
                   "guidance, adapters; default 1). The images are the same whatever N")


def read_jobs(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line; one clear error for a line that is not a JSON object."""
    if path.is_dir():
        raise ConfigError(f"--batch {path} is a folder; name a JSONL file (one JSON object a line)")
    if not path.is_file():
        raise ConfigError(f"--batch {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--batch {path}: not UTF-8 text (byte {exc.start}); give a JSONL file") from None
    jobs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON: {exc.msg}") from None
        if not isinstance(job, dict):
            raise ConfigError(f"{path}:{number}: each line is a JSON object with a prompt")
        unknown = sorted(set(job) - set(FIELDS))
        if unknown:
            raise ConfigError(f"{path}:{number}: unknown fields {unknown}; known: {', '.join(FIELDS)}")
        images = job.get("num_images", 1)  # names the line's output files, so checked before any line runs
        if isinstance(images, bool) or not isinstance(images, int) or images < 1:
            raise ConfigError(f"{path}:{number}: num_images must be a whole number >= 1, got {images!r}")
        jobs.append((number, job))
    if not jobs:
        raise ConfigError(f"--batch {path}: no jobs in it")
    return jobs


def condition(value: Any, root: Path, where: str) -> Any:
    """An image path (relative to the JSONL file's folder) or base64 (a data: URL prefix is accepted) → PIL image,
    fully decoded now: a truncated or oversized image fails its own line (ConfigError), not the run."""
    from t2iadapter.extractors.images import open_image

    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: a condition is an image path or base64 text")
    path = Path(value) if Path(value).is_absolute() else root / value
    if len(value) < 4096 and path.is_file():
        source, what = path, str(path)
    else:
        try:
            source = base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{where}: {value[:80]!r} is neither an image file nor base64 image data") from None
        what = "its base64 image"
    try:
        return open_image(source, what=what)
    except T2IAdapterError as exc:  # this line fails, the others still run
        raise ConfigError(f"{where}: {exc}") from None


def to_request(job: dict[str, Any], index: int, where: str, root: Path, args: argparse.Namespace,
               default_size: tuple[int, int] | None = None):
    """A line → a GenerationRequest; fields left out take the command line's values (a side left out: --size's,
    else `default_size`, the base's, as the HTTP API does)."""
    from t2iadapter.generation.request import AdapterUse, GenerationRequest, Window

    prompt = job.get("prompt", args.prompt)
    if not prompt:
        raise ConfigError(f"{where}: no prompt (give \"prompt\" in the line or --prompt)")
    if not isinstance(prompt, str):  # as the HTTP API: one prompt a line (num_images for more images of it)
        raise ConfigError(f"{where}: prompt is one string, not {type(prompt).__name__} (one line per prompt)")
    for side in ("width", "height"):
        value = job.get(side)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 8):
            raise ConfigError(f"{where}: {side} must be a whole number of pixels, at least 8, got {value!r}")
    conditions, options = job.get("conditions", {}), job.get("adapters", {})
    if not isinstance(conditions, dict) or not isinstance(options, dict):
        raise ConfigError(f"{where}: conditions and adapters are objects keyed by adapter name")
    missing = sorted(set(options) - set(conditions))
    if missing:
        raise ConfigError(f"{where}: adapters {missing} have options but no condition image")
    uses = []
    for name, value in conditions.items():
        opts = options.get(name, {})
        if not isinstance(opts, dict) or set(opts) - {"weight", "window"}:
            raise ConfigError(f"{where}: adapters.{name} takes weight and window only")
        image = condition(value, root, f"{where}: conditions.{name}")
        try:
            uses.append(AdapterUse(name, image, **{k: (Window.parse(v) if k == "window" else v) for k, v in opts.items()}))
        except ConfigError as exc:
            raise ConfigError(f"{where}: adapters.{name}: {exc}") from None
    width, height = job.get("width"), job.get("height")
    fallback = args.size or default_size or (0, 0)
    size = (width or fallback[0], height or fallback[1]) if (width or height or args.size) else None
    try:
        return GenerationRequest(
            prompt, tuple(uses), negative_prompt=job.get("negative_prompt", args.negative_prompt),
            steps=job.get("steps", args.steps), guidance_scale=job.get("guidance_scale", args.guidance),
            size=size, seed=job.get("seed", (args.seed or 0) + index), scheduler=job.get("scheduler", args.scheduler),
            num_images=job.get("num_images", args.num_images), compose=job.get("compose", "fuser" if args.fuser else "sum"),
            fuser_windows=job.get("fuser_windows", args.fuser_windows), eta=job.get("eta", args.eta))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def check_defaults(args: argparse.Namespace) -> None:
    """The command line's values that lines fall back on (--steps, --num-images, ...), checked once before any line:
    a bad one is one error (exit 2), not every line failing with it; --num-images -1 named no output file, so every
    line counted as done."""
    from t2iadapter.commands.generate import request_from_args

    request_from_args(args, args.prompt or "x")


def outputs(out: Path, index: int, images: int) -> list[Path]:
    """Line `index`'s PNGs: unique per line, so no two processes ever write one file."""
    stem = f"job-{index:06d}"
    return [out / f"{stem}.png"] if images == 1 else [out / f"{stem}-{k}.png" for k in range(images)]


def save_atomic(image: Any, path: Path, parameters: dict[str, Any]) -> None:
    """Write a PNG next to its final name, then rename: a killed run never leaves a half file to be skipped."""
    from t2iadapter.pngmeta import save_png

    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    save_png(image, partial, parameters)
    os.replace(partial, path)


def run(args: argparse.Namespace) -> int:
    """Run this process's share of the jobs; exit 1 if any of them failed (the others are written)."""
    from tqdm.auto import tqdm

    rank = Rank.from_env()
    jobs_file, out = Path(args.batch), Path(args.out)
    if out.suffix.lower() == ".png" or (out.exists() and not out.is_dir()):
        raise ConfigError(f"--out {out}: with --batch, --out is a folder")
    if args.max_batch < 1:
        raise ConfigError("--max-batch must be at least 1")
    if args.condition or args.style_image:
        raise ConfigError("with --batch, conditions come from the lines (\"conditions\": {adapter: path}), "
                          "not --condition/--style-image")
    unapplied = [flag for flag, given in (
        ("--weight", args.weight), ("--window", args.window), ("--lora", args.lora), ("--controlnet", args.controlnet),
        ("--controlnet-weight", args.controlnet_weight), ("--controlnet-window", args.controlnet_window),
        ("--init-image", args.init_image), ("--mask", args.mask), ("--paste-back", args.paste_back)) if given]
    if unapplied:
        raise ConfigError(f"--batch runs text-to-image with adapters: {', '.join(unapplied)} would be ignored; per-line "
                          "weights and windows go in the lines (\"adapters\": {name: {weight, window}}), the rest "
                          "runs one image at a time without --batch")
    check_defaults(args)
    lines = read_jobs(jobs_file)
    mine = rank.shard(list(enumerate(lines)))
    todo = []
    for index, (number, job) in mine:
        paths = outputs(out, index, int(job.get("num_images", args.num_images) or 1))
        if args.force or not all(p.exists() for p in paths):
            todo.append((index, number, job, paths))
    skipped = len(mine) - len(todo)
    print(f"{rank}: {len(mine)} of {len(lines)} jobs, {skipped} already done", file=sys.stderr)
    if not todo:
        return 0

    from t2iadapter.generation.pipeline import AdapterPipeline, resolve_device

    device, dtype = resolve_device(rank.device(args.device), args.dtype)
    from t2iadapter.commands import parse_adapters

    named = parse_adapters(list(args.adapter) + ([args.style_adapter] if args.style_adapter else []))
    sources = list(named.values())
    pipe = AdapterPipeline.from_pretrained(args.base, named, fuser=args.fuser, style_encoder=args.style_encoder,
                                           device=device, dtype=dtype, config_dir=args.config_dir)
    if args.fast:
        from t2iadapter.commands import fast_precision

        pipe.optimize(precision=fast_precision(args.fast), cache_dir=args.cache_dir, aot=args.aot)
        if pipe.compile_cache is not None:
            pipe.compile_cache.report = lambda line: print(f"{rank}: {line}", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    root = jobs_file.resolve().parent
    failed: list[str] = []
    done = 0
    with tqdm(total=len(todo), unit="job", desc=str(rank), position=rank.local_rank, disable=None,
              file=sys.stderr) as bar:
        for group in groups(pipe, todo, root, args, failed):
            try:
                results = pipe.generate_batch([request for request, _ in group], progress=False)
            except T2IAdapterError as exc:
                failed.extend(f"{where}: {exc}" for _, (where, _paths) in group)
            else:
                for result, (_request, (where, paths)) in zip(results, group):
                    params = dict(result.parameters, adapter_sources=sources, fuser=args.fuser, job=where)
                    for image, path in zip(result.images, paths):
                        save_atomic(image, path, params)
                    done += 1
            bar.update(len(group))
    print(f"{rank}: {done} generated, {skipped} already there, {len(failed)} failed → {out}")
    for line in failed:
        print(f"  {line}", file=sys.stderr)
    return 1 if failed else 0


def groups(pipe: Any, todo: list, root: Path, args: argparse.Namespace, failed: list[str]):
    """Consecutive jobs that share a batch key, up to --max-batch images each: [(request, (where, paths)), ...]."""
    group: list = []
    for index, number, job, paths in todo:
        where = f"{args.batch}:{number}"
        try:
            request = to_request(job, index, where, root, args, pipe.default_size)
            key = pipe.batch_key(request)
        except T2IAdapterError as exc:
            failed.append(str(exc))
            continue
        images = len(request.prompts) * request.num_images
        size = sum(len(r.prompts) * r.num_images for r, _ in group)
        if group and (pipe.batch_key(group[0][0]) != key or size + images > args.max_batch):
            yield group
            group = []
        group.append((request, (where, paths)))
    if group:
        yield group
