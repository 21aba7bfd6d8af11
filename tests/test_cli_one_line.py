"""One-line errors (issue 14, item 11): argparse typos, refused pickles without torch's warning, corrupt checkpoints."""
import os
import pickle

import pytest
import torch

from t2iadapter.cli import main as cli
from t2iadapter.errors import CheckpointError, UnsafeCheckpointError
from t2iadapter.train import checkpoint as ckpt


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("argv", [
    ["generat"],
    ["serve", "--port", "x"],
    ["generate", "--base", "tiny", "--prompt", "x", "--out", "o.png", "--stpes", "5"],
    ["extract", "--no-such-flag"],
])
def test_usage_errors_are_one_line_and_exit_2(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--help" in err, err
    assert not list(tmp_path.iterdir())


def test_help_still_exits_0(capsys):
    assert cli(["--help"]) == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("write", [
    lambda p: pickle.dump({"a": Evil()}, open(p, "wb"), protocol=4),  # torch warns about protocol 4 first
    lambda p: torch.save({"a": Evil()}, p),
    lambda p: torch.save({"a": Evil()}, p, _use_new_zipfile_serialization=False),
])
def test_refused_pickles_are_one_line_without_warnings(write, tmp_path, capsys, recwarn):
    path = tmp_path / "evil.pt"
    write(path)
    assert cli(["info", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "refused" in captured.err and "Warning" not in captured.err, captured.err
    assert "weights_only" not in captured.err  # torch's paragraphs of advice are left out
    assert captured.out == ""
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_corrupt_and_malicious_trainer_checkpoints_are_one_line(tmp_path):
    folder = tmp_path / "step-00000001"
    folder.mkdir()
    torch.save({"step": 1}, folder / ckpt.TRAINER_FILE)
    good = (folder / ckpt.TRAINER_FILE).read_bytes()
    (folder / ckpt.TRAINER_FILE).write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError) as err:
        ckpt.load(folder)
    assert "\n" not in str(err.value) and "corrupt" in str(err.value) and "miniz" not in str(err.value)

    (folder / ckpt.TRAINER_FILE).write_bytes(good)
    torch.save({"state": Evil()}, folder / "rng-0.pt")
    with pytest.raises(UnsafeCheckpointError) as err:  # a traceback before
        ckpt.load(folder)
    assert "\n" not in str(err.value) and "rng-0.pt" in str(err.value) and "posix.system" in str(err.value)

    (folder / ckpt.TRAINER_FILE).unlink()
    with pytest.raises(CheckpointError, match="has no trainer.pt"):
        ckpt.load(folder)


def test_a_reader_that_goes_away_stops_the_cli_quietly(tmp_path):
    """`t2iadapter info X | head -1`: was "error: Broken pipe" and exit 2; now silent, 141 as a shell tool's SIGPIPE."""
    import subprocess
    import sys

    from t2iadapter.bases import load_base, tiny_adapter_config
    from t2iadapter.models import build_adapter

    path = tmp_path / "sketch.safetensors"
    build_adapter(tiny_adapter_config(load_base("tiny"), 1)).save_file(path)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the CLI writes
    done = subprocess.run([sys.executable, "-m", "t2iadapter.cli", "info", str(path)], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert (done.returncode, done.stderr) == (141, "")
