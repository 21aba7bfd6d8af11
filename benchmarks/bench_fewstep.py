"""Few-step sampling (issue 15): time to one image, LCM 4 steps, guidance 1, one adapter — ours fast vs diffusers.

Random weights at the real sizes (bench_inference.py's SD1.5/SDXL components; speed does not depend on weight
values): SD1.5 architecture at 512² and SDXL at 1024², batch 1, the LCM scheduler with 4 steps, guidance 1
(no unconditional branch), one 3-channel full adapter (diffusers gets the same weights).

rows  diffusers    StableDiffusion(XL)AdapterPipeline + LCMScheduler, fp16, eager: as a user runs it
      ours-eager   AdapterPipeline, fp16, eager, scheduler="lcm"
      ours-fast    AdapterPipeline.optimize() (bf16, channels-last, fused q/k/v, torch.compile + CUDA graphs)
columns  ms/image (median of --repeats after --warmup calls; wall clock around a synchronised call: text
         encoding, adapter, 4 UNet steps and the VAE decode), first call s, × diffusers, max px diff (0-255,
         vs diffusers, same seed; fast mode's bf16 differs by design).
profile  (GPU) one call of diffusers and of ours-fast under torch.profiler: wall ms and the ms the GPU was busy;
         their top kernels go to $OUT/bench_fewstep_kernels_CASE_ROW.txt.
stages   where a call's time goes, per row (a second table): after the timed calls, --repeats more calls with
         the device synchronised around each stage (text encoding, adapter, the UNet steps, VAE decode, output
         conversion; `other` is the rest of the call: checks, scheduler set-up, for diffusers the condition's
         preprocessing, which ours counts in `adapter`), median ms per stage. The syncs themselves cost a little, so these calls' total is at least the timed ms/image.
Target (issue 15): ours-fast ≥ 3× diffusers, and SDXL 1024² ≤ 200 ms per image on an H200.

GPU:   python benchmarks/bench_fewstep.py [--only sd15,sdxl] [--repeats 5]
Smoke: python benchmarks/bench_fewstep.py --smoke      (CPU, tiny bases, no compile; a test runs it)
Writes $OUT/bench_fewstep.{json,md} (OUT defaults to ./out) and prints the table.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

STEPS = 4
GUIDANCE = 1.0
PROMPT = "a large red star left of a small blue circle above a green tree"
GPU_CASES = {"sd15": ("sd15", 512), "sdxl": ("sdxl", 1024)}
SMOKE_CASES = {"tiny": ("tiny", 64), "tiny-xl": ("tiny-xl", 128)}


def _inference_helpers():
    """bench_inference.py's real-size random components (one definition of the SD1.5/SDXL configs)."""
    spec = importlib.util.spec_from_file_location("bench_inference", HERE / "bench_inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_inference", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(call: Callable[[], np.ndarray], device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    """First-call seconds, then the median ms of `repeats` calls after `warmup` more; the last image."""
    sync(device)
    t0 = time.perf_counter()
    image = call()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        image = call()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms_image": statistics.median(times), "first_call_s": first, "image": image}


STAGES = ("text", "adapter", "unet steps", "decode", "output", "other")


def breakdown(call: Callable[[], Any], device: torch.device, patches: list[tuple[Any, str, str]],
              repeats: int) -> dict[str, float]:
    """Median ms per stage of `repeats` calls, each (owner, attribute, stage) in `patches` timed with the device
    synchronised around it (instance or module attributes, restored afterwards); `other` = total - stages."""
    runs: list[dict[str, float]] = []
    spent: dict[str, float] = {}

    def timed(original: Callable, stage: str) -> Callable:
        def wrapper(*args, **kwargs):
            sync(device)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync(device)
                spent[stage] = spent.get(stage, 0.0) + (time.perf_counter() - t0) * 1e3
        return wrapper

    with contextlib.ExitStack() as undo:
        for owner, attr, stage in patches:
            had = attr in vars(owner)  # an instance attribute (or a module's) to put back, else delete the wrapper
            original = getattr(owner, attr)
            setattr(owner, attr, timed(original, stage))
            if had:
                undo.callback(setattr, owner, attr, original)
            else:
                undo.callback(delattr, owner, attr)
        for _ in range(repeats):
            spent.clear()
            sync(device)
            t0 = time.perf_counter()
            call()
            sync(device)
            total = (time.perf_counter() - t0) * 1e3
            runs.append({**spent, "other": total - sum(spent.values()), "total": total})
    return {k: round(statistics.median(r.get(k, 0.0) for r in runs), 2) for k in (*STAGES, "total")}


def device_busy(call: Callable[[], Any], device: torch.device) -> tuple[dict[str, float], str]:
    """One call under torch.profiler: its wall ms, the ms the GPU was busy in it, and the top kernels (GPU only:
    a busy share far below 100 % means the host, not the card, sets the pace)."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        sync(device)
    wall = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events if str(e.device_type).endswith("CUDA")) / 1e3
    table = events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=70)
    return {"wall_ms": round(wall, 2), "busy_ms": round(busy, 2)}, table


def run_case(name: str, arch: str, size: int, args, device: torch.device, helpers) -> dict[str, Any]:
    from diffusers import LCMScheduler

    from t2iadapter.generation import loop, text
    from t2iadapter.pipeline import AdapterPipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    base = helpers.build_base(arch, device, dtype)
    (adapter,), ref = helpers.build_adapters(base, device, dtype, n=1)
    cond = helpers.conditions(size, 1)[0]
    base.scheduler = LCMScheduler.from_config(base.scheduler.config)
    rows: dict[str, dict[str, Any]] = {}

    pipe = helpers.diffusers_pipeline("adapter", base, adapter=ref)
    pipe.set_progress_bar_config(disable=True)

    def theirs() -> np.ndarray:
        return pipe(PROMPT, image=cond, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=size, width=size,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    rows["diffusers"] = timed(theirs, device, args.warmup, args.repeats)
    adapter_ = pipe.adapter
    rows["diffusers"]["stages"] = breakdown(theirs, device, [
        (pipe, "encode_prompt", "text"), (adapter_, "forward", "adapter"), (pipe.unet, "forward", "unet steps"),
        (pipe.vae, "decode", "decode"), (pipe.image_processor, "postprocess", "output")], args.repeats)

    ours = AdapterPipeline(base, [adapter])
    # module functions the pipeline calls through its modules' namespaces, and its own methods
    ours_stages = [(text, "encode_prompts", "text"), (text, "encode_prompts_batched", "text"),
                   (ours, "_features", "adapter"), (loop, "denoise_eager", "unet steps"),
                   (loop, "denoise_fast", "unet steps"), (ours, "decode", "decode"), (ours, "_output", "output")]

    def call() -> np.ndarray:
        return ours(PROMPT, [cond], steps=STEPS, guidance_scale=GUIDANCE, scheduler="lcm", size=(size, size), seed=0,
                    output_type="np", progress=False).images[0]

    rows["ours-eager"] = timed(call, device, args.warmup, args.repeats)
    rows["ours-eager"]["stages"] = breakdown(call, device, ours_stages, args.repeats)
    if args.smoke:
        ours.optimize(compile=False, dtype=torch.float32)
    else:
        ours.optimize()
    rows["ours-fast"] = timed(call, device, args.warmup, args.repeats)
    rows["ours-fast"]["stages"] = breakdown(call, device, ours_stages, args.repeats)
    if device.type == "cuda":
        for row, fn in (("diffusers", theirs), ("ours-fast", call)):
            rows[row]["profile"], kernels = device_busy(fn, device)
            (Path(args.out) / f"bench_fewstep_kernels_{name}_{row}.txt").write_text(kernels)

    out = {}
    want = rows["diffusers"]["image"]
    for row, r in rows.items():
        out[row] = {"ms_image": round(r["ms_image"], 2), "first_call_s": round(r["first_call_s"], 2),
                    "x_diffusers": round(rows["diffusers"]["ms_image"] / r["ms_image"], 2),
                    "max_px_diff": round(float(np.abs(r["image"] - want).max()) * 255, 2), "stages": r["stages"],
                    **({"profile": r["profile"]} if "profile" in r else {})}
    del pipe, ours, base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def table(results: dict[str, Any], header: str) -> str:
    lines = [header, "", "| case | row | ms/image | × diffusers | first call s | max px diff (vs diffusers) |",
             "|---|---|---|---|---|---|"]
    for case, rows in results.items():
        for row, r in rows.items():
            lines.append(f"| {case} | {row} | {r['ms_image']:.1f} | {r['x_diffusers']:.2f} | {r['first_call_s']:.1f} "
                         f"| {r['max_px_diff']:.1f} |")
    lines += ["", "Where the time goes (ms, median of calls synchronised around each stage):", "",
              "| case | row | " + " | ".join(STAGES) + " | total |", "|---|---|" + "---|" * (len(STAGES) + 1)]
    for case, rows in results.items():
        for row, r in rows.items():
            lines.append(f"| {case} | {row} | " + " | ".join(f"{r['stages'][k]:.1f}" for k in (*STAGES, "total")) + " |")
    busy = [(case, row, r["profile"]) for case, rows in results.items() for row, r in rows.items() if "profile" in r]
    if busy:
        lines += ["", "One call under torch.profiler (top kernels in bench_fewstep_kernels_CASE_ROW.txt):", ""]
        lines += [f"- {case} {row}: wall {p['wall_ms']:.1f} ms, GPU busy {p['busy_ms']:.1f} ms "
                  f"({100 * p['busy_ms'] / p['wall_ms']:.0f} %)" for case, row, p in busy]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny bases, no compile, one repeat (a test runs it)")
    p.add_argument("--only", default=None, help="comma-separated cases (sd15, sdxl; smoke: tiny, tiny-xl)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = p.parse_args(argv)
    if args.smoke:
        args.repeats, args.warmup = 1, 0
        torch.set_num_threads(1)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    cases = SMOKE_CASES if args.smoke else GPU_CASES
    names = args.only.split(",") if args.only else list(cases)
    helpers = _inference_helpers()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {name: run_case(name, *cases[name], args, device, helpers) for name in names}
    import diffusers

    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    header = (f"Device: {card} · torch {torch.__version__} · diffusers {diffusers.__version__} · LCM {STEPS} steps, "
              f"guidance {GUIDANCE}, one adapter, batch 1")
    (out / "bench_fewstep.json").write_text(json.dumps({"header": header, "rows": results}, indent=2))
    md = table(results, header)
    (out / "bench_fewstep.md").write_text(md)
    print(md)
    return results


if __name__ == "__main__":
    main()
