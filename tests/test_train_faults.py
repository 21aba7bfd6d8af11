"""Fault tolerance of `t2iadapter train`: exact resume, and a run killed mid-checkpoint leaves nothing half-written."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from t2iadapter.bases import load_base
from t2iadapter.formats import load_adapter
from t2iadapter.train import checkpoint as ckpt
from t2iadapter.train.config import load_config
from t2iadapter.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]

# Exercise everything that carries state across a resume: warm-up + cosine LR, EMA,
# clipping, text dropout, the latent/text caches and the data order over epochs.
RECIPE = [
    "data.resolution=64", "data.num_samples=6", "recipe.batch_size=1", "recipe.grad_accumulation=1",
    "recipe.lr=1e-3", "recipe.warmup_steps=3", "recipe.schedule=cosine", "recipe.ema_decay=0.8",
    "recipe.grad_clip=1.0", "recipe.text_dropout=0.3", "recipe.cache_latents=true", "recipe.cache_text=true",
    "recipe.max_steps=20", "checkpoint.every=5", "checkpoint.keep=2", "log_every=1",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def config(out: Path):
    return load_config(ROOT / "configs" / "tiny-cpu.yaml", [*RECIPE, f"output_dir={out}"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """20 steps in one go: the reference every interrupted run must reproduce bit for bit."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("straight")
    result = Trainer(config(out), base=load_base("tiny")).run()
    assert result.step == 20
    return out, result


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_adapter(path).state_dict()


def assert_same(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    diffs = {k: (wa[k] - wb[k]).abs().max().item() for k in wa if not torch.equal(wa[k], wb[k])}
    assert not diffs, f"weights differ: {diffs}"


def test_resume_equals_straight_run(straight, tmp_path):
    ref, ref_result = straight
    first = Trainer(config(tmp_path), base=load_base("tiny")).run(stop_at=10)
    assert first.step == 10
    assert [p.name for p in ckpt.checkpoints(tmp_path / "checkpoints")] == ["step-00000005", "step-00000010"]
    second = Trainer(config(tmp_path), base=load_base("tiny")).run(resume="latest")
    assert second.resumed_from.name == "step-00000010" and second.step == 20
    assert first.losses + second.losses == ref_result.losses  # the same stream, noise and timesteps
    assert_same(ref / "adapter.safetensors", tmp_path / "adapter.safetensors")  # EMA weights
    assert_same(ref / "checkpoints" / "step-00000020" / "adapter.safetensors",
                tmp_path / "checkpoints" / "step-00000020" / "adapter.safetensors")  # raw weights
    assert len(ckpt.checkpoints(tmp_path / "checkpoints")) == 2  # keep=2


KILLER = textwrap.dedent(
    """
    import os, signal, sys, torch
    torch.set_num_threads(1)
    from t2iadapter.train import checkpoint as ckpt
    from t2iadapter.train.config import load_config
    from t2iadapter.train.loop import Trainer

    real = ckpt._fsync_tree
    def fsync_then_die(path):
        real(path)
        if path.name == ".tmp-step-00000015":  # every file of checkpoint 15 is written, the rename is not
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt._fsync_tree = fsync_then_die
    Trainer(load_config(sys.argv[1], sys.argv[2:])).run()
    """
)


def test_killed_during_checkpoint_resumes_from_last_complete(straight, tmp_path):
    ref, ref_result = straight
    args = [*RECIPE, f"output_dir={tmp_path}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", KILLER, str(ROOT / "configs" / "tiny-cpu.yaml"), *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckdir = tmp_path / "checkpoints"
    assert (ckdir / ".tmp-step-00000015" / "trainer.pt").is_file()  # the half-finished one is there ...
    assert [p.name for p in ckpt.checkpoints(ckdir)] == ["step-00000005", "step-00000010"]  # ... but not listed
    assert ckpt.resolve("latest", ckdir).name == "step-00000010"
    result = Trainer(load_config(ROOT / "configs" / "tiny-cpu.yaml", args), base=load_base("tiny")).run(resume="latest")
    assert result.resumed_from.name == "step-00000010" and result.step == 20
    assert not any(p.name.startswith(".tmp-") for p in ckdir.iterdir())  # cleaned up
    assert result.losses == ref_result.losses[10:]
    assert_same(ref / "adapter.safetensors", tmp_path / "adapter.safetensors")


def test_resume_without_checkpoint_starts_fresh_and_bad_path_is_an_error(tmp_path):
    from t2iadapter.errors import CheckpointError

    assert ckpt.resolve("latest", tmp_path / "none") is None
    with pytest.raises(CheckpointError):
        ckpt.resolve(str(tmp_path), tmp_path)


class _Planted:
    """A pickle that would create a marker file if anything unpickled it without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_refuses_a_malicious_rng_file_in_one_line(straight, tmp_path, capsys):
    import shutil

    from t2iadapter.cli import main as cli

    out, _ = straight
    planted = tmp_path / "run"
    shutil.copytree(out, planted)
    newest = ckpt.checkpoints(planted / "checkpoints")[-1]
    marker = tmp_path / "ran"
    torch.save({"torch": _Planted(marker)}, newest / "rng-0.pt")
    code = cli(["train", "--config", str(ROOT / "configs" / "tiny-cpu.yaml"), *(f"--set={s}" for s in RECIPE),
                "--output-dir", str(planted), "--resume", str(newest)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not marker.exists()
    assert len(err.splitlines()) == 1 and "rng-0.pt" in err and "refused" in err, err


@pytest.mark.parametrize("stored_count", [True, False], ids=["samples", "older-checkpoint"])
def test_resume_on_another_number_of_processes_continues_the_data(tmp_path, stored_count):
    """A 2-process checkpoint resumed on 1 process: the stream went on at step · GA · B of the new world (position 2
    of the 4 already read), so half the data was trained again while the log said 'data continues'."""
    args = ["data.num_samples=6", "recipe.batch_size=1", "recipe.max_steps=2", "checkpoint.every=2", "log_every=1",
            f"output_dir={tmp_path}"]
    Trainer(load_config(ROOT / "configs" / "tiny-cpu.yaml", args), base=load_base("tiny")).run()
    newest = ckpt.checkpoints(tmp_path / "checkpoints")[-1]
    state = torch.load(newest / ckpt.TRAINER_FILE, weights_only=True)
    assert state["samples"] == 2
    state["world_size"] = 2  # as 2 processes write it: 2 steps of batch 1 on each read positions 0..3
    if stored_count:
        state["samples"] = 4
    else:
        del state["samples"]
    torch.save(state, newest / ckpt.TRAINER_FILE)
    trainer = Trainer(load_config(ROOT / "configs" / "tiny-cpu.yaml", [*args, "recipe.max_steps=3"]), base=load_base("tiny"))
    seen = []
    real = trainer.train_step
    trainer.train_step = lambda batches: seen.append(batches[0]["index"].tolist()) or real(batches)
    trainer.run(resume="latest")
    assert seen == [[trainer.stream[4]["index"]]]
    assert torch.load(tmp_path / "checkpoints" / "step-00000003" / ckpt.TRAINER_FILE, weights_only=True)["samples"] == 5
