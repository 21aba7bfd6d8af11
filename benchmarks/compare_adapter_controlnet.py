"""Adapter vs ControlNet on the demo base (issue 16): one markdown table, the machine(s) named.

    # 1. on the GPU (scripts/compare_gpu.sh wraps both calls): the compare phase, then this script there
    python scripts/train_demo_adapters.py --base BASE --out RUN --controlnet-sketch --phases compare --compare-minutes 3.5
    python benchmarks/compare_adapter_controlnet.py --base BASE --adapter RUN/adapters/sketch.safetensors \
        --controlnet RUN/controlnets/controlnet-sketch.safetensors --train-log RUN/adapters_log.json \
        --scenes 200 --device cuda --json $OUT/compare_gpu.json
    # 2. on the 2-core CPU, with the two shipped (defaults: demo, demo/sketch, demo/controlnet-sketch):
    python benchmarks/compare_adapter_controlnet.py --device cpu --threads 2 --scenes 0 \
        --merge benchmarks/results/compare_gpu.json --json benchmarks/results/compare.json --out benchmarks/results/compare.md
    python benchmarks/compare_adapter_controlnet.py --smoke        # tiny models, CPU, seconds (a test runs it)

Columns: text only (the reference), the sketch adapter (`sketch`), the sketch ControlNet (`controlnet-sketch`).
Rows:
  quality      structure IoU, edge F1 (2 px), spurious foreground and colour accuracy, means over N held-out
               world scenes (seeds from world.EVAL_SEEDS), exactly as `t2iadapter eval` scores them (its
               `evaluate`, or the JSON of `t2iadapter eval --json` / scripts/eval_parallel.sh via --eval-json).
  parameters   of the adapter and of the ControlNet (the base UNet's for scale under the table).
  ms/image     one row per machine: the median wall time of one 256² image (25 DDIM steps, guidance 5, the
               first held-out scene, `--repeats` calls after `--warmup`, the three settings interleaved so
               machine noise spreads evenly), shown as extra ms over text only. CPU: fp32, eager, `--threads`
               torch threads. CUDA: fast mode (`optimize()`: bf16, compiled UNet with CUDA graphs; the
               ControlNet runs eagerly in bf16, as the pipeline runs it).
  training     samples/s, samples seen and peak GPU memory of each run of the compare phase (each alone on the
               GPU for the same minutes), from the trainers' own `train_summary.json` as gathered in the
               script's log (--train-log RUN/adapters_log.json).
`--merge FILE` adds an earlier run's results (another machine's ms/image row; quality, parameters and training
where this run has none). `--json` keeps this run's results for such a merge.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

try:
    import t2iadapter  # noqa: F401 - installed (pip install -e .)
except ImportError:  # a bare checkout, e.g. on the GPU machine
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

ADAPTER, CONTROLNET, TEXT = "sketch", "controlnet-sketch", "text only"
SETTINGS = (TEXT, ADAPTER, CONTROLNET)
QUALITY = {  # summary key → row label (what `t2iadapter eval` reports)
    "structure_iou": "structure IoU",
    "edge_f1": "edge F1 (2 px)",
    "spurious_foreground": "spurious foreground",
    "colour_accuracy": "colour accuracy",
}


def machine_label(device: torch.device, threads: int | None) -> str:
    """The machine and mode a timing row was measured on, e.g. `NVIDIA H200, fast mode (optimize())`."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, fast mode (optimize())"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = threads or torch.get_num_threads()
    return f"{os.cpu_count()}-core CPU ({model}), {n} thread{'s' if n > 1 else ''}, eager fp32"


def settings():
    from t2iadapter.evaluation.controllability import Setting

    return [Setting(TEXT), Setting(ADAPTER, (ADAPTER,)), Setting(CONTROLNET, controlnets=(CONTROLNET,))]


def quality_from_eval(pipe, scenes, steps: int, guidance: float) -> dict[str, Any]:
    """`t2iadapter eval`'s scores of the three settings on `scenes`."""
    from t2iadapter.evaluation.controllability import evaluate

    rows, _ = evaluate(pipe, scenes, settings(), steps=steps, guidance_scale=guidance, progress=False)
    return {"scenes": len(scenes), "seeds": [scenes[0].seed, scenes[-1].seed], "source": "evaluate() in this run",
            "rows": {r.setting.name: r.summary() for r in rows}}


def quality_from_json(path: str) -> dict[str, Any]:
    """The three settings' summaries from `t2iadapter eval --json` or scripts/eval_parallel.sh's eval.json."""
    rows = {r["setting"]: r for r in json.loads(Path(path).read_text())}
    missing = [s for s in SETTINGS if s not in rows]
    if missing:
        raise SystemExit(f"{path} has no setting(s) {missing}; run t2iadapter eval with --adapter sketch=... "
                         f"--controlnet controlnet-sketch=...")
    return {"scenes": rows[TEXT]["scenes"], "seeds": None, "source": str(path), "rows": {s: rows[s] for s in SETTINGS}}


def time_settings(pipe, scene, steps: int, guidance: float, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms per image of each setting on one scene; the settings take turns, call after call."""
    conditions = {TEXT: {}, ADAPTER: {ADAPTER: scene.sketch}, CONTROLNET: {CONTROLNET: scene.sketch}}
    cuda = pipe.device.type == "cuda"
    times: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for i in range(warmup + repeats):
        for name in SETTINGS:
            if cuda:
                torch.cuda.synchronize(pipe.device)
            start = time.perf_counter()
            pipe(scene.caption, conditions[name], steps=steps, guidance_scale=guidance, seed=scene.seed,
                 size=(scene.size, scene.size), progress=False)
            if cuda:
                torch.cuda.synchronize(pipe.device)
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def training_from_log(path: str) -> dict[str, Any]:
    """The compare block of scripts/train_demo_adapters.py's log (each run's train_summary.json)."""
    log = json.loads(Path(path).read_text())
    block = log.get("compare")
    if not block or not all(block["runs"].get(n) for n in (ADAPTER, CONTROLNET)):
        raise SystemExit(f"{path} has no compare phase; run scripts/train_demo_adapters.py with --controlnet-sketch")
    return block


def merge(results: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any]:
    """This run's results plus other runs': every machine's timing; quality/parameters/training where missing."""
    out = dict(results, timing=dict(results.get("timing") or {}))
    for other in others:
        for label, row in (other.get("timing") or {}).items():
            out["timing"].setdefault(label, row)
        for key in ("quality", "parameters", "training"):
            if not out.get(key) and other.get(key):
                out[key] = other[key]
    return out


def _f(value: Any, pct: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if pct else f"{value:.3f}"


def _millions(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e6:.2f}M ({n:,})"


def format_table(results: dict[str, Any]) -> str:
    """The comparison as markdown: a title naming the setup, one column per setting, one row per measure."""
    q, params, timing, train = (results.get(k) for k in ("quality", "parameters", "timing", "training"))
    setup = results["setup"]
    lines = [f"Adapter vs ControlNet on {setup['base']} — {setup['size']}², {setup['steps']} steps, "
             f"guidance {setup['guidance']:g}", "",
             "| | text only | sketch adapter | sketch ControlNet |", "|---|---|---|---|"]
    if q:
        for key, label in QUALITY.items():
            pct = key in ("spurious_foreground", "colour_accuracy")
            cells = [_f(q["rows"][s].get(key), pct) for s in SETTINGS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if params:
        lines.append(f"| parameters | – | {_millions(params.get(ADAPTER))} | {_millions(params.get(CONTROLNET))} |")
    for label, row in (timing or {}).items():
        base = row[TEXT]
        cells = [f"{base:.0f}"] + [f"+{row[s] - base:.0f}" if row[s] >= base else f"−{base - row[s]:.0f}"
                                   for s in (ADAPTER, CONTROLNET)]
        lines.append(f"| ms/image, {label} (text only; extra) | " + " | ".join(cells) + " |")
    if train:
        runs = train["runs"]
        minutes = f"{train['minutes']:g} min" if train.get("minutes") else "the same steps (smoke)"
        device = runs[ADAPTER].get("device", "?")
        def cell(name: str, key: str, fmt: str) -> str:
            v = runs[name].get(key)
            return "–" if v is None else format(v, fmt)
        lines.append(f"| training samples/s ({device}, each alone for {minutes}) | – | "
                     f"{cell(ADAPTER, 'samples_per_second', '.1f')} | {cell(CONTROLNET, 'samples_per_second', '.1f')} |")
        def seen(name: str) -> str:  # the budget is checked at log steps, so the wall time may overshoot a little
            r = runs[name]
            return "–" if r.get("samples") is None else f"{r['samples']:,} in {r.get('loop_seconds') or 0:.0f} s"
        lines.append(f"| samples seen (batch {runs[ADAPTER].get('batch_size')}) | – | {seen(ADAPTER)} | {seen(CONTROLNET)} |")
        lines.append(f"| training peak GPU memory, GiB | – | {cell(ADAPTER, 'peak_memory_gib', '.2f')} | "
                     f"{cell(CONTROLNET, 'peak_memory_gib', '.2f')} |")
    notes = []
    if params and params.get("unet"):
        notes.append(f"base UNet: {params['unet'] / 1e6:.2f}M parameters")
    if q:
        seeds = f", seeds {q['seeds'][0]}–{q['seeds'][1]}" if q.get("seeds") else ""
        notes.append(f"quality: means over {q['scenes']} held-out scenes{seeds} ({q['source']})")
    if notes:
        lines += ["", "; ".join(notes) + "."]
    return "\n".join(lines)


def smoke_models(workdir: Path) -> tuple[str, Path, Path, Path]:
    """A tiny base, and a sketch adapter and ControlNet trained on it for 2 steps each by the real trainer,
    with the compare block their summaries make: (base, adapter file, ControlNet file, log file)."""
    from t2iadapter.bases import load_base
    from t2iadapter.train.config import load_config
    from t2iadapter.train.loop import Trainer
    from t2iadapter.train.throughput import SUMMARY_FILE

    base = load_base("tiny")
    runs = {}
    for name, kind in ((ADAPTER, "full"), (CONTROLNET, "controlnet")):
        out = workdir / name
        cfg = load_config(None, [f"adapter.kind={kind}", "adapter.condition=sketch", "adapter.in_channels=1",
                                 "data.resolution=64", "data.num_samples=4", "recipe.batch_size=2", "recipe.max_steps=2",
                                 "recipe.lr=1e-3", "checkpoint.every=0", "log_every=1", f"output_dir={out}"])
        Trainer(cfg, base=base).run()
        runs[name] = json.loads((out / SUMMARY_FILE).read_text())
    log = workdir / "adapters_log.json"
    log.write_text(json.dumps({"compare": {"method": "smoke", "minutes": None, "runs": runs}}))
    return "tiny", workdir / ADAPTER / "adapter.safetensors", workdir / CONTROLNET / "controlnet.safetensors", log


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """This run's results: setup, parameters, quality, this machine's timing row and the training block."""
    from t2iadapter.demo import world
    from t2iadapter.generation.pipeline import AdapterPipeline, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device, _ = resolve_device("cpu" if args.smoke else args.device, None)
    size, steps, scenes_n, repeats, warmup = 256, args.steps, args.scenes, args.repeats, args.warmup
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter, controlnet, train_log = args.base, args.adapter, args.controlnet, args.train_log
        if args.smoke:
            base, adapter, controlnet, train_log = smoke_models(Path(tmp))
            size, steps, scenes_n, repeats, warmup = 64, 2, min(scenes_n, 1), min(repeats, 1), 0
        pipe = AdapterPipeline.from_pretrained(base, {ADAPTER: adapter}, controlnets={CONTROLNET: controlnet},
                                               device=device, dtype=torch.float32)
        first = args.first_seed if args.first_seed is not None else world.EVAL_SEEDS.start
        results: dict[str, Any] = {
            "setup": {"base": "the tiny test base (smoke)" if args.smoke else str(base), "adapter": str(adapter),
                      "controlnet": str(controlnet), "size": size, "steps": steps, "guidance": args.guidance},
            "parameters": {ADAPTER: sum(x.numel() for x in pipe.adapters[ADAPTER].parameters()),
                           CONTROLNET: sum(x.numel() for x in pipe.controlnets[CONTROLNET].parameters()),
                           "unet": sum(x.numel() for x in pipe.base.unet.parameters())},
            "quality": None, "timing": {}, "training": None,
        }
        if args.eval_json:
            results["quality"] = quality_from_json(args.eval_json)
        elif scenes_n > 0:  # eager fp32, as `t2iadapter eval` runs the demo
            scenes = [world.generate(s, size) for s in range(first, first + scenes_n)]
            results["quality"] = quality_from_eval(pipe, scenes, steps, args.guidance)
        if repeats > 0:
            cuda = pipe.device.type == "cuda"
            label = machine_label(pipe.device, args.threads)
            if cuda:
                pipe.optimize()  # after the quality run: fast mode is for the timing only
            results["timing"][label] = time_settings(pipe, world.generate(first, size), steps, args.guidance,
                                                     warmup if warmup is not None else (2 if cuda else 1), repeats)
        if train_log:
            results["training"] = training_from_log(train_log)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="demo", help="the base (default: the embedded demo)")
    p.add_argument("--adapter", default="demo/sketch", help="the sketch adapter (default: demo/sketch)")
    p.add_argument("--controlnet", default="demo/controlnet-sketch", help="the sketch ControlNet (default: demo/controlnet-sketch)")
    p.add_argument("--train-log", default=None, help="scripts/train_demo_adapters.py's adapters_log.json (compare phase)")
    p.add_argument("--scenes", type=int, default=20, help="held-out scenes to evaluate here (0: none; see --eval-json)")
    p.add_argument("--first-seed", type=int, default=None, help="first evaluation seed (default: world.EVAL_SEEDS)")
    p.add_argument("--eval-json", default=None, help="take quality from this `t2iadapter eval --json` file instead")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads (the table names them)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per setting (default: 1 CPU, 2 CUDA)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per setting (0: no timing)")
    p.add_argument("--merge", action="append", default=[], help="an earlier run's --json (another machine); repeatable")
    p.add_argument("--json", default=None, help="write this run's results here (for --merge elsewhere)")
    p.add_argument("--out", default=None, help="write the markdown table here too")
    p.add_argument("--smoke", action="store_true", help="tiny models trained for 2 steps, 64², 2 steps, CPU (seconds)")
    args = p.parse_args(argv)

    import logging

    logging.disable(logging.WARNING)  # diffusers' and our info/warning lines would interleave with the table
    try:
        results = measure(args)
    finally:
        logging.disable(logging.NOTSET)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    merged = merge(results, [json.loads(Path(m).read_text()) for m in args.merge])
    table = format_table(merged)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return merged


if __name__ == "__main__":
    main()
