"""`t2iadapter generate --batch JOBS.jsonl --out DIR` (issue 17): resumable, sharded across torchrun ranks; extract too."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2iadapter.bases import load_base, tiny_adapter_config
from t2iadapter.cli import main as cli
from t2iadapter.commands._batch_jobs import Rank
from t2iadapter.errors import ConfigError
from t2iadapter.models import build_adapter
from t2iadapter.pngmeta import read_parameters

SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """A tiny sketch adapter, two condition images and five lines (one of two images, one with its own weight/window)."""
    root = tmp_path_factory.mktemp("jobs")
    torch.manual_seed(0)
    adapter = build_adapter(tiny_adapter_config(load_base("tiny"), 1)).save_file(root / "sketch.safetensors")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L").save(root / f"c{i}.png")
    lines = [
        {"prompt": "a red star", "conditions": {"sketch": "c0.png"}},
        {"prompt": "a blue cat", "conditions": {"sketch": "c1.png"}, "adapters": {"sketch": {"weight": 0.5, "window": "0:0.5"}}},
        {"prompt": "text only"},
        {"prompt": "two", "conditions": {"sketch": "c0.png"}, "num_images": 2, "seed": 11},
        {"prompt": "a green tree", "conditions": {"sketch": "c1.png"}, "guidance_scale": 1.0},
    ]
    path = root / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    return path, adapter


def argv(jobs, out, *extra):
    path, adapter = jobs
    return ["generate", "--base", "tiny", "--adapter", str(adapter), "--batch", str(path), "--out", str(out),
            "--steps", "2", "--size", "64x64", "--device", "cpu", *extra]


ALL = ["job-000000.png", "job-000001.png", "job-000002.png", "job-000003-0.png", "job-000003-1.png", "job-000004.png"]


def test_rank_shards_are_disjoint_and_cover_the_list():
    items = list(range(11))
    shards = [Rank.from_env({"RANK": str(r), "WORLD_SIZE": "3", "LOCAL_RANK": str(r)}).shard(items) for r in range(3)]
    assert sorted(sum(shards, [])) == items and sum(map(len, shards)) == len(items)
    assert Rank.from_env({}) == Rank(0, 1, 0)
    with pytest.raises(ConfigError, match="RANK"):
        Rank.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_generate_batch_is_resumable(jobs, tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    assert cli(argv(jobs, out, "--max-batch", "3")) == 0
    assert sorted(p.name for p in out.iterdir()) == ALL
    assert "5 generated, 0 already there" in capsys.readouterr().out
    params = read_parameters(out / "job-000001.png")
    assert params["weights"] == [0.5] and params["windows"] == [[0.0, 0.5]] and params["seed"] == 1  # seed: the index
    assert read_parameters(out / "job-000003-1.png")["seed"] == 11
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "job-000001.png").unlink()
    assert cli(argv(jobs, out)) == 0  # resume: only the missing line runs (alone this time: the same image)
    assert "1 generated, 4 already there" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "job-000001.png"} == \
        {k: v for k, v in first.items() if k != "job-000001.png"}


def test_generate_batch_shards_across_ranks(jobs, tmp_path):
    """Two ranks as torchrun starts them: disjoint outputs that together are the whole list, each as one process alone makes it."""
    out = tmp_path / "ranks"
    env = dict(os.environ, PYTHONPATH=str(SRC), WORLD_SIZE="2", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    runs = [subprocess.run([sys.executable, "-m", "t2iadapter.cli", *argv(jobs, out, "--max-batch", "2")],
                           env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), capture_output=True, text=True, timeout=300)
            for r in range(2)]
    for r, run in enumerate(runs):
        assert run.returncode == 0, run.stderr[-2000:]
        assert f"rank {r}/2: {3 - r} generated" in run.stdout
    assert sorted(p.name for p in out.iterdir()) == ALL  # no leftovers, no collisions
    for name in ALL:  # each PNG names its line (1-based); line i (0-based) went to rank i % 2
        assert read_parameters(out / name)["job"].endswith(f"jobs.jsonl:{int(name[4:10]) + 1}")
    alone = tmp_path / "alone"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran (BLAS results depend on the thread count, not on the batch)
    try:
        assert cli(argv(jobs, alone)) == 0
    finally:
        torch.set_num_threads(before)
    for name in ALL:
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(alone / name))), name


def test_generate_batch_errors_are_one_line(jobs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "colour": 1}\n')
    assert cli(argv((bad, jobs[1]), tmp_path / "o")) == 2
    assert "bad.jsonl:1: unknown fields ['colour']" in capsys.readouterr().err
    assert cli(argv(jobs, tmp_path / "o.png")) == 2
    assert "--out" in capsys.readouterr().err
    assert cli(["generate", "--base", "tiny", "--out", str(tmp_path / "x.png")]) == 2
    assert "--prompt is required" in capsys.readouterr().err


def test_a_bad_adapter_option_names_its_line(jobs):
    """A line's weight or window error says which line and which adapter (it was a bare "weight of 'sketch' ...")."""
    import argparse

    from t2iadapter.commands._batch_jobs import to_request

    args = argparse.Namespace(prompt=None, size=None, negative_prompt=None, steps=2, guidance=7.5, seed=0,
                              scheduler=None, num_images=1, fuser=None, fuser_windows="once")
    for options, words in (({"weight": "x"}, "finite"), ({"window": "1:0"}, "window")):
        job = {"prompt": "x", "conditions": {"sketch": "c0.png"}, "adapters": {"sketch": options}}
        with pytest.raises(ConfigError, match=f"jobs.jsonl:3: adapters.sketch: .*{words}"):
            to_request(job, 0, "jobs.jsonl:3", jobs[0].parent, args)


def test_extract_input_dir_shards_across_ranks(tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / f"{i}.png")
    for r in range(2):
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", str(r))
        assert cli(["extract", "canny", "--input-dir", str(src), "--output-dir", str(out), "--workers", "1",
                    "--no-progress"]) == 0
        assert f"{3 - r} done, 0 already there" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [f"{i}.png" for i in range(5)]


def test_batch_refuses_flags_it_would_ignore_and_names_adapters(jobs, tmp_path, capsys):
    """--lora, --controlnet, --init-image, --weight … were dropped silently (plain text-to-image, exit 0); NAME=PATH
    adapters were read as a path."""
    for extra in (["--lora", "x.safetensors"], ["--weight", "0"], ["--init-image", "x.png"], ["--paste-back"]):
        assert cli(argv(jobs, tmp_path / "o", *extra)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{extra[0]} would be ignored" in err, err
    path, adapter = jobs
    named = ["generate", "--base", "tiny", "--adapter", f"sketch={adapter}", "--batch", str(path), "--out",
             str(tmp_path / "named"), "--steps", "1", "--size", "64x64", "--device", "cpu"]
    assert cli(named) == 0 and len(list((tmp_path / "named").glob("*.png"))) == len(ALL)


def test_bad_lines_fail_alone_and_sides_default_as_in_the_api(jobs, tmp_path, capsys):
    """An unreadable image file stopped the whole run (exit 2, no line named); width alone gave a 0 height; width 0
    fell back silently; a list prompt wrote one of its two images."""
    root = jobs[0].parent
    (root / "bad.png").write_text("not an image")
    lines = [{"prompt": "fine", "seed": 1}, {"prompt": "x", "conditions": {"sketch": "bad.png"}},
             {"prompt": "wide", "width": 128, "seed": 2}, {"prompt": "x", "width": 0}, {"prompt": ["x", "y"]}]
    path = root / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "mixed"
    assert cli(["generate", "--base", "tiny", "--adapter", str(jobs[1]), "--batch", str(path), "--out", str(out),
                "--steps", "1", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "mixed.jsonl:2: conditions.sketch: " in err and "not an image PIL can read" in err
    assert "mixed.jsonl:4: width must be a whole number of pixels, at least 8, got 0" in err
    assert "mixed.jsonl:5: prompt is one string, not list" in err
    assert sorted(p.name for p in out.glob("*.png")) == ["job-000000.png", "job-000002.png"]
    assert Image.open(out / "job-000002.png").size == (128, load_base("tiny").default_size[1])


def test_a_truncated_or_bomb_base64_condition_fails_its_line_only(jobs, tmp_path, capsys):
    """A truncated base64 PNG was opened lazily: the run stopped at its batch with `error: image file is truncated`
    (exit 2, no line named, later lines never ran); a bomb header raised PIL's DecompressionBombError (traceback)."""
    import base64
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8), "L").save(buf, format="PNG")
    truncated = base64.b64encode(buf.getvalue()[: len(buf.getvalue()) // 2]).decode()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0))
                            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")).decode()
    lines = [{"prompt": "fine", "seed": 1}, {"prompt": "x", "conditions": {"sketch": truncated}},
             {"prompt": "y", "conditions": {"sketch": bomb}}, {"prompt": "also fine", "seed": 3}]
    path = tmp_path / "b64.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    assert cli(["generate", "--base", "tiny", "--adapter", str(jobs[1]), "--batch", str(path), "--out", str(out),
                "--steps", "1", "--size", "64x64", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "b64.jsonl:2: conditions.sketch: " in err and "could not be decoded" in err, err
    assert "b64.jsonl:3: conditions.sketch: " in err and "too large to decode" in err, err
    assert sorted(p.name for p in out.glob("*.png")) == ["job-000000.png", "job-000003.png"]


@pytest.mark.parametrize("flag, value, words", [("--num-images", "-1", "--num-images must be from 1"),
                                                ("--num-images", "0", "--num-images must be from 1"),
                                                ("--steps", "0", "steps must be between 1")])
def test_bad_command_line_defaults_are_one_error(jobs, tmp_path, capsys, flag, value, words):
    """--num-images -1 named no output file, so every line counted as done (exit 0, nothing written); --steps 0 failed
    every line separately (exit 1)."""
    out = tmp_path / "o"
    assert cli([*argv(jobs, out), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert not out.exists()
