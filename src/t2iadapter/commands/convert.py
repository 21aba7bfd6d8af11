"""`t2iadapter convert SRC DST [--to diffusers|original|single]`."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an adapter checkpoint between formats",
        description="Convert an adapter between the original TencentARC format (.pth/.safetensors), a diffusers "
        "folder and our single file (safetensors with the config inside). Tensors are copied bit for bit.",
    )
    p.add_argument("src", help="adapter file, folder, demo/NAME or hub id")
    p.add_argument("dst", help="output file or folder")
    p.add_argument("--to", choices=["diffusers", "original", "single"],
                   help="target format (default: from DST: .safetensors → single, .pth → original, else diffusers)")
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from t2iadapter.formats import convert

    module, to = convert(args.src, args.dst, args.to, overwrite=args.force)
    cfg = module.config
    shape = f"{cfg.in_channels}-channel " if hasattr(cfg, "in_channels") else ""
    print(f"{args.src} → {args.dst}: {shape}{module.kind} adapter, {module.num_parameters / 1e6:.2f}M params, "
          f"{module.dtype}, written as {to}")
    return 0
