"""CLI coherence (issue 14, item 14): help for every option, one --adapter syntax, --base demo and --threads everywhere."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from t2iadapter.cli import build_parser
from t2iadapter.cli import main as cli
from t2iadapter.commands import DEMO_BASE, parse_adapters

ROOT = Path(__file__).resolve().parents[1]
MODEL_COMMANDS = ("generate", "eval", "serve", "extract", "train", "demo")  # the commands that run a model


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_command_has_help():
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, p in subparsers().items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, f"options without help: {missing}"


def test_threads_on_every_command_that_runs_a_model_and_base_defaults_to_the_demo():
    parsers = subparsers()
    for name in MODEL_COMMANDS:
        assert "--threads" in parsers[name]._option_string_actions, name
    for name, p in parsers.items():
        if "--base" in p._option_string_actions:
            assert p._option_string_actions["--base"].default == DEMO_BASE, name
        if "--adapter" in p._option_string_actions:
            assert p._option_string_actions["--adapter"].metavar == "[NAME=]PATH", name


def test_one_adapter_syntax():
    assert parse_adapters(["demo/sketch", "c=demo/color", "x/y/depth.safetensors"]) == {
        "sketch": "demo/sketch", "c": "demo/color", "depth": "x/y/depth.safetensors"}


def test_threads_sets_torch_threads(monkeypatch, tmp_path):
    import torch

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    assert cli(["extract", "canny", str(tmp_path / "missing.png"), str(tmp_path / "o.png"), "--threads", "1"]) == 2
    assert seen == [1]


def test_fast_on_the_cpu_says_it_will_compile(monkeypatch, tmp_path, capsys):
    from t2iadapter.generation.pipeline import AdapterPipeline

    monkeypatch.setattr(AdapterPipeline, "optimize", lambda self, **kw: self)  # the message, not the compile
    out = tmp_path / "o.png"
    assert cli(["generate", "--base", "tiny", "--prompt", "a red star", "--steps", "1", "--size", "64x64", "--fast",
                "--device", "cpu", "--out", str(out)]) == 0
    assert "minute and a half" in capsys.readouterr().out


def test_generate_keeps_library_chatter_out_of_stderr(tmp_path):
    """No diffusers "Loading pipeline components" bar, no import notices: only our denoising bar."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(var, None)
    for base in ("tiny", "demo"):
        out = tmp_path / f"{base}.png"
        done = subprocess.run([sys.executable, "-m", "t2iadapter.cli", "generate", "--base", base, "--prompt",
                               "a large red star", "--steps", "1", "--size", "64x64", "--threads", "1", "--out", str(out)],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr
        lines = [x.strip() for x in done.stderr.replace("\r", "\n").splitlines() if x.strip()]
        chatter = [x for x in lines if not x.startswith("denoising")]
        assert not chatter, chatter
        assert out.is_file()
