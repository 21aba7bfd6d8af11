"""`t2iadapter export-base NAME DIR`: write a preset base (tiny, tiny-xl, demo) as a diffusers folder."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-base", help="write a built-in base model as a diffusers pipeline folder")
    p.add_argument("name", choices=["tiny", "tiny-xl", "demo"], help="preset to export")
    p.add_argument("dir", help="output folder (must not exist or be empty)")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from t2iadapter.bases import load_base

    base = load_base(args.name)
    base.save_pretrained(args.dir, overwrite=args.force)
    print(f"wrote the {args.name} base ({'SDXL' if base.is_sdxl else 'SD'} layout) to {args.dir}")
    return 0
