"""`t2iadapter generate`: text + condition images → PNG (with its parameters inside)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from t2iadapter.commands import (add_base_arguments, add_fast_arguments, add_threads_argument, check_fast_arguments,
                                 fast_precision, parse_adapters)
from t2iadapter.commands import _batch_jobs as batch_jobs
from t2iadapter.errors import ConditionError, ConfigError
from t2iadapter.generation.request import FUSER_WINDOW_MODES, GenerationRequest, defaults


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
    p.add_argument("--eta", type=float, default=d["eta"],
                   help=f"0..1: DDIM's eta (noise added back each step), TCD's gamma (default {d['eta']:g})")
    p.add_argument("--num-images", type=int, default=d["num_images"], help="images to generate (FILE-0.png, FILE-1.png, ...)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp16 on GPU, fp32 on CPU")
    add_fast_arguments(p, "(for a GPU)")
    add_threads_argument(p)


class _Paired(argparse._AppendAction):
    """`--adapter`/`--controlnet`, also noting their order on the command line: the k-th `--condition` belongs
    to the k-th of them (issue 16)."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        super().__call__(parser, namespace, values, option_string)
        namespace.paired = list(getattr(namespace, "paired", None) or []) + [self.dest]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate an image with adapters",
        description="Generate with a base model, T2I-Adapters and ControlNets. Give one --condition per --adapter or "
        "--controlnet, in their command-line order; --weight and --window either once per adapter (in order, spatial "
        "adapters then the style adapter) or not at all, --controlnet-weight and --controlnet-window likewise per "
        "ControlNet.",
    )
    add_base_arguments(p)
    p.add_argument("--adapter", action=_Paired, default=[], metavar="[NAME=]PATH",
                   help="adapter file, folder, demo/NAME or hub id, optionally named NAME= (repeatable)")
    p.add_argument("--controlnet", action=_Paired, default=[], metavar="[NAME=]PATH",
                   help="diffusers ControlNet: folder, single file or hub id; runs every step (repeatable)")
    p.add_argument("--condition", action="append", default=[],
                   help="condition image, one per --adapter/--controlnet in their order (repeatable)")
    p.add_argument("--weight", action="append", type=float, default=[], help="adapter weight (repeatable, default 1)")
    p.add_argument("--window", action="append", default=[], help="START:END fraction of steps an adapter acts (default 0:1)")
    p.add_argument("--controlnet-weight", action="append", type=float, default=[],
                   help="ControlNet conditioning scale (repeatable: one per --controlnet, default 1)")
    p.add_argument("--controlnet-window", action="append", default=[],
                   help="START:END fraction of steps a ControlNet runs (repeatable: one per --controlnet, default 0:1)")
    p.add_argument("--fuser", default=None, help="CoAdapter fuser checkpoint: compose the adapters through it")
    p.add_argument("--fuser-windows", choices=FUSER_WINDOW_MODES, default=defaults()["fuser_windows"],
                   help="with --fuser and --window: 'once' fuses every condition once and gates each by its window "
                   "(the original CoAdapter); 'active' re-fuses the adapters active at each step")
    p.add_argument("--style-adapter", default=None, help="style adapter checkpoint (needs --style-image)")
    p.add_argument("--style-image", default=None, help="style reference image")
    p.add_argument("--style-encoder", default=None, help="CLIP ViT-L/14 vision model folder or hub id for --style-image")
    add_generation_arguments(p)
    # --- img2img / inpainting / LoRAs (issue 15) ---
    p.add_argument("--init-image", default=None, help="img2img: the image to start from (output size: its own unless --size)")
    p.add_argument("--strength", type=float, default=defaults()["strength"],
                   help="with --init-image: noise level to start from, in (0, 1] (default 0.8; 1.0 with --mask)")
    p.add_argument("--mask", default=None, help="inpainting: mask of --init-image's size, white = repaint")
    p.add_argument("--paste-back", action="store_true", help="with --mask: put the kept pixels of --init-image back exactly")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA file, folder or hub id, with an optional scale (default 1); repeatable")
    p.add_argument("--out", required=True, help="output PNG file (with --batch: a folder)")
    batch_jobs.add_arguments(p)
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(func=run, paired=[])


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


def _controlnet_uses(args: argparse.Namespace, names: list[str], conditions: list[str]) -> tuple:
    """The request's ControlNet uses from --controlnet, their --condition and --controlnet-weight/-window (issue 16)."""
    from t2iadapter.generation.request import ControlNetUse, Window

    for flag, values in (("--controlnet-weight", args.controlnet_weight), ("--controlnet-window", args.controlnet_window)):
        if values and len(values) != len(names):
            raise ConfigError(f"got {len(values)} {flag} for {len(names)} ControlNets; give one per --controlnet or none")
    return tuple(ControlNetUse(name, cond, **({"weight": args.controlnet_weight[i]} if args.controlnet_weight else {}),
                               **({"window": Window.parse(args.controlnet_window[i])} if args.controlnet_window else {}))
                 for i, (name, cond) in enumerate(zip(names, conditions)))


# the request's field names in its messages → the flags a command-line user typed
FLAGS = {"guidance_scale": "--guidance", "mask_image": "--mask", "init_image": "--init-image",
         "num_images": "--num-images", "negative_prompt": "--negative-prompt", "paste_back": "--paste-back",
         "fuser_windows": "--fuser-windows", "steps": "--steps", "strength": "--strength", "seed": "--seed",
         "size": "--size", "scheduler": "--scheduler", "prompt": "--prompt", "eta": "--eta"}


def as_flags(message: str) -> str:
    """A request error in the CLI's words: `mask_image needs init_image` → `--mask needs --init-image`; the bare
    names (steps, seed, size, ...) only where they begin the message, which is where the request names a field."""
    for field, flag in FLAGS.items():
        if "_" in field:
            message = re.sub(rf"(?<![\w/.\\-]){field}(?![\w/\\-]|\.\w)", flag, message)  # not inside a path
        elif re.match(rf"{field}\b(?!-)", message):
            message = flag + message[len(field):]
    return message


def request_from_args(args: argparse.Namespace, prompt: str | None = None) -> GenerationRequest:
    """The command line's generation values as one request, without adapters yet: its checks run here, before any
    model loads, and its errors name the flags. `prompt` stands in where --batch lines bring their own."""
    try:
        return GenerationRequest(prompt or args.prompt, (), negative_prompt=args.negative_prompt, steps=args.steps,
                                 guidance_scale=args.guidance, size=args.size, seed=args.seed,
                                 scheduler=args.scheduler, num_images=args.num_images,
                                 compose="fuser" if args.fuser else "sum", fuser_windows=args.fuser_windows,
                                 init_image=args.init_image, strength=args.strength, mask_image=args.mask,
                                 paste_back=args.paste_back, eta=args.eta)
    except ConfigError as exc:
        raise ConfigError(as_flags(str(exc))) from None


def run(args: argparse.Namespace) -> int:
    if args.batch:
        return batch_jobs.run(args)
    if not args.prompt:
        raise ConfigError("--prompt is required (or --batch JOBS.jsonl)")
    paired = list(args.paired)
    if len(paired) != len(args.condition):
        raise ConfigError(f"got {len(args.adapter)} --adapter, {len(args.controlnet)} --controlnet and "
                          f"{len(args.condition)} --condition; give one condition per adapter and ControlNet")
    adapter_conditions = [c for kind, c in zip(paired, args.condition) if kind == "adapter"]
    controlnet_conditions = [c for kind, c in zip(paired, args.condition) if kind == "controlnet"]
    controlnets = parse_adapters(args.controlnet, "--controlnet")
    if bool(args.style_adapter) != bool(args.style_image):
        raise ConfigError("--style-adapter and --style-image go together")
    n_adapters = len(args.adapter) + (1 if args.style_adapter else 0)
    for name, values in (("--weight", args.weight), ("--window", args.window)):
        if values and len(values) != n_adapters:
            raise ConfigError(f"got {len(values)} {name} for {n_adapters} adapters; give one per adapter or none")
    from t2iadapter.extractors.images import require_file

    for cond in args.condition:  # `--condition sketch=a.png`, written like `--adapter sketch=...`
        name, _, rest = cond.partition("=")
        if rest and name.isidentifier() and not Path(cond).exists() and Path(rest).exists():
            raise ConfigError(f"--condition {cond}: conditions take no NAME=; give --condition {rest}, in the order "
                              f"of the --adapter/--controlnet flags")
    for flag, image in ([("--condition", c) for c in args.condition] + [("--style-image", args.style_image),
                        ("--init-image", args.init_image), ("--mask", args.mask)]):
        if image is not None:  # named by its flag, before anything loads
            require_file(image, f"{flag} {image}")
    from t2iadapter.generation.lora import parse_lora

    loras = [parse_lora(text) for text in args.lora]
    paths = output_paths(args.out, args.num_images, args.force)

    import dataclasses

    from t2iadapter.generation.pipeline import AdapterPipeline, resolve_device
    from t2iadapter.generation.request import AdapterUse, Window
    from t2iadapter.pngmeta import save_png

    request = request_from_args(args)  # the request's own checks (seed, guidance, size, ...) before anything loads
    windows = [Window.parse(w) for w in args.window]
    for w in args.weight:  # AdapterUse's check (a finite number), before anything loads
        AdapterUse("--weight", None, w)
    named = parse_adapters(args.adapter)
    if args.style_adapter:
        named = {**named, **parse_adapters([args.style_adapter])}
        if len(named) != len(args.adapter) + 1:
            raise ConfigError(f"--style-adapter {args.style_adapter}: its name is already used by an --adapter")
    device, dtype = resolve_device(args.device, args.dtype)
    check_fast_arguments(args)
    if args.fast:
        import torch

        from t2iadapter.generation.fast import resolve_precision

        resolve_precision(fast_precision(args.fast), None, torch.device(device))  # fp8 where it cannot run: now
        if device == "cpu":
            print("--fast on the CPU: compiling the model the first time takes about a minute and a half (later runs "
                  "load it from the cache)", flush=True)
    adapters = list(named.values())
    conditions = adapter_conditions + ([args.style_image] if args.style_image else [])
    pipe = AdapterPipeline.from_pretrained(args.base, named, fuser=args.fuser, style_encoder=args.style_encoder,
                                           device=device, dtype=dtype, config_dir=args.config_dir, controlnets=controlnets)
    for source, scale in loras:
        pipe.load_lora(source, scale=scale)
    if args.fast:
        pipe.optimize(precision=fast_precision(args.fast), cache_dir=args.cache_dir, aot=args.aot)  # after the LoRAs: fused in
        if pipe.compile_cache is not None:
            pipe.compile_cache.report = lambda line: print(line, flush=True)
    uses = tuple(AdapterUse(name, cond, **({"weight": args.weight[i]} if args.weight else {}),  # else the request's
                            **({"window": windows[i]} if windows else {}))
                 for i, (name, cond) in enumerate(zip(pipe.adapters, conditions)))
    request = dataclasses.replace(request, adapters=uses,
                                  controlnets=_controlnet_uses(args, list(pipe.controlnets), controlnet_conditions))
    try:
        result = pipe.generate(request, progress=True)
    except (ConfigError, ConditionError) as exc:  # e.g. a mask of another size than the image
        raise type(exc)(as_flags(str(exc))) from None
    params = dict(result.parameters, adapter_sources=adapters, conditions=adapter_conditions, fuser=args.fuser,
                  style_image=args.style_image,
                  **({"controlnet_sources": list(controlnets.values()), "controlnet_conditions": controlnet_conditions}
                     if controlnets else {}),
                  **({"init_image": args.init_image} if args.init_image else {}),
                  **({"mask_image": args.mask} if args.mask else {}), **({"loras_from": args.lora} if args.lora else {}))
    for image, path in zip(result.images, paths):
        save_png(image, path, params)
        print(f"wrote {path} ({image.width}x{image.height}, seed {params['seed']})")
    return 0
