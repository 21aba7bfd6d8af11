"""Seconds for one 256² demo image (25 DDIM steps, guidance 5, one sketch adapter) on this machine's CPU.

    python benchmarks/bench_demo_cpu.py --threads 1 2 --repeats 3

Rows: the shipped demo base (whatever `src/t2iadapter/assets/demo/base` holds), and each
architecture of `ARCHITECTURES` built with random weights (timing does not depend on the weights),
so a new demo architecture is checked against the ≤ 4 s budget (issue 11) before it is trained.
Columns: median and min seconds over `--repeats` calls after one warm-up, the UNet's share
(time inside the 25 guided UNet calls), and the UNet/VAE-decoder parameter counts.
The machine is named in the table's title; numbers from a busy machine are noise, so the
script also reports the spread (max/min).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import t2iadapter  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from t2iadapter.demo import world  # noqa: E402
from t2iadapter.demo.architecture import DemoBaseConfig, build_demo_base, save_demo_base  # noqa: E402

# name → architecture (None: the shipped files)
ARCHITECTURES: dict[str, DemoBaseConfig | None] = {
    "shipped": None,
    "v1 (all self-attention, VAE 16–128)": dataclasses.replace(
        DemoBaseConfig(), vae_channels=(16, 32, 64, 128), self_attention=(True, True, True, True)
    ),
    "v2 (no self-attention at 32², VAE 32–128)": DemoBaseConfig(),
}


def build_pipeline(arch: DemoBaseConfig | None, workdir: Path):
    """An AdapterPipeline on the shipped base, or on `arch` with random weights, with the shipped sketch adapter."""
    from t2iadapter import AdapterPipeline

    if arch is None:
        return AdapterPipeline.from_pretrained("demo", {"sketch": "demo/sketch"}, device="cpu")
    folder = workdir / "base"
    save_demo_base(build_demo_base(0, arch), folder, torch.float16, arch)
    return AdapterPipeline.from_pretrained(str(folder), {"sketch": "demo/sketch"}, device="cpu")


def time_row(pipe, repeats: int) -> dict[str, float]:
    """Median/min seconds per image, and the seconds spent in UNet calls of the last call."""
    scene = world.generate(world.BUILTIN_SEEDS[0])
    unet_seconds = []
    unet = pipe.base.unet
    original = unet.forward

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        unet_seconds.append(time.perf_counter() - start)
        return out

    unet.forward = timed
    try:
        def once() -> float:
            unet_seconds.clear()
            start = time.perf_counter()
            pipe(scene.caption, {"sketch": scene.sketch}, steps=25, guidance_scale=5.0, seed=0, size=(256, 256),
                 progress=False)
            return time.perf_counter() - start

        once()  # warm-up
        times = [once() for _ in range(repeats)]
    finally:
        del unet.forward
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "unet": sum(unet_seconds)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", action="append", default=[], help="rows whose name starts with this (repeatable)")
    a = p.parse_args()
    import logging

    logging.disable(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, arch in ARCHITECTURES.items():
            if a.only and not any(name.startswith(o) for o in a.only):
                continue
            pipe = build_pipeline(arch, Path(tmp) / name.split()[0])
            params = (sum(x.numel() for x in pipe.base.unet.parameters()),
                      sum(x.numel() for x in pipe.base.vae.decoder.parameters()))  # fmt: skip
            for threads in a.threads:
                torch.set_num_threads(threads)
                r = time_row(pipe, a.repeats)
                rows.append((name, threads, r, params))
                print(f"{name}, {threads} thread(s): {r['median']:.2f} s", file=sys.stderr, flush=True)
    cpu = platform.processor() or platform.machine()
    print(f"\n256² image, 25 DDIM steps, guidance 5, sketch adapter — {os.cpu_count()} cores ({cpu}), torch {torch.__version__}")
    print("| base | threads | s/image (median) | min | max/min | UNet s | UNet params | decoder params |")
    print("|---|---|---|---|---|---|---|---|")
    for name, threads, r, (pu, pd) in rows:
        print(f"| {name} | {threads} | {r['median']:.2f} | {r['min']:.2f} | {r['max'] / r['min']:.2f} | "
              f"{r['unet']:.2f} | {pu / 1e6:.1f}M | {pd / 1e6:.2f}M |")


if __name__ == "__main__":
    main()
