"""Train the embedded demo's adapters with `t2iadapter train` on the procedural world.

    python scripts/train_demo_adapters.py --base runs/demo-base --out runs/demo-adapters --minutes 3 --fuser-minutes 1.5
    python scripts/train_demo_adapters.py --base tiny --out /tmp/demo-adapters --smoke     # CPU, seconds

Phase 1 trains, concurrently (one process each, sharing the GPU), a full adapter for sketch (1
channel), seg, depth and pose (3 channels) and the light colour adapter, each on the world's exact
condition maps. Phase 2 trains a CoAdapter fuser for sketch+colour jointly with those two adapters
(initialised from phase 1) using the condition-dropout recipe of DESIGN.md §6. Every run is an
ordinary `t2iadapter train --config` run; its YAML is written next to its outputs. The final
adapters are copied as fp16 single files to OUT/adapters/{sketch,seg,depth,pose,color,fuser}.safetensors.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ADAPTERS = {  # condition → (kind, input channels)
    "sketch": ("full", 1),
    "seg": ("full", 3),
    "depth": ("full", 3),
    "pose": ("full", 3),
    "color": ("light", 3),
}


def config(base: str, out: Path, adapters: list[dict], *, fuser: dict | None, args) -> dict:
    recipe = {
        "batch_size": 2 if args.smoke else args.batch,
        "max_steps": 3 if args.smoke else 1_000_000,  # bounded by max_minutes
        "max_minutes": None if args.smoke else args.minutes_for_phase,
        "lr": args.lr,
        "warmup_steps": 0 if args.smoke else 100,
        "schedule": "constant",
        "timesteps": "cubic",  # paper §3.4: structure is decided early (large t)
        "mixed_precision": "no" if args.smoke else "bf16",
        "seed": 0,
        "channels_last": not args.smoke,
    }
    if fuser is not None:
        recipe["text_dropout"] = 0.5  # CoAdapter recipe
    cfg = {
        "base": base,
        "data": {"kind": "world", "resolution": 64 if args.smoke else 256, "num_workers": 0 if args.smoke else args.workers},
        "recipe": recipe,
        "checkpoint": {"every": 0 if args.smoke else 2000, "keep": 1},
        "output_dir": str(out),
        "log_every": 1 if args.smoke else 50,
    }
    if fuser is None:
        cfg["adapter"] = adapters[0]
    else:
        cfg["adapters"] = adapters
        cfg["fuser"] = fuser
    return cfg


def launch(cfg: dict, out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    path.write_text(json.dumps(cfg, indent=2))
    log = open(out / "train.log", "w")
    return subprocess.Popen([sys.executable, "-m", "t2iadapter.cli", "train", "--config", str(path)],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def wait_all(procs: dict[str, subprocess.Popen], runs: Path) -> None:
    failed = []
    for name, p in procs.items():
        if p.wait() != 0:
            failed.append(name)
            print(f"--- {name} failed; end of its log:\n" + (runs / name / "train.log").read_text()[-3000:], flush=True)
    if failed:
        raise SystemExit(f"training failed for {failed}")


def to_fp16(src: Path, dst: Path) -> None:
    import torch

    from t2iadapter.formats import load_adapter

    module = load_adapter(src).to(torch.float16)
    dst.parent.mkdir(parents=True, exist_ok=True)
    module.save_file(dst, overwrite=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the trained demo base folder (or tiny for --smoke)")
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=3.0, help="phase 1 budget (all five adapters at once)")
    p.add_argument("--fuser-minutes", type=float, default=1.5, help="phase 2 budget (fuser + sketch + colour)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)  # from scratch on a small base; the paper's 1e-5 is for SD's 77M adapters
    p.add_argument("--workers", type=int, default=2, help="world-rendering DataLoader workers per run")
    p.add_argument("--fuser-width", type=int, default=128)
    p.add_argument("--init", default=None, help="continue from a folder of {name}.safetensors (a previous run's adapters/)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    runs = out / "runs"
    t0 = time.time()

    args.minutes_for_phase = args.minutes
    procs = {}
    for name, (kind, ch) in ADAPTERS.items():
        spec = {"kind": kind, "condition": name, "in_channels": ch}
        if args.init:
            spec["init_from"] = str(Path(args.init) / f"{name}.safetensors")
        procs[name] = launch(config(args.base, runs / name, [spec], fuser=None, args=args), runs / name)
    wait_all(procs, runs)
    print(f"phase 1 done in {time.time() - t0:.0f} s", flush=True)

    args.minutes_for_phase = args.fuser_minutes
    co = [{"kind": ADAPTERS[n][0], "condition": n, "in_channels": ADAPTERS[n][1],
           "init_from": str(runs / n / "adapter.safetensors")} for n in ("sketch", "color")]
    fuser_spec = {"width": args.fuser_width}
    if args.init and (Path(args.init) / "fuser.safetensors").is_file():
        fuser_spec = {"init_from": str(Path(args.init) / "fuser.safetensors")}
    fuser_cfg = config(args.base, runs / "fuser", co, fuser=fuser_spec, args=args)
    wait_all({"fuser": launch(fuser_cfg, runs / "fuser")}, runs)
    print(f"phase 2 done in {time.time() - t0:.0f} s", flush=True)

    final = out / "adapters"
    for name in ADAPTERS:
        to_fp16(runs / name / "adapter.safetensors", final / f"{name}.safetensors")
    to_fp16(runs / "fuser" / "fuser.safetensors", final / "fuser.safetensors")
    summary = {}
    for name in [*ADAPTERS, "fuser"]:
        log = (runs / name / "train.log").read_text()
        summary[name] = log.strip().splitlines()[-1][-300:] if log.strip() else ""
    (out / "adapters_log.json").write_text(json.dumps({"seconds": time.time() - t0, "runs": summary}, indent=2))
    print(json.dumps(summary, indent=1), flush=True)


if __name__ == "__main__":
    main()
