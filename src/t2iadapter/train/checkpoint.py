"""Atomic training checkpoints: a complete `step-NNNNNNNN/` folder appears by one rename, or nothing does.

A checkpoint holds the adapter(s) in our single-file format (config inside), and `trainer.pt`
with the optimiser, LR schedule, EMA, step and the config; `rng-<rank>.pt` holds each
process's RNG states (python, numpy, torch, CUDA, the trainer's generator). The data position
is the step itself (see `t2iadapter.train.data`). Folders are written as `.tmp-*` and renamed:
a run killed mid-write leaves a temp folder that resume ignores and the next save removes.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2iadapter.errors import CheckpointError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")
TRAINER_FILE = "trainer.pt"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temp folders are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / TRAINER_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve(resume: str, root: str | Path) -> Path | None:
    """`latest` → the newest complete checkpoint under `root` (None if there is none); else the given folder."""
    if resume in ("latest", "auto"):
        found = checkpoints(root)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if path.is_dir() and (path / "checkpoints").is_dir():  # an output dir: take its newest
        found = checkpoints(path / "checkpoints")
        if not found:
            raise CheckpointError(f"{path} has no complete checkpoint to resume from")
        return found[-1]
    if not (path / TRAINER_FILE).is_file():
        raise CheckpointError(f"{path} is not a training checkpoint (no {TRAINER_FILE})")
    return path


def rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    """Every RNG a training step draws from, as plain tensors and lists (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    """Restore `rng_state`'s output."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def clean_temp(root: str | Path) -> None:
    """Remove temp folders left by a killed run (main process only, before writing new checkpoints)."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-") and p.is_dir():
                log.info("removing the half-written checkpoint %s of an interrupted run", p)
                shutil.rmtree(p, ignore_errors=True)


def temp_dir(root: str | Path, step: int) -> Path:
    """The temp folder checkpoint `step` is written into (same name on every process)."""
    return Path(root) / f".tmp-{step_name(step)}"


def begin(root: str | Path, step: int) -> Path:
    """Main process: create an empty temp folder for checkpoint `step`."""
    tmp = temp_dir(root, step)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_rng(tmp: Path, rank: int, state: dict[str, Any]) -> None:
    """Every process: its RNG states into the temp folder."""
    torch.save(state, tmp / f"rng-{rank}.pt")


def finish(root: str | Path, step: int, modules: dict[str, Any], trainer_state: dict[str, Any], keep: int) -> Path:
    """Main process: weights and trainer state into the temp folder, fsync, one rename, prune to `keep`."""
    root = Path(root)
    tmp = temp_dir(root, step)
    final = root / step_name(step)
    for name, module in modules.items():
        module.save_file(tmp / f"{name}.safetensors")
    torch.save(trainer_state, tmp / TRAINER_FILE)  # written last: its presence marks a complete folder
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (a resumed run that stops where it started)
        old = root / f".tmp-old-{step_name(step)}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    if keep > 0:
        for stale in checkpoints(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load(path: str | Path, rank: int = 0) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(trainer state, this rank's RNG state or None) of a checkpoint folder."""
    from t2iadapter.formats import load_pickle

    path = Path(path)
    if not (path / TRAINER_FILE).is_file():
        raise CheckpointError(f"cannot read checkpoint {path}: it has no {TRAINER_FILE}")
    state = load_pickle(path / TRAINER_FILE)  # one-line CheckpointError when corrupt or unsafe
    rng_file = path / f"rng-{rank}.pt"
    rng = load_pickle(rng_file) if rng_file.is_file() else None
    return state, rng

