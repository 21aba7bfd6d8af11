"""Train the embedded demo's adapters (and the sketch ControlNet they are compared with) by `t2iadapter train`.

    python scripts/train_demo_adapters.py --base runs/demo-base --out runs/demo-adapters --minutes 3 --fuser-minutes 1.5
    python scripts/train_demo_adapters.py --base runs/demo-base --out runs/demo-adapters --minutes 3 --fuser-minutes 1.5 \
        --controlnet-sketch --compare-minutes 3                 # issue 16: + the sketch ControlNet, fairly
    python scripts/train_demo_adapters.py --base tiny --out /tmp/demo-adapters --smoke [--controlnet-sketch]   # CPU

Phases (`--phases` runs some of them; a later call with the same OUT runs the rest):
  adapters  concurrently (one process each, sharing the GPU) a full adapter for sketch (1 channel), seg, depth
            and pose (3 channels) and the light colour adapter, each on the world's exact condition maps,
            for --minutes of wall clock. With --controlnet-sketch the sketch adapter is not among them: the
            compare phase trains it.
  compare   (--controlnet-sketch, issue 16) the sketch adapter, then a sketch ControlNet (`adapter.kind:
            controlnet`, initialised from the base UNet's encoder with zero convs, ControlNetModel.from_unet),
            one after the other, each ALONE on the GPU for --compare-minutes of wall clock.
  fuser     a CoAdapter fuser for sketch+colour trained jointly with those two adapters (initialised from
            the earlier phases) with the condition-dropout recipe of DESIGN.md §6, for --fuser-minutes.

How "the same data and the same GPU-minutes" is made fair (the compare phase):
  * Same GPU-minutes: the adapters phase time-slices one GPU between five processes, each getting a share
    that depends on its own kernels, so a run's wall minutes there are not its GPU-minutes. The sketch
    adapter and the ControlNet are therefore trained as the only process on the GPU, one after the other,
    each stopped by the trainer's own clock after the same `recipe.max_minutes` (data loading included).
  * Same data and recipe: the two configs differ only in `adapter.kind` (and the file name). Both see the
    world's scenes in the same order (`recipe.seed` 0) at 256², with the same batch, learning rate and
    warm-up, constant schedule, cubic timesteps, bf16 base, AdamW, DataLoader workers and checkpointing.
  * Same start: each starts from its paper's initialisation (the adapter from random weights, the ControlNet
    from the base UNet). With --init both continue from INIT/sketch.safetensors and
    INIT/controlnet-sketch.safetensors, or, when the latter is absent, neither continues: no head start.
  * Not equalised but recorded: how many samples each sees in those minutes (a ControlNet runs a copy of
    the UNet's encoder forward and backward at every step, an adapter is a small network). Equal samples
    would give the ControlNet more GPU-minutes. Each run's samples, samples/s and peak GPU memory come from
    its own `train_summary.json` (written by the trainer) and are copied into OUT/adapters_log.json
    under "compare", which benchmarks/compare_adapter_controlnet.py reads.
  * The shipped sketch adapter (`demo/sketch`, also the fuser phase's start) is the compare phase's adapter,
    so the comparison is of what ships.

Every run is an ordinary `t2iadapter train --config` run; its config is written next to its outputs in
OUT/runs/NAME. The final files are fp16 copies: OUT/adapters/{sketch,seg,depth,pose,color,fuser}.safetensors
and OUT/controlnets/controlnet-sketch.safetensors (our single file: diffusers' keys with the config in the
metadata, as `demo/controlnet-sketch` ships and `load_controlnet` reads). OUT/adapters_log.json gathers every
run's last log line and summary; a later call with the same OUT adds to it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
try:
    import t2iadapter  # noqa: F401 - installed (pip install -e .)
except ImportError:  # a bare checkout, e.g. on the GPU machine: use the source tree (here and in the runs)
    sys.path.insert(0, str(SRC))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))

ADAPTERS = {  # condition → (kind, input channels)
    "sketch": ("full", 1),
    "seg": ("full", 3),
    "depth": ("full", 3),
    "pose": ("full", 3),
    "color": ("light", 3),
}
CONTROLNET = "controlnet-sketch"  # the compare phase's ControlNet: run name, file stem and `demo/` name
PHASES = ("adapters", "compare", "fuser")
SUMMARY_FILE = "train_summary.json"  # t2iadapter.train.throughput.SUMMARY_FILE


def config(base: str, out: Path, adapters: list[dict], *, fuser: dict | None, args, minutes: float,
           lr: float | None = None) -> dict:
    recipe = {
        "batch_size": 2 if args.smoke else args.batch,
        "max_steps": 3 if args.smoke else 1_000_000,  # bounded by max_minutes
        "max_minutes": None if args.smoke else minutes,
        "lr": lr or args.lr,
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
    """One `t2iadapter train` process; `--force`: this script owns OUT/runs, a run it repeats starts over."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    path.write_text(json.dumps(cfg, indent=2))
    log = open(out / "train.log", "w")
    return subprocess.Popen([sys.executable, "-m", "t2iadapter.cli", "train", "--config", str(path), "--force"],
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


def controlnet_to_fp16(src: Path, dst: Path) -> None:
    """Our single ControlNet file (the run's fp32 `controlnet.safetensors`) → the same in fp16."""
    import torch

    from t2iadapter.train.controlnet import load_file

    dst.parent.mkdir(parents=True, exist_ok=True)
    load_file(src).to(torch.float16).save_file(dst, overwrite=True)


def adapter_spec(name: str, init: str | None) -> dict:
    kind, ch = ADAPTERS[name]
    spec = {"kind": kind, "condition": name, "in_channels": ch}
    if init:
        spec["init_from"] = str(Path(init) / f"{name}.safetensors")
    return spec


def phase_adapters(args, runs: Path) -> list[str]:
    names = [n for n in ADAPTERS if not (args.controlnet_sketch and n == "sketch")]
    procs = {n: launch(config(args.base, runs / n, [adapter_spec(n, args.init)], fuser=None, args=args,
                              minutes=args.minutes), runs / n) for n in names}
    wait_all(procs, runs)
    return names


def phase_compare(args, runs: Path) -> list[str]:
    """The sketch adapter, then the sketch ControlNet, each alone for --compare-minutes (module docstring)."""
    init = args.init if args.init and (Path(args.init) / f"{CONTROLNET}.safetensors").is_file() else None
    if args.init and init is None:
        print(f"compare: {args.init} has no {CONTROLNET}.safetensors, so both start fresh (no head start)", flush=True)
    cn_spec = {"kind": "controlnet", "condition": "sketch", "in_channels": ADAPTERS["sketch"][1]}
    if init:
        cn_spec["init_from"] = str(Path(init) / f"{CONTROLNET}.safetensors")
    for name, spec, lr in (("sketch", adapter_spec("sketch", init), None), (CONTROLNET, cn_spec, args.controlnet_lr)):
        wait_all({name: launch(config(args.base, runs / name, [spec], fuser=None, args=args,
                                      minutes=args.compare_minutes, lr=lr), runs / name)}, runs)
    return ["sketch", CONTROLNET]


def phase_fuser(args, runs: Path) -> list[str]:
    missing = [n for n in ("sketch", "color") if not (runs / n / "adapter.safetensors").is_file()]
    if missing:
        raise SystemExit(f"the fuser phase starts from the {missing} adapter(s) of {runs}; run their phase first "
                         f"({'compare' if args.controlnet_sketch and 'sketch' in missing else 'adapters'})")
    co = [{"kind": ADAPTERS[n][0], "condition": n, "in_channels": ADAPTERS[n][1],
           "init_from": str(runs / n / "adapter.safetensors")} for n in ("sketch", "color")]
    fuser_spec = {"width": args.fuser_width}
    if args.init and (Path(args.init) / "fuser.safetensors").is_file():
        fuser_spec = {"init_from": str(Path(args.init) / "fuser.safetensors")}
    cfg = config(args.base, runs / "fuser", co, fuser=fuser_spec, args=args, minutes=args.fuser_minutes)
    wait_all({"fuser": launch(cfg, runs / "fuser")}, runs)
    return ["fuser"]


def curves_table(summaries: dict[str, dict], columns: int = 10) -> str:
    """Markdown: each run's loss curve (`loss_curve` of its train_summary.json) at `columns` points, and the change
    over its last 30 % of steps — near 0 % is the plateau issue 11 asks the adapters to reach."""
    lines = ["| run | steps | " + " | ".join(f"{100 * (i + 1) // columns} %" for i in range(columns))
             + " | last 30 % |", "|---|---|" + "---|" * (columns + 1)]  # fmt: skip
    for name, summary in summaries.items():
        curve = summary.get("loss_curve") or []
        if not curve:
            continue
        picks = [curve[-(-(i + 1) * len(curve) // columns) - 1]["loss"] for i in range(columns)]  # ⌈(i+1)·n/c⌉ − 1
        before = curve[max(0, int(0.7 * len(curve)) - 1)]["loss"]
        change = (curve[-1]["loss"] - before) / before if before else float("nan")
        steps = f"{curve[0]['first_step']}–{curve[-1]['last_step']}"
        lines.append(f"| {name} | {steps} | " + " | ".join(f"{v:.4f}" for v in picks) + f" | {100 * change:+.1f} % |")
    return "\n".join(lines) + "\n"


def finish(args, out: Path, trained: list[str], phases: list[str], seconds: float) -> dict:
    """fp16 copies of every finished run in OUT/runs, and OUT/adapters_log.json (merged with an earlier call's)."""
    runs = out / "runs"
    for name in [*ADAPTERS, "fuser"]:
        stem = "fuser" if name == "fuser" else "adapter"
        if (runs / name / f"{stem}.safetensors").is_file():
            to_fp16(runs / name / f"{stem}.safetensors", out / "adapters" / f"{name}.safetensors")
    if (runs / CONTROLNET / "controlnet.safetensors").is_file():
        controlnet_to_fp16(runs / CONTROLNET / "controlnet.safetensors", out / "controlnets" / f"{CONTROLNET}.safetensors")
    path = out / "adapters_log.json"
    log = json.loads(path.read_text()) if path.is_file() else {}
    log.setdefault("runs", {})
    log.setdefault("summaries", {})
    for name in trained:
        lines = (runs / name / "train.log").read_text().strip().splitlines()
        done = [line for line in lines if line.startswith("trained to step")]  # the train command's own summary
        log["runs"][name] = (done or lines or [""])[-1][-300:]
        if (runs / name / SUMMARY_FILE).is_file():
            log["summaries"][name] = json.loads((runs / name / SUMMARY_FILE).read_text())
    if "compare" in phases:
        log["compare"] = {
            "method": "the sketch adapter, then the sketch ControlNet, each alone on the GPU for the same wall-clock "
                      "minutes, same data, batch, resolution and recipe (scripts/train_demo_adapters.py)",
            "minutes": None if args.smoke else args.compare_minutes,
            "lr": {"sketch": args.lr, CONTROLNET: args.controlnet_lr or args.lr},
            "runs": {n: log["summaries"].get(n) for n in ("sketch", CONTROLNET)},
        }
    log["seconds"] = log.get("seconds", 0.0) + seconds
    (out / "loss_curves.md").write_text(curves_table(log["summaries"]), encoding="utf-8")  # the curves, per run
    log.setdefault("calls", []).append({"argv": sys.argv[1:], "phases": phases, "seconds": round(seconds, 1)})
    path.write_text(json.dumps(log, indent=2) + "\n")
    return log


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the trained demo base folder (or tiny for --smoke)")
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=3.0, help="adapters phase budget (its adapters all at once)")
    p.add_argument("--fuser-minutes", type=float, default=1.5, help="fuser phase budget (fuser + sketch + colour)")
    p.add_argument("--controlnet-sketch", action="store_true",
                   help="issue 16: train the sketch adapter and a sketch ControlNet alone, for equal minutes (compare phase)")
    p.add_argument("--compare-minutes", type=float, default=None,
                   help="compare phase budget for EACH of the two runs (default: --minutes)")
    p.add_argument("--controlnet-lr", type=float, default=None,
                   help="the ControlNet's learning rate (default: --lr, the adapter's: same recipe); recorded in the log")
    p.add_argument("--phases", default=None,
                   help=f"comma-separated phases to run now, of {', '.join(PHASES)} (default: all; compare only with "
                   "--controlnet-sketch)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)  # from scratch on a small base; the paper's 1e-5 is for SD's 77M adapters
    p.add_argument("--workers", type=int, default=2, help="world-rendering DataLoader workers per run")
    p.add_argument("--fuser-width", type=int, default=128)
    p.add_argument("--init", default=None, help="continue from a folder of {name}.safetensors (a previous run's adapters/)")
    p.add_argument("--smoke", action="store_true", help="3 steps of batch 2 at 64² per run, on the CPU (seconds)")
    args = p.parse_args(argv)
    if args.compare_minutes is None:
        args.compare_minutes = args.minutes
    enabled = [ph for ph in PHASES if ph != "compare" or args.controlnet_sketch]
    phases = enabled if args.phases is None else [ph.strip() for ph in args.phases.split(",") if ph.strip()]
    bad = [ph for ph in phases if ph not in PHASES]
    if bad or not phases:
        p.error(f"--phases: unknown phase(s) {bad}; choose from {', '.join(PHASES)}")
    if "compare" in phases and not args.controlnet_sketch:
        p.error("the compare phase trains the sketch ControlNet: add --controlnet-sketch")
    out = Path(args.out)
    runs = out / "runs"
    t0 = time.time()
    trained: list[str] = []
    for phase in PHASES:  # in this order whatever the order given
        if phase in phases:
            trained += {"adapters": phase_adapters, "compare": phase_compare, "fuser": phase_fuser}[phase](args, runs)
            print(f"phase {phase} done at {time.time() - t0:.0f} s", flush=True)
    log = finish(args, out, trained, phases, time.time() - t0)
    print(json.dumps({n: log["runs"][n] for n in trained}, indent=1), flush=True)
    if "compare" in log and "compare" in phases:
        for name, s in log["compare"]["runs"].items():
            if s:
                peak = "–" if s["peak_memory_gib"] is None else f"{s['peak_memory_gib']:.2f} GiB"
                print(f"compare {name}: {s['steps']} steps, {s['samples']} samples in {s['loop_seconds']:.0f} s, "
                      f"{s['samples_per_second'] or 0:.1f} samples/s, peak memory {peak} ({s['device']})", flush=True)
    return log


if __name__ == "__main__":
    main()
