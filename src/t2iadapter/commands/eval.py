"""`t2iadapter eval`: controllability of adapters (and ControlNets) on held-out scenes of the demo world."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from t2iadapter.commands import DEMO_BASE, add_threads_argument
from t2iadapter.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="measure controllability on held-out demo-world scenes",
        description="Generate held-out world scenes (seeds disjoint from training) as text only, with each adapter, "
        "with each ControlNet, with sketch+color composed by weighted sum and by the fuser, and with a 0–0.5 step "
        "window; report structure IoU, edge F1 (2 px, against the true outlines), spurious foreground, colour "
        "accuracy and palette error.",
    )
    p.add_argument("--base", default=DEMO_BASE, help="base model (default: the embedded demo)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="adapter per condition, named sketch, seg, depth, pose or color (NAME=PATH, or a PATH whose "
                   "file name is the condition); default: the shipped demo adapters")
    p.add_argument("--fuser", default=None, help="CoAdapter fuser (default: the shipped demo fuser)")
    p.add_argument("--controlnet", action="append", default=[], metavar="[NAME=]PATH",
                   help="ControlNet (diffusers folder, single file, hub id or demo/NAME) evaluated as its own setting, "
                   "named so that the name contains its condition (controlnet-sketch=PATH, or a PATH whose file name "
                   "does); repeatable; default with the demo base: the shipped demo ControlNets (demo/controlnet-sketch)")
    p.add_argument("--scenes", type=int, default=20, help="held-out scenes (default 20)")
    p.add_argument("--first-seed", type=int, default=None, help="first evaluation seed (default: world.EVAL_SEEDS)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps per image (default 25)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5.0)")
    p.add_argument("--only", action="append", default=[], help="evaluate only settings with this name (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--batch", type=int, default=1,
                   help="scenes of a setting generated as one batch (default 1; e.g. 25 on a GPU, where one small "
                   "image leaves the card idle); images match unbatched ones to float rounding")
    add_threads_argument(p)
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite --out / --json files that exist")
    p.set_defaults(func=run)


def check_writable_file(flag: str, target: str | None, *, force: bool) -> None:
    """Before any work: the file a flag names must be a file in an existing folder, and new unless forced."""
    if target is None:
        return
    path = Path(target)
    if path.is_dir():
        raise ConfigError(f"{flag} {target} is a folder; name a file")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} {target}: folder {path.parent} does not exist")
    if path.exists() and not force:
        raise ConfigError(f"{flag} {target} exists; pass --force to overwrite it")


def run(args: argparse.Namespace) -> int:
    from t2iadapter.demo import world
    from t2iadapter.evaluation.controllability import CONDITIONS, condition_of, default_settings, evaluate, format_table
    from t2iadapter.commands import parse_adapters
    from t2iadapter.generation.pipeline import AdapterPipeline, resolve_device
    from t2iadapter.generation.request import GenerationRequest

    if args.scenes < 1:
        raise ConfigError("--scenes must be at least 1")
    if args.batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {args.batch}")
    if args.first_seed is not None and args.first_seed < 0:
        raise ConfigError(f"--first-seed must be >= 0, got {args.first_seed}")
    GenerationRequest("eval", steps=args.steps, guidance_scale=args.guidance)  # the request's checks, before loading
    for flag, target in (("--out", args.out), ("--json", args.json)):
        check_writable_file(flag, target, force=args.force)
    if args.out and args.json and Path(args.out).resolve() == Path(args.json).resolve():
        raise ConfigError(f"--out and --json both name {args.out}; give them different files")
    pairs = parse_adapters(args.adapter)
    for name in dict(pairs):
        if name not in CONDITIONS:  # default_settings scores adapters by condition: another name was never scored
            raise ConfigError(f"--adapter {name}: eval scores an adapter by the condition it takes; name it so, "
                              f"e.g. sketch=PATH (one of {', '.join(CONDITIONS)})")
    controlnets = parse_adapters(args.controlnet, "--controlnet")
    if not controlnets and args.base == DEMO_BASE:
        from t2iadapter.demo.loading import shipped_controlnets

        controlnets = shipped_controlnets()
    for name in controlnets:
        if condition_of(name) is None:
            raise ConfigError(f"--controlnet {name}: name it after the condition it takes, e.g. controlnet-sketch=PATH "
                              f"(one of {', '.join(CONDITIONS)})")
    if args.fuser is not None:
        from t2iadapter.formats import resolve

        resolve(args.fuser)  # a missing file is named before the base loads (whose progress bars would come first)
    device, _ = resolve_device(args.device, None)
    if args.base == DEMO_BASE and not pairs:
        from t2iadapter.demo.loading import demo_pipeline

        pipe = demo_pipeline(device=device, controlnets=controlnets, fuser=args.fuser)
    else:
        pipe = AdapterPipeline.from_pretrained(args.base, pairs, fuser=args.fuser, device=device, controlnets=controlnets)
    settings = default_settings(pipe.spatial_names, pipe.fuser is not None, pipe.controlnets)
    if args.only:
        known = [s.name for s in settings]
        unknown = [name for name in args.only if name not in known]
        if unknown:  # a misspelt name among good ones was dropped from the table silently
            raise ConfigError(f"--only {unknown[0]!r} matches no setting; settings are: {known}")
        settings = [s for s in settings if s.name in args.only]
    first = args.first_seed if args.first_seed is not None else world.EVAL_SEEDS.start
    scenes = [world.generate(s) for s in range(first, first + args.scenes)]
    rows, _ = evaluate(pipe, scenes, settings, steps=args.steps, guidance_scale=args.guidance, batch=args.batch)
    table = format_table(rows)
    print(f"{args.scenes} held-out scenes (seeds {first}–{first + args.scenes - 1}), {args.steps} steps, {device}")
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps([r.summary() for r in rows], indent=2) + "\n")
    return 0
