"""`t2iadapter generate`: text + condition images → PNG (with its parameters inside)."""
from __future__ import annotations

import argparse
from pathlib import Path

from t2iadapter.commands import _batch_jobs as batch_jobs
from t2iadapter.errors import ConfigError
from t2iadapter.generation.request import FUSER_WINDOW_MODES, defaults


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like WIDTHxHEIGHT, e.g. 512x512") from None
    return w, h


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by `generate` and other commands that sample; defaults are GenerationRequest's."""
    from t2iadapter.generation.schedulers import scheduler_names

    d = defaults()
    p.add_argument("--prompt", default=None, help="text prompt (required, except with --batch)")
    p.add_argument("--negative-prompt", default=d["negative_prompt"], help="negative prompt")
    p.add_argument("--steps", type=int, default=d["steps"], help=f"denoising steps (default {d['steps']})")
    p.add_argument("--guidance", type=float, default=d["guidance_scale"],
                   help=f"classifier-free guidance scale (default {d['guidance_scale']})")
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed (default: a random one, stored in the PNG)")
    p.add_argument("--size", type=parse_size, default=d["size"], help="output WIDTHxHEIGHT (any size; default: the base's)")
    p.add_argument("--scheduler", default=d["scheduler"], help=", ".join(scheduler_names()) + " (default: the base's)")
    p.add_argument("--num-images", type=int, default=d["num_images"], help="images to generate (FILE-0.png, FILE-1.png, ...)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp16 on GPU, fp32 on CPU")
    p.add_argument("--fast", action="store_true", help="fast mode on GPU: half precision, channels-last, torch.compile")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate an image with adapters",
        description="Generate with a base model and T2I-Adapters. Give --adapter/--condition in pairs; --weight and "
        "--window either once per adapter (in order, spatial adapters then the style adapter) or not at all.",
    )
    p.add_argument("--base", required=True, help="base model: diffusers folder, .safetensors/.ckpt, hub id, or demo/tiny/tiny-xl")
    p.add_argument("--config-dir", default=None, help="diffusers configs for an offline single-file base")
    p.add_argument("--adapter", action="append", default=[], help="adapter file/folder/demo name/hub id (repeatable)")
    p.add_argument("--condition", action="append", default=[], help="condition image, one per --adapter (repeatable)")
    p.add_argument("--weight", action="append", type=float, default=[], help="adapter weight (repeatable, default 1)")
    p.add_argument("--window", action="append", default=[], help="START:END fraction of steps an adapter acts (default 0:1)")
    p.add_argument("--fuser", default=None, help="CoAdapter fuser checkpoint: compose the adapters through it")
    p.add_argument("--fuser-windows", choices=FUSER_WINDOW_MODES, default=defaults()["fuser_windows"],
                   help="with --fuser and --window: 'once' fuses every condition once and gates each by its window "
                   "(the original CoAdapter); 'active' re-fuses the adapters active at each step")
    p.add_argument("--style-adapter", default=None, help="style adapter checkpoint (needs --style-image)")
    p.add_argument("--style-image", default=None, help="style reference image")
    p.add_argument("--style-encoder", default=None, help="CLIP ViT-L/14 vision model folder or hub id for --style-image")
    add_generation_arguments(p)
    p.add_argument("--out", required=True, help="output PNG file (with --batch: a folder)")
    batch_jobs.add_arguments(p)
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(func=run)


def output_paths(out: str, n: int, force: bool) -> list[Path]:
    base = Path(out)
    if base.is_dir():
        raise ConfigError(f"--out {out} is a folder; name a PNG file")
    if not base.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {base.parent} does not exist")
    if base.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the output is a PNG file; name it *.png")
    paths = [base] if n == 1 else [base.with_name(f"{base.stem}-{i}{base.suffix}") for i in range(n)]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(f"{', '.join(existing)} already exists; choose another --out or pass --force")
    return paths


def run(args: argparse.Namespace) -> int:
    if args.batch:
        return batch_jobs.run(args)
    if not args.prompt:
        raise ConfigError("--prompt is required (or --batch JOBS.jsonl)")
    if len(args.adapter) != len(args.condition):
        raise ConfigError(f"got {len(args.adapter)} --adapter and {len(args.condition)} --condition; give one condition per adapter")
    if bool(args.style_adapter) != bool(args.style_image):
        raise ConfigError("--style-adapter and --style-image go together")
    n_adapters = len(args.adapter) + (1 if args.style_adapter else 0)
    for name, values in (("--weight", args.weight), ("--window", args.window)):
        if values and len(values) != n_adapters:
            raise ConfigError(f"got {len(values)} {name} for {n_adapters} adapters; give one per adapter or none")
    for cond in args.condition + ([args.style_image] if args.style_image else []):
        if not Path(cond).is_file():
            raise ConfigError(f"condition image {cond} does not exist")
    paths = output_paths(args.out, args.num_images, args.force)

    from t2iadapter.generation.pipeline import AdapterPipeline, resolve_device
    from t2iadapter.generation.request import AdapterUse, GenerationRequest, Window
    from t2iadapter.pngmeta import save_png

    device, dtype = resolve_device(args.device, args.dtype)
    adapters = list(args.adapter) + ([args.style_adapter] if args.style_adapter else [])
    conditions = list(args.condition) + ([args.style_image] if args.style_image else [])
    pipe = AdapterPipeline.from_pretrained(args.base, adapters, fuser=args.fuser, style_encoder=args.style_encoder,
                                           device=device, dtype=dtype, config_dir=args.config_dir)
    if args.fast:
        pipe.optimize()
    uses = tuple(AdapterUse(name, cond, **({"weight": args.weight[i]} if args.weight else {}),  # else the request's
                            **({"window": Window.parse(args.window[i])} if args.window else {}))
                 for i, (name, cond) in enumerate(zip(pipe.adapters, conditions)))
    request = GenerationRequest(args.prompt, uses, negative_prompt=args.negative_prompt, steps=args.steps,
                                guidance_scale=args.guidance, size=args.size, seed=args.seed, scheduler=args.scheduler,
                                num_images=args.num_images, compose="fuser" if args.fuser else "sum",
                                fuser_windows=args.fuser_windows)
    result = pipe.generate(request, progress=True)
    params = dict(result.parameters, adapter_sources=adapters, conditions=list(args.condition), fuser=args.fuser,
                  style_image=args.style_image)
    for image, path in zip(result.images, paths):
        save_png(image, path, params)
        print(f"wrote {path} ({image.width}x{image.height}, seed {params['seed']})")
    return 0
