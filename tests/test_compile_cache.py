"""Compiled graphs as files (issue 18): the cache key, a save → load round trip in new processes, bad files, the CLI."""
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo.testing

from t2iadapter.bases import load_base, tiny_adapter_config
from t2iadapter.cli import main as cli
from t2iadapter.errors import ConfigError
from t2iadapter.generation import compile_cache as cc
from t2iadapter.models import build_adapter
from t2iadapter.pipeline import AdapterPipeline
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(cc, "_LOADED", set())  # each test is a "new process" for the cache's own bookkeeping
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def setup_of(**changes):
    setup = cc.Setup(torch=torch.__version__, triton=None, python="3.11", diffusers="0.42", t2iadapter="0.1",
                     device="cpu (x86_64)", base="abc", family="sd", dtype="float32", precision="fp32",
                     mode="reduce-overhead", adapters=())
    return dataclasses.replace(setup, **changes)


def test_default_folder_and_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv(cc.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert cc.cache_dir() == tmp_path / "xdg" / "t2iadapter" / "compiled"
    monkeypatch.setenv(cc.ENV, str(tmp_path / "env"))
    assert cc.cache_dir() == tmp_path / "env"
    assert cc.cache_dir(tmp_path / "flag") == tmp_path / "flag"  # the option (CLI --cache-dir) wins
    assert cc.folder_for(False) is None and cc.folder_for(None) == tmp_path / "env"


def test_a_cache_folder_under_a_file_is_refused_before_compiling(tmp_path):
    """`--cache-dir out.png/cache` cannot be created: one line at once, not "could not write" after the compile."""
    (tmp_path / "out.png").write_bytes(b"an image")
    with pytest.raises(ConfigError, match=r"out\.png is a file"):
        cc.cache_dir(tmp_path / "out.png" / "cache" / "deeper")
    with pytest.raises(ConfigError, match="is a file"):
        cc.cache_dir(tmp_path / "out.png")
    assert cli(["compile", "--base", "tiny", "--size", "64x64", "--device", "cpu", "--cache-dir",
                str(tmp_path / "out.png" / "graphs"), "--threads", "1"]) == 2


def test_key_changes_with_every_field(tmp_path):
    base = load_base("tiny")
    torch.manual_seed(0)
    adapter = build_adapter(tiny_adapter_config(base, 3))
    setup = cc.Setup.of(base, {"a": adapter}, "cpu", torch.float32, "fp32", "reduce-overhead")
    assert setup.family == "sd" and setup.device.startswith("cpu") and setup.adapters[0].startswith("full:")
    again = load_base("tiny")
    with torch.no_grad():
        next(again.unet.parameters()).add_(1.0)  # other weights, same architecture: the same key
    assert cc.Setup.of(again, {"b": adapter}, "cpu", torch.float32, "fp32", "reduce-overhead") == setup
    assert cc.architecture(load_base("tiny-xl")) != setup.base
    shape = cc.Shape(64, 64)
    cache = cc.CompileCache(tmp_path, setup)
    paths = {cache.path(shape)}
    import diffusers

    import t2iadapter

    # the code that is traced too (an AOTInductor package holds it compiled), and fused q/k/v (other weights' names)
    assert (setup.diffusers, setup.t2iadapter, setup.fuse_qkv) == (diffusers.__version__, t2iadapter.__version__, True)
    assert cc.Setup.of(base, {}, "cpu", torch.float32, "fp32", "default", fuse_qkv=False).fuse_qkv is False
    variants = [dict(torch="9.9.9"), dict(triton="3.9"), dict(python="3.99"), dict(diffusers="9.9"),
                dict(t2iadapter="9.9"), dict(device="NVIDIA H200 (sm_90)"), dict(base="other"), dict(dtype="bfloat16"),
                dict(precision="fp8"), dict(mode="default"), dict(adapters=()), dict(fuse_qkv=False)]
    for change in variants:
        paths.add(cc.CompileCache(tmp_path, dataclasses.replace(setup, **change)).path(shape))
    for change in [dict(width=128), dict(height=128), dict(batch=4), dict(cfg=False), dict(batched=True)]:
        paths.add(cache.path(dataclasses.replace(shape, **change)))
    assert len(paths) == 1 + len(variants) + 5, "a keyed field did not change the file"
    assert cache.path(shape).name == "64x64-b1.bin" and cache.folder.name.startswith("sd-fp32-cpu-x86-64-")


ROUND_TRIP = textwrap.dedent("""
    import json, sys, torch
    from t2iadapter.generation import compile_cache as cc
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    precompile = sys.argv[2] == "1" and cc.enable_precompile()
    setup = cc.Setup(torch=torch.__version__, triton=None, python="3", diffusers="0", t2iadapter="0",
                     device=cc.device_label("cpu"), base="mlp", family="sd", dtype="float32", precision="fp32",
                     mode="default", adapters=(), precompile=precompile)
    cache = cc.CompileCache(sys.argv[1], setup)
    if precompile:
        cache.preload()  # before torch.compile: dynamo reads its cache when it wraps the module
    compiled = torch.compile(module, dynamic=False)
    with torch.no_grad(), cache.first_call(cc.Shape(8, 8)):
        y = compiled(torch.ones(2, 8))
    event = cache.events[0]
    print(json.dumps({"status": event.status, "saved": event.saved, "counts": cc.compile_counts(),
                      "timers": event.timers, "line": event.line(), "y": y.tolist()}))
""")


@pytest.mark.parametrize("precompile", [False, True], ids=["inductor-cache", "precompile"])
def test_saved_graphs_load_in_a_new_process_from_a_copied_folder(tmp_path, precompile):
    """Process 1 compiles (inductor, CPU) and saves; process 2 — its own empty inductor cache, the folder copied
    elsewhere, as on another machine — loads the file and compiles nothing (with precompile: traces nothing)."""
    script = tmp_path / "round_trip.py"
    script.write_text(ROUND_TRIP)

    def run(folder, inductor_dir):
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1",
                   TORCHINDUCTOR_CACHE_DIR=str(inductor_dir))
        done = subprocess.run([sys.executable, str(script), str(folder), "1" if precompile else "0"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run(tmp_path / "cache", tmp_path / "inductor-1")
    assert first["status"] == "compiled" and first["saved"] and first["counts"]["miss"] > 0
    # where the first call's seconds went, from torch's own timers: dynamo's tracing, of it the backend's part
    assert first["timers"][cc.TRACING] >= first["timers"][cc.BACKEND] > 0, first["timers"]
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert files == ["8x8-b1.bin", "8x8-b1.json"]
    shutil.copytree(tmp_path / "cache", tmp_path / "copied")
    second = run(tmp_path / "copied", tmp_path / "inductor-2")
    assert second["status"] == "loaded", second
    assert second["counts"]["miss"] == 0 and second["y"] == first["y"]
    if precompile:  # dynamo's result came from the file: nothing traced
        assert second["counts"]["dynamo_hit"] > 0 and second["counts"]["graphs"] == 0, second
    else:
        assert second["counts"]["hit"] > 0
        timers = second["timers"]  # traced again, the backend's part now a cache load
        assert timers[cc.TRACING] >= timers[cc.BACKEND] > 0 and "tracing" in second["line"], second


def fake_torch_cache(monkeypatch):
    """torch.compiler's save/load replaced by recorders: the cache's own logic, without compiling anything."""
    calls = {"save": 0, "load": []}

    def save():
        calls["save"] += 1
        return f"artefacts-{calls['save']}".encode(), SimpleNamespace(artifacts={"inductor": ["k"]})

    def load(blob):
        calls["load"].append(blob)
        return SimpleNamespace(artifacts={"inductor": ["k"]})

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", save)
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", load)
    return calls


def test_corrupt_stale_and_unreadable_files_are_ignored_with_one_warning(tmp_path, monkeypatch, caplog):
    calls = fake_torch_cache(monkeypatch)
    shape = cc.Shape(64, 64)
    cache = cc.CompileCache(tmp_path, setup_of())
    with cache.first_call(shape):
        pass
    assert cache.events[-1].status == "compiled" and cache.events[-1].saved and calls["save"] == 1
    path = cache.path(shape)
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["key"]["width"] == 64 and manifest["key"]["torch"] == torch.__version__
    assert cc.CompileCache(tmp_path, setup_of()).load(shape) == ("loaded", "")

    def ignored(expect):
        monkeypatch.setattr(cc, "_LOADED", set())
        caplog.clear()
        fresh = cc.CompileCache(tmp_path, setup_of())
        with caplog.at_level(logging.WARNING, logger="t2iadapter.generation.compile_cache"):
            with fresh.first_call(shape):  # never raises: the call runs, compiling as without a file
                pass
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and expect in warnings[0].getMessage(), [r.getMessage() for r in warnings]
        assert fresh.events[-1].status == "compiled" and expect in fresh.events[-1].reason
        assert expect in fresh.events[-1].line()

    path.write_bytes(path.read_bytes()[:-3] + b"xyz")  # corrupt
    ignored("checksum")
    manifest = json.loads(path.with_suffix(".json").read_text())  # the compile above wrote a sound file again
    manifest["key"]["torch"] = "1.0.0"  # stale: written by another torch
    path.with_suffix(".json").write_text(json.dumps(manifest))
    ignored("torch")
    path.with_suffix(".json").write_text("{not json")
    ignored("unreadable")
    for edited in ("edited", ["x"], None):  # a key that is no object: ignored as well, never raised
        path.with_suffix(".json").write_text(json.dumps({**manifest, "key": edited}))
        ignored("unreadable")
    path.with_suffix(".json").write_text(json.dumps({**manifest, "sha256": 7}))
    ignored("unreadable")

    def broken(blob):
        raise RuntimeError("bad artefacts")

    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", broken)
    ignored("torch could not load it")


def test_torch_refusing_the_bytes_is_a_warning_not_an_error(tmp_path, monkeypatch, caplog):
    """Real torch.compiler.load_cache_artifacts on bytes it cannot read (checksum right, content wrong)."""
    shape = cc.Shape(32, 32)
    cache = cc.CompileCache(tmp_path, setup_of())
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts",
                        lambda: (b"not torch artefacts", SimpleNamespace(artifacts={})))
    assert cache.save(shape, 1.0) == cache.path(shape)
    monkeypatch.undo()
    monkeypatch.setattr(cc, "_LOADED", set())
    with caplog.at_level(logging.WARNING):
        status, why = cc.CompileCache(tmp_path, setup_of()).load(shape)
    assert status == "ignored" and "torch" in why
    assert [r.name for r in caplog.records if r.levelno >= logging.WARNING] == ["t2iadapter.generation.compile_cache"]


def test_pipeline_loads_before_and_saves_after_each_new_key(tmp_path, monkeypatch):
    calls = fake_torch_cache(monkeypatch)
    base = load_base("tiny")
    pipe = AdapterPipeline(base).optimize(dtype=torch.float32, compile=False)  # the cache's part only: no compiling
    setup = cc.Setup.of(base, pipe.adapters, "cpu", torch.float32, "fp32", "reduce-overhead")
    pipe.compile_cache = cc.CompileCache(tmp_path, setup)
    lines = []
    pipe.compile_cache.report = lines.append

    def gen(size=64, **kw):
        return pipe("a red star", steps=1, size=(size, size), seed=0, output_type="latent", progress=False, **kw)

    gen()
    gen()  # the same key: nothing loaded or saved again
    assert calls["save"] == 1 and calls["load"] == [] and len(pipe.compile_cache.events) == 1
    assert lines[0].startswith("fast mode: compiling for 64x64, 1 image") and "compiled 64x64, 1 image" in lines[1]
    gen(guidance_scale=1.0)
    pipe.generate_batch([pipe.request("a red star", steps=1, size=(64, 64), seed=0)] * 2)
    names = sorted(p.name for p in pipe.compile_cache.folder.glob("*.bin"))
    assert names == ["64x64-b1-nocfg.bin", "64x64-b1.bin", "64x64-b2-batched.bin"]

    monkeypatch.setattr(cc, "_LOADED", set())  # a new process with the same setup
    pipe.compile_cache = cc.CompileCache(tmp_path, setup)
    gen()
    assert calls["load"] == [b"artefacts-1"] and pipe.compile_cache.events[-1].status == "loaded"
    assert "loaded from" in pipe.compile_cache.events[-1].line()


def test_optimize_makes_a_cache_for_inductor_only(tmp_path, monkeypatch):
    monkeypatch.setenv(cc.ENV, str(tmp_path / "env"))
    pipe = AdapterPipeline(load_base("tiny"))
    assert pipe.optimize(dtype=torch.float32).compile_cache.root == tmp_path / "env"
    assert pipe.optimize(dtype=torch.float32, cache_dir=tmp_path / "mine").compile_cache.root == tmp_path / "mine"
    assert pipe.optimize(dtype=torch.float32, cache_dir=False).compile_cache is None
    assert pipe.optimize(dtype=torch.float32, compile=False).compile_cache is None
    other = AdapterPipeline(load_base("tiny"))
    assert other.optimize(dtype=torch.float32, backend=torch._dynamo.testing.CompileCounter()).compile_cache is None


@pytest.mark.parametrize("argv, expect", [
    (["compile", "--base", "tiny"], "--size"),
    (["compile", "--base", "tiny", "--size", "64x64", "--batch", "0"], "--batch must be at least 1"),
    (["compile", "--base", "tiny", "--size", "4x4"], "sides must be"),
    (["compile", "--base", "tiny", "--size", "64x64", "--fast", "fp9"], "invalid choice"),
    (["compile", "--base", "tiny", "--size", "64x64", "--fast", "fp8", "--device", "cpu"], "compute capability 8.9"),
    (["generate", "--base", "tiny", "--prompt", "x", "--fast", "fp8", "--device", "cpu", "--out", "x.png"],
     "compute capability 8.9"),
    (["serve", "--base", "tiny", "--fast", "fp8", "--device", "cpu"], "compute capability 8.9"),
    (["generate", "--base", "tiny", "--prompt", "x", "--aot", "--device", "cpu", "--out", "x.png"], "add --fast"),
    (["serve", "--base", "tiny", "--aot", "--device", "cpu"], "add --fast"),
])
def test_cli_errors_are_one_line_and_exit_2(argv, expect, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and len(err.splitlines()) == 1, err


def test_compile_command_then_generate_on_the_cpu(tmp_path, monkeypatch, capsys):
    """The whole command on the tiny base (dynamo traces; a no-codegen backend stands in for inductor's minutes, and
    recorders for torch's cache artefacts, which that backend has none of)."""
    from t2iadapter.generation import fast

    monkeypatch.setattr(fast, "compile_kwargs", lambda backend, mode, cudagraphs: {"backend": "eager"})
    calls = fake_torch_cache(monkeypatch)
    folder = tmp_path / "graphs"
    assert cli(["compile", "--base", "tiny", "--size", "64x64", "--device", "cpu", "--cache-dir", str(folder),
                "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "fast mode: compiling for 64x64, 1 image" in out and "fast mode: compiled 64x64, 1 image in" in out
    assert f"1 shape(s) ready in {folder}" in out and calls["save"] == 1
    png = tmp_path / "o.png"
    assert cli(["generate", "--base", "tiny", "--prompt", "a red star", "--steps", "1", "--size", "64x64", "--fast",
                "--device", "cpu", "--cache-dir", str(folder), "--threads", "1", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "fast mode: compiled graphs for 64x64, 1 image loaded from" in out and png.exists()


def broken_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler")


@pytest.mark.parametrize("backend, fake_cache, folder, expect", [
    (broken_backend, True, "graphs", "error: compiling unet, vae.decoder failed (BackendCompilerFailed"),
    ("eager", False, "graphs", "error: nothing was saved in"),  # torch gave no artefacts
], ids=["compile-failed", "nothing-to-save"])  # (a folder under a file: refused before compiling, test above)
def test_compile_command_that_leaves_nothing_usable_exits_1(backend, fake_cache, folder, expect, tmp_path, monkeypatch,
                                                          capsys):
    """It said "ready" and exited 0 when a module ran eagerly after its compile failed, or when nothing was saved."""
    from t2iadapter.generation import fast

    monkeypatch.setattr(fast, "compile_kwargs", lambda b, mode, cudagraphs: {"backend": backend})
    if fake_cache:
        fake_torch_cache(monkeypatch)
    (tmp_path / "a-file").write_text("")
    assert cli(["compile", "--base", "tiny", "--size", "64x64", "--device", "cpu", "--cache-dir",
                str(tmp_path / folder), "--threads", "1"]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expect), captured.err
    assert "ready" not in captured.out


def test_fast_v2_benchmark_smoke_run(tmp_path, monkeypatch):
    """benchmarks/bench_fast_v2.py --smoke: every phase's worker process on the CPU, the table written."""
    bench = load_script("benchmarks/bench_fast_v2.py", monkeypatch)
    out = bench.main(["--smoke", "--kinds", "inductor", "--out", str(tmp_path)])
    results = out["results"]
    assert results["first-tiny-inductor-copy"]["first_image_s"] > 0 and results["eager-tiny"]["speedup"] > 0
    assert "compute capability 8.9" in results["fp8-tinyx2"]["refused"]  # refused on the CPU, as it must be
    assert 0 <= results["iou-demo"]["bf16"]["iou"] <= 1 and "refused" in results["iou-demo"]["fp8"]
    same, one_thread = results["first-tiny-inductor-same"], results["first-tiny-inductor-same-1thread"]
    assert one_thread["compile_threads"] == "1" and same["compile_threads"] != "1"
    # the first image's seconds split by torch's timers: one dynamo tracing per compiled frame (UNet, decoder, adapter)
    assert same["tracing_s"] >= same["backend_s"] >= 0 and len(same["frames_s"]) == 3
    assert abs(sum(same["frames_s"]) - same["tracing_s"]) < 0.01
    assert same["max_px_diff_vs_eager"] < 1.0  # the compiled modules' image, against every module eager
    table = (tmp_path / "bench_fast_v2.md").read_text()
    assert "| first image, new process, copied cache folder" in table and "Machine: CPU" in table
    assert "compile threads 1" in table and "of it tracing" in table
    # one device call's part: only the fp8 rows and the bf16 graphs they compare with
    part = bench.main(["--smoke", "--part", "fp8", "--out", str(tmp_path / "fp8")])["results"]
    assert sorted(part) == ["cold-tiny-inductor", "fp8-tinyx2"] and "refused" in part["fp8-tinyx2"]
