"""`t2iadapter extract NAME IN OUT [--OPTION VALUE ...]`, batch `--input-dir D --output-dir O`, and `--list`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from t2iadapter.commands import add_threads_argument
from t2iadapter.commands._batch_jobs import Rank
from t2iadapter.errors import ConfigError, T2IAdapterError

if TYPE_CHECKING:
    from t2iadapter.extractors.base import Extractor


def _option_flags() -> dict[str, list[str]]:
    """Every extractor option name → the extractors that take it (for one shared set of flags)."""
    from t2iadapter.extractors import REGISTRY

    flags: dict[str, list[str]] = {}
    for name, cls in REGISTRY.items():
        for option in cls.options():
            flags.setdefault(option, []).append(name)
    return flags


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `extract` parser, with one flag per extractor option."""
    p = sub.add_parser(
        "extract",
        help="turn images into condition maps (canny, color, sketch, depth, pose, seg, style ...)",
        description="Run a condition extractor on one file (NAME IN OUT) or a whole folder (NAME --input-dir D "
        "--output-dir O). Batch mode uses several worker processes, skips outputs that already exist "
        "(resumable) and reports unreadable inputs without stopping. `--list` shows the extractors.",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="extractor name (see --list)")
    p.add_argument("input", nargs="?", metavar="IN", help="input image (a .json file for pose-json)")
    p.add_argument("output", nargs="?", metavar="OUT", help="output image (.safetensors for style)")
    p.add_argument("--list", action="store_true", help="print the extractors and the adapters they feed")
    p.add_argument("--input-dir", metavar="D", help="batch mode: folder of inputs (searched recursively)")
    p.add_argument("--output-dir", metavar="O", help="batch mode: folder for the outputs (same relative paths)")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="batch mode: worker processes (default: the CPU count; 1 for model-based extractors)",
    )
    p.add_argument("--no-progress", action="store_true", help="batch mode: no progress bar")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists (batch mode never overwrites)")
    add_threads_argument(p)
    options = p.add_argument_group("extractor options", "each applies to the extractors named in its help")
    for option, users in sorted(_option_flags().items()):
        options.add_argument(f"--{option.replace('_', '-')}", dest=f"opt_{option}", metavar="V", help=", ".join(users))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch to --list, one file, or batch mode."""
    from t2iadapter import extractors

    if args.list:
        print_table(extractors.table())
        return 0
    if not args.name:
        raise ConfigError("name an extractor (t2iadapter extract --list shows them)")
    cls = extractors.info(args.name)
    if cls.weights and not getattr(args, "verbose", False):
        # Keep the console to our own lines: no transformers/hub progress bars or advisory warnings.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    raw = {key[4:]: value for key, value in vars(args).items() if key.startswith("opt_") and value is not None}
    if "device" in cls.options() and "device" not in raw and Rank.from_env().device(None):  # torchrun: cuda:LOCAL_RANK
        raw["device"] = Rank.from_env().device(None)
    extractor = extractors.get(args.name, **cls.coerce(raw))
    batch = args.input_dir is not None or args.output_dir is not None
    if batch:
        if args.input or args.output:
            raise ConfigError("give either IN OUT or --input-dir/--output-dir, not both")
        if not (args.input_dir and args.output_dir):
            raise ConfigError("batch mode needs both --input-dir and --output-dir")
        return run_batch(extractor, args)
    if not (args.input and args.output):
        raise ConfigError(f"usage: t2iadapter extract {args.name} IN OUT (or --input-dir D --output-dir O)")
    return run_one(extractor, args.input, args.output, force=args.force)


# Output suffixes an image condition can be written as (Pillow picks the format from the suffix).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def check_target(extractor: Extractor, target: str, *, force: bool) -> None:
    """Before extracting: OUT is a new file (or --force), in an existing folder, with a suffix that fits the output."""
    from pathlib import Path

    out = Path(target)
    if out.is_dir():
        raise ConfigError(f"OUT {target} is a folder; name a file (or use --input-dir/--output-dir for folders)")
    if not out.parent.is_dir():
        raise ConfigError(f"OUT {target}: folder {out.parent} does not exist")
    suffix = out.suffix.lower()
    if extractor.output_suffix == ".safetensors":
        if suffix != ".safetensors":
            raise ConfigError(f"{extractor.name} writes a tensor, not an image: name the output *.safetensors")
    elif suffix not in IMAGE_SUFFIXES:
        raise ConfigError(f"OUT {target}: an image is written as {' '.join(IMAGE_SUFFIXES)}, not {suffix or 'no suffix'}")
    if out.exists() and not force:
        raise ConfigError(f"OUT {target} exists; pass --force to overwrite it")


def run_one(extractor: Extractor, source: str, target: str, *, force: bool = False) -> int:
    """Extract one file; an unreadable input is a user error here (exit 2)."""
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    from t2iadapter.extractors.batch import load_input, save

    path = Path(source)
    if path.is_dir():
        raise ConfigError(f"IN {source} is a folder; name a file (or use --input-dir/--output-dir for folders)")
    if not path.is_file():
        raise ConfigError(f"no input file {source}")
    check_target(extractor, target, force=force)
    try:
        loaded = load_input(extractor, path)
    except (UnidentifiedImageError, OSError) as exc:
        raise T2IAdapterError(f"cannot read {source}: {exc}") from None
    condition = extractor(loaded)
    save(condition, Path(target))
    if isinstance(condition, Image.Image):
        shape = f"{condition.width}x{condition.height} {condition.mode}"
    else:
        shape = f"tensor {tuple(condition.shape)}"
    print(f"{extractor.name}: {source} → {target} ({shape})")
    return 0


def run_batch(extractor: Extractor, args: argparse.Namespace) -> int:
    """Extract a folder with a progress bar; exit 1 only if nothing at all succeeded."""
    from pathlib import Path

    from tqdm import tqdm

    from t2iadapter.extractors.batch import check_distinct_outputs, find_inputs, run_batch as extract_all

    input_dir, output_dir = Path(args.input_dir), Path(args.output_dir)
    if not input_dir.is_dir():
        raise ConfigError(f"no input folder {input_dir}")
    if output_dir.resolve() == input_dir.resolve():
        raise ConfigError("--output-dir must differ from --input-dir")
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())  # a file there or above it
    if not existing.is_dir():  # (`out.png/conds`: else every image fails alone, after the model loads)
        where = "" if existing == output_dir else f": {existing}"
        raise ConfigError(f"--output-dir {output_dir}{where} is a file; name a folder")
    sources = find_inputs(input_dir, extractor.input_suffixes, exclude=output_dir)
    if not sources:
        raise ConfigError(f"no {extractor.input_kind} files ({' '.join(extractor.input_suffixes)}) under {input_dir}")
    check_distinct_outputs(sources, input_dir, output_dir, extractor.output_suffix)  # all ranks', before sharding
    rank = Rank.from_env()  # under torchrun/accelerate launch: this process's share (i % WORLD_SIZE == RANK)
    sources = rank.shard(sources)
    workers = args.workers if args.workers is not None else (1 if extractor.weights else os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    extractor.load()  # a missing model is one user error, not one failure per image
    with tqdm(
        total=len(sources), unit="img", desc=extractor.name if rank.world == 1 else f"{extractor.name} {rank}",
        disable=args.no_progress or None, file=sys.stderr, position=rank.local_rank,
    ) as bar:
        report = extract_all(extractor, input_dir, output_dir, workers=workers, progress=bar.update, inputs=sources)
    print(
        f"{extractor.name}: {report.done} done, {report.skipped} already there, {len(report.failed)} failed "
        f"of {report.total} in {report.seconds:.1f}s ({report.rate:.1f} images/s, {workers} worker"
        f"{'s' if workers > 1 else ''}{f', {rank}' if rank.world > 1 else ''}) → {output_dir}"
    )
    if report.failed:
        print(f"{len(report.failed)} input(s) could not be processed and were skipped:", file=sys.stderr)
        for source, reason in report.failed:
            print(f"  {source}: {reason}", file=sys.stderr)
    if report.done == 0 and report.skipped == 0 and sources:
        return 1
    return 0


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    """The --list table: name, needs weights, where from, and the adapters each one feeds."""
    headers = ("extractor", "feeds adapters", "weights", "weights from")
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) for i in (0, 2)]
    print(f"{headers[0]:<{widths[0]}}  {headers[2]:<{widths[1]}}  {headers[3]}")
    for name, feeds, needs, source in rows:
        print(f"{name:<{widths[0]}}  {needs:<{widths[1]}}  {source}")
        print(f"{'':<{widths[0]}}  {'':<{widths[1]}}  feeds: {feeds}")
