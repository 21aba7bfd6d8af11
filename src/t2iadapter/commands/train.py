"""`t2iadapter train --config FILE [--set key=value ...] [--max-steps N] [--output-dir DIR] [--resume [CKPT]]`."""
from __future__ import annotations

import argparse
from pathlib import Path

from t2iadapter.commands import add_threads_argument
from t2iadapter.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train an adapter (any kind, or a CoAdapter) on a frozen base",
        description="Train a T2I-Adapter on a frozen SD1.x/SD2.x/SDXL base from a YAML/JSON/TOML config. Runs on "
        "CPU, one GPU, or several through `accelerate launch -m t2iadapter.cli train ...` / torchrun. "
        "See docs/training.md for every config field.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML, JSON or TOML config (default: the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field: dotted (recipe.lr=1e-4, adapters.1.condition=depth) or an unambiguous "
                   "leaf name (max_steps=100); repeatable")
    p.add_argument("--max-steps", type=int, help="same as --set recipe.max_steps=N")
    p.add_argument("--output-dir", help="same as --set output_dir=DIR")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                   help="continue from the newest checkpoint in the output dir, or from CKPT (a checkpoint folder)")
    p.add_argument("--force", action="store_true",
                   help="start over in an output dir that already holds a run (its checkpoints, logs, validation grids and "
                   "final files are deleted)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    add_threads_argument(p)
    p.set_defaults(func=run)


def check_output_dir(out: Path, *, resume: bool, force: bool) -> None:
    """Refuse a file as output dir, and an earlier run's folder unless resuming or forced (nothing is overwritten)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output dir {out} is a file; name a folder")
    earlier = out.is_dir() and any((out / name).exists() for name in ("checkpoints", "train_config.json"))
    if earlier and not (resume or force):
        raise ConfigError(f"{out} already holds a training run: --resume continues it, --force starts over "
                          "(deleting that run's files), or choose another --output-dir")


def run(args: argparse.Namespace) -> int:
    import logging

    from t2iadapter.train import load_config

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"recipe.max_steps={args.max_steps}")
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    config = load_config(args.config, overrides)
    if args.print_config:
        print(config.to_json())
        return 0
    check_output_dir(Path(config.output_dir), resume=args.resume is not None, force=args.force)
    logging.getLogger("t2iadapter.train").setLevel(min(logging.getLogger().level, logging.INFO))
    from t2iadapter.train.loop import Trainer
    from t2iadapter.train.throughput import SUMMARY_FILE

    trainer = Trainer(config)
    if trainer.is_main:
        print(describe(trainer), flush=True)
    result = trainer.run(resume=args.resume, start_over=args.force)
    if not trainer.is_main:
        return 0
    loss = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    resumed = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
    print(f"trained to step {result.step}{resumed} in {result.seconds:.1f}s{loss}; "
          f"{result.skipped} unreadable samples skipped")
    speed = result.throughput
    if speed is not None and speed.samples_per_second is not None:
        steady = "" if speed.steady_samples_per_second is None else f" (steady {speed.steady_samples_per_second:.1f})"
        peak = "" if result.peak_memory_gib is None else f", peak memory {result.peak_memory_gib:.2f} GiB"
        print(f"{speed.samples_per_second:.1f} samples/s{steady}{peak}; {trainer.output_dir / SUMMARY_FILE}")
    for path in result.outputs:
        print(f"wrote {path}")
    return 0


def describe(trainer) -> str:
    """The run in one line, before its first step: what trains on which base and data, how long, and where it goes."""
    cfg, recipe = trainer.config, trainer.config.recipe
    what = " + ".join(f"{a.kind} {a.condition} adapter" if a.kind != "controlnet" else f"{a.condition} ControlNet"
                      for a in cfg.adapters) + (" + fuser" if cfg.fuser is not None else "")
    params = sum(p.numel() for p in trainer.params)
    base = f"{cfg.base} (a random test base, for smoke runs)" if cfg.base in ("tiny", "tiny-xl") else cfg.base
    data = cfg.data.kind + (f" {cfg.data.path}" if cfg.data.path else " (the demo world's scenes)")
    gpus = trainer.accelerator.num_processes
    batch = f"batch {recipe.batch_size}" + (f" × {gpus} processes" if gpus > 1 else "")
    limit = f", at most {recipe.max_minutes:g} min" if recipe.max_minutes else ""
    every = f"checkpoints every {cfg.checkpoint.every} steps" if cfg.checkpoint.every else "no checkpoints"
    steps = f"{recipe.max_steps} step{'s' * (recipe.max_steps != 1)} of {batch}{limit}"
    return (f"training {what} ({params / 1e6:.2f}M parameters) on {base}, {trainer.device}; data {data} at "
            f"{cfg.data.resolution}x{cfg.data.resolution}; {steps}; {every} in {trainer.output_dir} (--resume continues)")
