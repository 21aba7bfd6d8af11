"""Fast mode v2 (issue 18): first image from a compiled-graph cache, fp8 against bf16, ours-eager against diffusers.

One run on a GPU machine gives the issue's whole table (random weights at the real sizes, built from configs
as in bench_inference.py; no downloads):

  first image, new process   SD1.5 512² and SDXL 1024², 30 Euler steps, CFG 7.5, one 3-channel adapter: a process
                             compiles into a fresh cache folder (cold), then a NEW process with its own empty torch
                             caches (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) times its first image from the folder,
                             then another from a copy of the folder at another path (as on another machine).
                             Three cache kinds: `inductor` (torch's compile-cache artefacts), `aot` (the UNet as an
                             AOTInductor package, `optimize(aot=True)`: no tracing in the new process, no CUDA graphs)
                             and `precompile` (inductor's plus dynamo's traced bytecode, torch's experimental caching
                             precompile).
                             Targets: SD1.5 ≤ 3 s, SDXL ≤ 5 s.
  fp8 vs bf16 ms/step        SDXL 1024² batch 1 (target ≤ 22; bf16 30.5) and SD1.5 512² batch 4 (≤ 13; bf16 18.7),
                             both compiled (CUDA graphs), median of 3 images, device events per step; and the UNet's
                             relative error fp8 vs bf16 at every step of a 30-step trajectory (bf16's inputs fed to both).
  ours-eager vs diffusers    SD1.5 512² batch 1, fp16 eager, timed interleaved in one process with no profiler before
                             (target ≥ 1.0×).
  demo IoU bf16 vs fp8       the shipped demo model and sketch adapter, held-out scenes, 25 steps: structure IoU in
                             both precisions (must agree within 0.01).

GPU command (diffusers and torchao come as wheels in .whl/: diffusers-0.42.1 and torchao-0.18.0). The whole run
needs more than one 10-minute device call (on an H100 the first one spent 275 s on cold compiles and ran out of
budget before the fp8 and precompile rows), so it runs in parts, one call each (`--part eager|start|fp8`; ~2, ~8
and ~6 minutes):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \\
      && export PYTHONPATH=/tmp/site:$PWD/src || exit; \\
      HF_HUB_OFFLINE=1 python3 benchmarks/bench_fast_v2.py --part start 2>&1 | tee $OUT/bench_fast_v2_log.txt | tail -n 40

Each first-image row also says where its seconds went (torch's compile timers: dynamo's tracing, of it the
backend's AOTAutograd + inductor part with its cache loads; the rest runs the steps and records the CUDA graphs).

CPU smoke run (tiny bases, 2 steps, a no-codegen compile backend, fp8 refused as it must be; a test runs it):

    python3 benchmarks/bench_fast_v2.py --smoke

Writes $OUT/bench_fast_v2.{json,md} (OUT defaults to ./out) and prints the markdown table last, with the machine,
torch, diffusers and torchao versions. Every phase runs in its own subprocess; a failing phase leaves its rows
empty with the error, the others still run. Phases that would pass --budget-s are skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEPS = 30
GUIDANCE = 7.5
KIND_FLAGS = {"inductor": (), "aot": ("--aot",), "precompile": ("--precompile",)}  # cache kinds: worker flags
ROWS = {"inductor": ("same", "same-1thread", "copy"), "aot": ("same", "copy"), "precompile": ("same", "copy")}
WHERES = {"same": "cache folder", "copy": "copied cache folder", "same-1thread": "cache folder, compile threads 1"}
PARTS = {"all": ("eager", "start", "fp8"), "eager": ("eager",), "start": ("start",), "fp8": ("fp8",)}
CASES = {  # name: (architecture, side, images per call)
    "sd15": ("sd15", 512, 1), "sd15x4": ("sd15", 512, 4), "sdxl": ("sdxl", 1024, 1),
    "tiny": ("tiny", 64, 1), "tinyx2": ("tiny", 64, 2), "tiny-xl": ("tiny-xl", 128, 1),
}


# ---------------------------------------------------------------------------------------------- worker side


def _bench():
    """bench_inference.py as a module (random real-size bases, adapters, clocks, diffusers calls)."""
    sys.path.insert(0, str(HERE))
    import bench_inference

    return bench_inference


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _pipeline(arch: str, device, dtype, seed: int = 0):
    """(pipeline with one 3-channel adapter, condition image) at the case's size, random weights, seeded."""
    import torch

    from t2iadapter.pipeline import AdapterPipeline

    b = _bench()
    torch.manual_seed(seed)
    base = b.build_base(arch, device, dtype)
    adapters, _ = b.build_adapters(base, device, dtype, n=1)
    return AdapterPipeline(base, {"a": adapters[0]}), base


def _smoke_compile(args) -> None:
    """--smoke: dynamo traces, no code generation (inductor on a CPU takes minutes); the cache logic still runs."""
    if args.smoke:
        from t2iadapter.generation import fast

        fast.compile_kwargs = lambda backend, mode, cudagraphs: {"backend": "eager"}


def _built(args):
    """The case's pipeline (fp16 on a GPU, fp32 on the CPU), not yet optimized: (pipe, device, side, images, build s)."""
    import torch

    _smoke_compile(args)
    arch, side, images = CASES[args.case]
    device = torch.device(args.device)
    t0 = time.perf_counter()
    pipe, _ = _pipeline(arch, device, torch.float16 if device.type == "cuda" else torch.float32)
    return pipe, device, side, images, time.perf_counter() - t0


def _image(pipe, side: int, images: int, steps: int, marks: list | None = None):
    """One text-to-image call; `marks` gets a device event (GPU) or a time (CPU) at the end of every step."""
    import torch

    from PIL import Image

    device = pipe.device

    def mark(*_a):
        if marks is None:
            return
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append(ev)
        else:
            marks.append(time.perf_counter())

    cond = Image.new("RGB", (side, side), (128, 64, 200))
    return pipe("a large red star left of a small blue circle", [cond], steps=steps, guidance_scale=GUIDANCE,
                size=(side, side), seed=1, num_images=images, output_type="pt", progress=False, callback=mark)


def _ms_per_step(marks: list, device) -> float:
    if len(marks) < 2:
        return float("nan")
    if device.type == "cuda":
        return marks[0].elapsed_time(marks[-1]) / (len(marks) - 1)
    return (marks[-1] - marks[0]) * 1e3 / (len(marks) - 1)


def work_compile(args) -> dict[str, Any]:
    """Cold: build, optimize into --cache, one short call per batch (compiles and saves)."""
    pipe, device, side, _, built = _built(args)
    pipe.optimize(precision=args.precision, cache_dir=args.cache, precompile=args.precompile, aot=args.aot)
    for n in args.batches:
        _sync(device)
        _image(pipe, side, n, 2)
        _sync(device)
    events = [dict(key=e.shape.name, status=e.status, seconds=e.seconds, saved=e.saved) for e in pipe.compile_cache.events]
    return {"build_s": built, "events": events, "compile_s": sum(e["seconds"] for e in events)}


def work_first(args) -> dict[str, Any]:
    """Warm: a new process with the cache folder; the first 30-step image, then (--steady) ms/step of 3 more."""
    pipe, device, side, images, built = _built(args)
    t1 = time.perf_counter()
    pipe.optimize(precision=args.precision, cache_dir=args.cache, precompile=args.precompile, aot=args.aot)
    optimize_s = time.perf_counter() - t1
    _sync(device)
    t2 = time.perf_counter()
    fast_images = _image(pipe, side, images, args.steps).images
    _sync(device)
    first = time.perf_counter() - t2
    from t2iadapter.generation import compile_cache as cc

    timers = cc.compile_timers()
    out = {"build_s": built, "optimize_s": optimize_s, "first_image_s": first,
           "status": [e.status for e in pipe.compile_cache.events],
           "process_to_first_image_s": time.time() - args.started,
           # where the first image's seconds went: dynamo's tracing (all of it; `backend` its AOTAutograd + inductor
           # part, cache loads included), one tracing per compiled frame (UNet, VAE decoder, adapter), torch's
           # other timers; the rest is running the 30 steps and recording the CUDA graphs
           "tracing_s": timers.get(cc.TRACING, 0.0), "backend_s": timers.get(cc.BACKEND, 0.0),
           "frames_s": _frame_seconds(), "timers": cc.timer_delta({}, timers, floor=0.05),
           "compile_threads": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "default")}
    if args.steady:
        steps, walls = [], []
        for _ in range(3):
            marks: list = []
            _sync(device)
            t = time.perf_counter()
            _image(pipe, side, images, args.steps, marks)
            _sync(device)
            walls.append(time.perf_counter() - t)
            steps.append(_ms_per_step(marks, device))
        out.update(ms_step=statistics.median(steps), ms_image=statistics.median(walls) * 1e3 / images)
    out["max_px_diff_vs_eager"] = _diff_vs_eager(pipe, side, images, args.steps, fast_images)
    return out


def _diff_vs_eager(pipe, side: int, images: int, steps: int, fast_images: list) -> float:
    """The same call with every module's own (eager) forward, after the timings: the largest pixel difference (0-255)
    from what the compiled or AOTInductor modules made (a guard on their numbers, not only their speed)."""
    import torch

    from t2iadapter.generation import fast

    for module in [pipe.base.unet, pipe.base.vae.decoder, *pipe.adapters.values()]:
        if "forward" in vars(module):
            module.forward = fast.eager_forward(module)
    eager = _image(pipe, side, images, steps).images
    return max(float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max()) * 255
               for a, b in zip(fast_images, eager))


def _frame_seconds() -> list[float]:
    """Seconds of each frame dynamo compiled in this process, in order (torch's `_compile.compile_inner` timer)."""
    from torch._dynamo.utils import compilation_time_metrics

    return [round(s, 3) for s in compilation_time_metrics.get("_compile.compile_inner", [])]


def _capture_unet_inputs(unet) -> tuple[list, Any]:
    """A forward pre-hook recording (args, kwargs) of every UNet call (cloned: CUDA graphs reuse their buffers)."""
    import torch

    seen: list = []

    def clone(x):
        if isinstance(x, torch.Tensor):
            return x.detach().clone()
        if isinstance(x, (list, tuple)):
            return type(x)(clone(v) for v in x)
        if isinstance(x, dict):
            return {k: clone(v) for k, v in x.items()}
        return x

    def hook(_module, args, kwargs):
        seen.append((clone(args), clone(kwargs)))

    return seen, unet.register_forward_pre_hook(hook, with_kwargs=True)


def work_fp8(args) -> dict[str, Any]:
    """fp8 against bf16 on one case: ms/step of each (compiled, from the caches), and the UNet's per-step error."""
    import torch

    from t2iadapter.generation import fp8

    _smoke_compile(args)
    arch, side, images = CASES[args.case]
    device = torch.device(args.device)
    try:
        fp8.check_supported(device)
        fp8.quantization_config()
    except Exception as exc:  # noqa: BLE001 - the refusal is the result on a CPU or an older GPU
        return {"refused": str(exc)}
    p16, _ = _pipeline(arch, device, torch.bfloat16)
    p8, _ = _pipeline(arch, device, torch.bfloat16)  # the same seeded weights
    p16.optimize(precision="bf16", cache_dir=args.cache, precompile=args.precompile)
    t0 = time.perf_counter()
    p8.optimize(precision="fp8", cache_dir=args.cache, precompile=args.precompile)
    quantize_s = time.perf_counter() - t0
    firsts = {}
    for name, pipe in (("bf16", p16), ("fp8", p8)):
        _sync(device)
        t = time.perf_counter()
        _image(pipe, side, images, 2)
        _sync(device)
        firsts[name] = time.perf_counter() - t
    times: dict[str, list[float]] = {"bf16": [], "fp8": []}
    for _ in range(3):
        for name, pipe in (("bf16", p16), ("fp8", p8)):
            marks: list = []
            _image(pipe, side, images, args.steps, marks)
            _sync(device)
            times[name].append(_ms_per_step(marks, device))
    # per-step error: bf16's UNet inputs along its own trajectory, given to both compiled UNets
    seen, handle = _capture_unet_inputs(p16.base.unet)
    _image(p16, side, images, args.steps)
    handle.remove()
    errors = []
    with torch.no_grad():
        for call_args, call_kwargs in seen:
            outs = []
            for pipe in (p16, p8):
                if device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                kwargs = {k: (list(v) if isinstance(v, list) else v) for k, v in call_kwargs.items()}
                outs.append(pipe.base.unet(*call_args, **kwargs)[0].float().clone())
            errors.append(float((outs[1] - outs[0]).norm() / outs[0].norm()))
    return {"ms_step_bf16": statistics.median(times["bf16"]), "ms_step_fp8": statistics.median(times["fp8"]),
            "first_call_s": firsts, "quantize_s": quantize_s, "rel_err_per_step": errors,
            "fp8_layers": sum(fp8.is_fp8(m.weight) for m in p8.base.unet.modules() if isinstance(m, torch.nn.Linear))}


def work_eager(args) -> dict[str, Any]:
    """ours-eager against diffusers' adapter pipeline, same components, fp16, interleaved, no profiler before."""
    import torch

    b = _bench()
    arch, side, images = CASES[args.case]
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    case = b.Case(args.case, arch, side, images, 0)
    base = b.build_base(arch, device, dtype)
    adapters, ref = b.build_adapters(base, device, dtype, n=1)
    conds = b.conditions(side, 1)
    from t2iadapter.pipeline import AdapterPipeline

    ours = AdapterPipeline(base, {"a": adapters[0]})
    theirs = b.diffusers_pipeline("adapter", base, adapter=ref)
    rows = {"diffusers": lambda c: b.diffusers_call(theirs, case, args.steps, conds[0], 1234, c),
            "ours-eager": lambda c: b.ours_call(ours, case, args.steps, conds, 1234, c)}
    times: dict[str, list[float]] = {n: [] for n in rows}
    images_out = {}
    for repeat in range(4):  # the first round is the warm-up
        for name, run in rows.items():
            clock = b.Clock(device)
            images_out[name] = run(clock)
            _sync(device)
            if repeat:
                times[name].append(clock.ms_per_step())
    import numpy as np

    diff = float(np.abs(images_out["ours-eager"].astype(np.float64) - images_out["diffusers"]).max() * 255)
    ms = {n: statistics.median(t) for n, t in times.items()}
    return {"ms_step": ms, "speedup": ms["diffusers"] / ms["ours-eager"], "max_px_diff": diff}


def work_iou(args) -> dict[str, Any]:
    """The demo model and its sketch adapter on held-out scenes: structure IoU in bf16 and in fp8 (eager both)."""
    import numpy as np
    import torch

    from t2iadapter.demo import world
    from t2iadapter.evaluation.metrics import structure_iou
    from t2iadapter.pipeline import AdapterPipeline

    device = torch.device(args.device)
    scenes = [world.generate(s) for s in range(world.EVAL_SEEDS.start, world.EVAL_SEEDS.start + args.scenes)]
    out: dict[str, Any] = {}
    for precision in ("bf16", "fp8"):
        pipe = AdapterPipeline.from_pretrained("demo", {"sketch": "demo/sketch"}, device=device, dtype=torch.bfloat16)
        try:
            pipe.optimize(precision=precision, compile=False)
        except Exception as exc:  # noqa: BLE001 - fp8 refused here (CPU, older GPU): say so
            out[precision] = {"refused": str(exc)}
            continue
        ious = []
        for sc in scenes:
            image = pipe(sc.caption, {"sketch": sc.sketch}, steps=args.steps, guidance_scale=5.0, seed=sc.seed,
                         size=(256, 256), progress=False).image
            ious.append(structure_iou(np.asarray(image.convert("RGB")), sc))
        out[precision] = {"iou": float(np.mean(ious)), "per_scene": ious}
    if "iou" in out.get("bf16", {}) and "iou" in out.get("fp8", {}):
        out["difference"] = out["fp8"]["iou"] - out["bf16"]["iou"]
    return out


WORKERS = {"compile": work_compile, "first": work_first, "fp8": work_fp8, "eager": work_eager, "iou": work_iou}


def worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("job", choices=list(WORKERS))
    p.add_argument("--case", default="sd15")
    p.add_argument("--device", default="cuda")
    p.add_argument("--cache", default=None)
    p.add_argument("--precision", default=None)
    p.add_argument("--precompile", action="store_true")
    p.add_argument("--aot", action="store_true")
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--steady", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--started", type=float, default=time.time())
    p.add_argument("--result", required=True)
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("t2iadapter.generation.compile_cache").setLevel(logging.INFO)
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torch

    if args.device == "cpu":
        torch.set_num_threads(1)
    result = WORKERS[args.job](args)
    Path(args.result).write_text(json.dumps(result, indent=1, default=str))


# ---------------------------------------------------------------------------------------------- orchestrator


class Run:
    def __init__(self, args) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="bench_fast_v2-"))
        self.t0 = time.perf_counter()
        self.results: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {text}", flush=True)

    def spawn(self, name: str, job: str, *extra: str, fresh_torch_caches: bool = True, share: int = 1,
              env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        """A worker subprocess with its own empty torch caches (as a fresh machine has); `share`: processes running
        at once (each gets that part of the CPU's compile threads); `env_extra`: more environment."""
        result = self.work / f"{name}.json"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
        env.update(env_extra or {})
        if share > 1:
            env["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(1, (os.cpu_count() or 2) // share))
        if fresh_torch_caches:
            env["TORCHINDUCTOR_CACHE_DIR"] = str(self.work / f"inductor-{name}")
            env["TRITON_CACHE_DIR"] = str(self.work / f"triton-{name}")
        env.pop("T2IADAPTER_PRECOMPILE", None)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", job, "--device", self.args.device,
               "--steps", str(self.args.steps), "--started", repr(time.time()), "--result", str(result), *extra]
        if self.args.smoke:
            cmd.append("--smoke")
        log = open(self.work / f"{name}.log", "w")
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), result

    def wait(self, name: str, proc: subprocess.Popen, result: Path, started: float) -> dict[str, Any]:
        try:
            proc.wait(timeout=max(30.0, self.left() + 60))
        except subprocess.TimeoutExpired:
            proc.kill()
        wall = time.perf_counter() - started
        if proc.returncode == 0 and result.exists():
            data = json.loads(result.read_text())
        else:
            tail = (self.work / f"{name}.log").read_text()[-1500:]
            data = {"error": f"exit {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else '?'}"}
            print(tail, flush=True)
        data["process_wall_s"] = wall
        self.results[name] = data
        self.say(f"{name}: {json.dumps({k: v for k, v in data.items() if k != 'rel_err_per_step'}, default=str)[:300]}")
        self.write()
        return data

    def run(self, name: str, job: str, *extra: str, env_extra: dict[str, str] | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        proc, result = self.spawn(name, job, *extra, env_extra=env_extra)
        return self.wait(name, proc, result, started)

    def parallel(self, jobs: list[tuple[str, str, tuple[str, ...]]]) -> None:
        """At most --parallel workers at once (GPU memory: an SDXL worker holds ~15 GB while it compiles)."""
        width = max(1, min(self.args.parallel, len(jobs)))
        queue, running = list(jobs), []
        while queue or running:
            while queue and len(running) < width:
                name, job, extra = queue.pop(0)
                running.append((name, time.perf_counter(), *self.spawn(name, job, *extra, share=width)))
            time.sleep(0.5)
            if self.left() < -120:  # far past the budget: stop what still compiles (its rows say so)
                for item in running:
                    item[2].kill()
            for item in [r for r in running if r[2].poll() is not None]:
                running.remove(item)
                name, started, proc, result = item
                self.wait(name, proc, result, started)

    def write(self) -> None:
        data = {"meta": self.meta, "results": self.results}
        (self.out / "bench_fast_v2.json").write_text(json.dumps(data, indent=1, default=str))
        (self.out / "bench_fast_v2.md").write_text(markdown(self.meta, self.results))


def versions(device: str) -> dict[str, Any]:
    import torch

    meta: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0], "device": device}
    if device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name(0)
        meta["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        meta["triton"] = getattr(__import__("triton"), "__version__", "?") if _has("triton") else None
    else:
        import platform

        meta["gpu"] = f"CPU ({platform.machine()})"
    for name in ("diffusers", "torchao"):
        try:
            meta[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - printed, the fp8 rows then say why they are empty
            meta[name] = f"not importable ({type(exc).__name__}: {exc})"
    return meta


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _fmt(v: Any, f: str = ".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and v != v) else format(v, f)


def markdown(meta: dict[str, Any], r: dict[str, Any]) -> str:
    """The issue's table: one row per measure, the target, the number, met or not."""
    lines = [f"Machine: {meta.get('gpu')} (compute capability {meta.get('capability', '–')}) · torch {meta.get('torch')} · "
             f"diffusers {meta.get('diffusers')} · torchao {meta.get('torchao')} · {meta.get('steps')} steps, CFG {GUIDANCE}",
             "", "| measure | case | value | target | met |", "|---|---|---|---|---|"]

    def row(measure, case, value, target, ok):
        lines.append(f"| {measure} | {case} | {value} | {target} | {'–' if ok is None else ('yes' if ok else 'no')} |")

    small, large = ("tiny", "tiny-xl") if meta.get("smoke") else ("sd15", "sdxl")
    for case, limit in ((small, 3.0), (large, 5.0)):
        for kind in KIND_FLAGS:
            cold = r.get(f"cold-{case}-{kind}", {})
            if cold:
                row(f"cold compile into a fresh cache ({kind})", case, f"{_fmt(cold.get('compile_s'), '.1f')} s",
                    "–", None)
            for where, label in WHERES.items():
                w = r.get(f"first-{case}-{kind}-{where}", {})
                if not w:
                    continue
                value = w.get("first_image_s")
                status = ",".join(w.get("status", [])) or w.get("error", "?")
                split = "" if "tracing_s" not in w else (f"; of it tracing {_fmt(w['tracing_s'], '.1f')} s, backend "
                                                         f"{_fmt(w.get('backend_s'), '.1f')} s")
                split += f"; then {_fmt(w['ms_step'])} ms/step" if "ms_step" in w else ""
                split += f"; max px diff vs eager {_fmt(w['max_px_diff_vs_eager'], '.1f')}" if "max_px_diff_vs_eager" in w else ""
                row(f"first image, new process, {label} ({kind}; {status})", case,
                    f"{_fmt(value)} s (+{_fmt(w.get('build_s'), '.1f')} s build, process "
                    f"{_fmt(w.get('process_to_first_image_s'), '.1f')} s{split})",
                    f"≤ {limit:g} s", None if value is None else value <= limit)
    for case, target, bf16_issue in ((large, 22.0, 30.5), (small + ("x2" if meta.get("smoke") else "x4"), 13.0, 18.7)):
        f8 = r.get(f"fp8-{case}", {})
        if "refused" in f8 or "error" in f8:
            row("ms/step fp8", case, f"refused: {f8.get('refused') or f8.get('error')}", f"≤ {target:g}", None)
            continue
        if f8:
            errs = f8.get("rel_err_per_step") or []
            row("ms/step fp8 (bf16 same run)", case, f"{_fmt(f8.get('ms_step_fp8'))} ({_fmt(f8.get('ms_step_bf16'))})",
                f"≤ {target:g} (bf16 {bf16_issue})", f8.get("ms_step_fp8", 1e9) <= target)
            if errs:
                row("UNet rel. error fp8 vs bf16 per step (mean / max; steps 1, 10, 20, last)", case,
                    f"{statistics.mean(errs):.2e} / {max(errs):.2e}; "
                    + ", ".join(f"{errs[i]:.1e}" for i in (0, 9, 19, len(errs) - 1) if i < len(errs)), "report", None)
    e = r.get(f"eager-{small}", {})
    if e:
        ms = e.get("ms_step", {})
        row("ours-eager / diffusers eager ms/step (× diffusers)", small,
            f"{_fmt(ms.get('ours-eager'))} / {_fmt(ms.get('diffusers'))} ({_fmt(e.get('speedup'))}×; max px diff "
            f"{_fmt(e.get('max_px_diff'), '.1f')})", "≥ 1.0×", None if e.get("speedup") is None else e["speedup"] >= 1.0)
    iou = r.get("iou-demo", {})
    if iou:
        b16, f8 = iou.get("bf16", {}), iou.get("fp8", {})
        value = f"bf16 {_fmt(b16.get('iou'), '.3f')}, fp8 " + (_fmt(f8.get("iou"), ".3f") if "iou" in f8 else
                                                              f"refused: {f8.get('refused', iou.get('error'))}")
        diff = iou.get("difference")
        row(f"demo eval IoU ({meta.get('scenes')} scenes)", "demo", value, "fp8 − bf16 within ±0.01",
            None if diff is None else abs(diff) <= 0.01)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker_main(argv[1:])
        return {}
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny bases, 2 steps, no code generation")
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {STEPS}; --smoke 2)")
    p.add_argument("--scenes", type=int, default=None, help="demo scenes for the IoU (default 8; --smoke 1)")
    p.add_argument("--kinds", default="inductor,aot,precompile",
                   help="cache kinds to time, in this order (inductor, aot, precompile)")
    p.add_argument("--large", action=argparse.BooleanOptionalAction, default=None,
                   help="the large case too (SDXL; --smoke: tiny-xl); default: on, off with --smoke")
    p.add_argument("--part", choices=list(PARTS), default="all",
                   help="what to measure: all (default), or one device call's share: eager (ours-eager vs diffusers, "
                        "demo IoU bf16 vs fp8), start (cold compiles, first images), fp8 (fp8 vs bf16 ms/step)")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip later phases that would pass this")
    p.add_argument("--parallel", type=int, default=4, help="cold-compile processes at once (default 4)")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = p.parse_args(argv)
    import logging

    for name in ("torchao", "torch.utils._pytree"):  # torchao's import notices (diffusers imports it)
        logging.getLogger(name).setLevel(logging.ERROR)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    args.steps = args.steps or (2 if args.smoke else STEPS)
    args.scenes = args.scenes or (1 if args.smoke else 8)
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KIND_FLAGS):
        p.error(f"--kinds: a comma-separated list of {', '.join(KIND_FLAGS)}")
    if "fp8" in PARTS[args.part] and "inductor" not in kinds:
        kinds.append("inductor")  # the fp8 rows compare with bf16's compiled graphs
    run = Run(args)
    run.meta = {**versions(args.device), "steps": args.steps, "scenes": args.scenes, "smoke": args.smoke,
                "argv": argv}
    run.say(" · ".join(f"{k} {v}" for k, v in run.meta.items() if k != "argv"))
    small, large = ("tiny", "tiny-xl") if args.smoke else ("sd15", "sdxl")
    multi = "tinyx2" if args.smoke else "sd15x4"
    cases = (small, large) if (args.large if args.large is not None else not args.smoke) else (small,)
    caches = {(case, kind): run.work / f"cache-{case}-{kind}" for case in cases for kind in kinds}
    fp8_cache = run.work / "cache-fp8"
    parts = PARTS[args.part]
    # 1. ours-eager against diffusers, and the demo IoU in both precisions: first, while nothing else runs (a
    #    launch-bound eager step is timed on a quiet CPU)
    if "eager" in parts:
        run.run(f"eager-{small}", "eager", "--case", small)
        run.run("iou-demo", "iou", "--scenes", str(args.scenes), "--steps", "25" if not args.smoke else "2")
    # 2. cold compiles, in parallel (CPU-bound; their times are reported, not targeted); fp8's own cache with them
    fp8_cases = [c for c in (large, multi) if c != large or large in cases] if "fp8" in parts else []
    jobs = []
    for (case, kind), folder in caches.items():
        if "start" in parts:  # (sd15's batch 4 only where the fp8 rows need bf16's graphs of it)
            batches = "1,4" if case == small and kind == "inductor" and fp8_cases else "1"
        elif kind == "inductor" and (case == large or multi in fp8_cases):  # only bf16's side of the fp8 rows
            batches = "1" if case == large else str(CASES[multi][2])
        else:
            continue
        jobs.append((f"cold-{case}-{kind}", "compile", ("--case", case, "--cache", str(folder), "--batches", batches,
                                                        *KIND_FLAGS[kind])))
    fp8_ok = run.meta["torchao"][:1].isdigit() and args.device != "cpu"
    for case in fp8_cases if fp8_ok else ():  # (else refused below, with the reason)
        jobs.append((f"cold-fp8-{case}", "compile", ("--case", case, "--cache", str(fp8_cache), "--precision", "fp8",
                                                     "--batches", str(CASES[case][2]))))
    if jobs:
        run.say(f"cold compiles ({len(jobs)} processes, {args.parallel} at a time)")
        run.parallel(jobs)

    # 3. first image in new processes: the cache folder, then a copy of it elsewhere (as on another machine), and
    #    (inductor) the folder again with inductor's compile worker pool off (is its start-up in the first image?)
    def first(case: str, kind: str) -> None:
        folder = caches[(case, kind)]
        for where in [w for w in ROWS[kind] if w != "same-1thread" or case == small]:
            if run.left() < 30:
                run.say(f"first-{case}-{kind}-{where}: skipped (budget)")
                continue
            target = folder
            if where == "copy":
                target = run.work / f"copied-{case}-{kind}"
                if folder.is_dir():  # (absent when nothing was saved: --smoke's backend makes no artefacts)
                    shutil.copytree(folder, target, dirs_exist_ok=True)
            steady = where == "same" and kind != "precompile"  # (precompile runs inductor's graphs: same speed)
            run.run(f"first-{case}-{kind}-{where}", "first", "--case", case, "--cache", str(target),
                    *KIND_FLAGS[kind], *(("--steady",) if steady else ()),
                    env_extra={"TORCHINDUCTOR_COMPILE_THREADS": "1"} if where == "same-1thread" else None)

    later = [k for k in kinds if k != "inductor"] if "fp8" in parts else []  # (with fp8: inductor's rows first)
    if "start" in parts:
        for kind in (k for k in kinds if k not in later):
            for case in cases:
                first(case, kind)
    # 4. fp8 against bf16 (both from caches: bf16's from step 2, fp8's own)
    for case in fp8_cases:
        if run.left() < 40:
            run.say(f"fp8-{case}: skipped (budget)")
            continue
        bf16_cache = caches[(small if case == multi else large, "inductor")]
        if bf16_cache.is_dir():
            shutil.copytree(bf16_cache, fp8_cache, dirs_exist_ok=True)
        run.run(f"fp8-{case}", "fp8", "--case", case, "--cache", str(fp8_cache))
    if "start" in parts:
        for kind in later:
            for case in cases:
                first(case, kind)
    run.meta["total_s"] = time.perf_counter() - run.t0
    run.write()
    logs = run.out / "bench_fast_v2_logs"
    logs.mkdir(exist_ok=True)
    for log in run.work.glob("*.log"):
        shutil.copy(log, logs / log.name)
    shutil.rmtree(run.work, ignore_errors=True)  # the caches (GBs for SDXL) and torch's own
    print()
    print(markdown(run.meta, run.results), flush=True)
    return {"meta": run.meta, "results": run.results}


if __name__ == "__main__":
    main()
