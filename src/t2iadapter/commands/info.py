"""`t2iadapter info FILE`: what an image's generation parameters were, or what an adapter checkpoint is."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a PNG's generation parameters or an adapter's or ControlNet's config")
    p.add_argument("path", help="a PNG written by t2iadapter, or an adapter or ControlNet file/folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.path.lower().endswith(".png"):
        from t2iadapter.pngmeta import read_parameters

        params = read_parameters(args.path)
    else:
        from t2iadapter.formats import is_controlnet_checkpoint, load_adapter

        if is_controlnet_checkpoint(args.path):
            from t2iadapter.generation.controlnet import load_controlnet

            module = load_controlnet(args.path)
            config = {k: v for k, v in module.config.items() if not k.startswith("_")}
            params = dict(kind="controlnet", **config, parameters=sum(p.numel() for p in module.parameters()),
                          dtype=str(next(module.parameters()).dtype))
        else:
            module = load_adapter(args.path)
            params = dict(module.config_dict(), parameters=module.num_parameters, dtype=str(module.dtype))
    if args.json:
        print(json.dumps(params, indent=2, sort_keys=True, default=str))
    else:
        width = max(len(k) for k in params)
        for key, value in params.items():
            print(f"{key:<{width}}  {value}")
    return 0
