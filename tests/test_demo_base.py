"""The demo base: SD1.5 layout within the size budget, and its training script end to end on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from t2iadapter.demo import world
from t2iadapter.demo import DemoBaseConfig, build_demo_tokenizer, scheduler_config, unet_config, vae_config
from t2iadapter.demo.architecture import text_encoder_config
from script_modules import ROOT, load_script

SCRIPT = "scripts/train_demo_base.py"


def test_shipped_architecture_fits_budget(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    cfg = DemoBaseConfig()
    tokenizer = build_demo_tokenizer(tmp_path / "tok")
    for word in world.VOCABULARY:
        assert len(tokenizer(word).input_ids) == 3, word
    with torch.device("meta"):
        vae = AutoencoderKL(**vae_config(cfg))
        unet = UNet2DConditionModel(**unet_config(cfg))
        text = CLIPTextModel(text_encoder_config(cfg, tokenizer))
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in (("vae", vae), ("unet", unet), ("text", text))}
    assert sum(counts.values()) <= 24_000_000, counts
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8 and vae.config.latent_channels == 4
    assert list(unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(unet.config.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert unet.config.sample_size * 8 == cfg.image_size == 256
    assert unet.config.cross_attention_dim == text.config.hidden_size
    assert text.config.max_position_embeddings == tokenizer.model_max_length == 77
    sched = scheduler_config()
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
    assert DemoBaseConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_smoke_training_run_loads_in_diffusers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import StableDiffusionPipeline

    module = load_script(SCRIPT, monkeypatch)
    out = tmp_path / "base"
    log = module.main(["--out", str(out), "--smoke", "--device", "cpu"])

    saved = json.loads((out / "train_log.json").read_text())
    assert saved["vae"]["steps"] == 2 and saved["unet"]["steps"] == 2
    assert np.isfinite(saved["vae"]["final_loss"]) and np.isfinite(saved["unet"]["final_loss"])
    assert saved["scaling_factor"] > 0 and saved["scaling_factor"] == log["scaling_factor"]
    assert (out / "samples.png").is_file() and (out / "demo_config.json").is_file()
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    from safetensors import safe_open

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16

    pipe = StableDiffusionPipeline.from_pretrained(
        str(out), safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    assert abs(pipe.vae.config.scaling_factor - saved["scaling_factor"]) < 1e-6
    image = pipe(
        world.generate(world.BUILTIN_SEEDS[0], 64).caption, height=64, width=64, num_inference_steps=1,
        guidance_scale=3.0, output_type="np", generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_training_resumes_across_calls_from_its_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vae → export → unet → unet → export as calls: counters, loss log and the lr schedule continue; --init-base restarts."""
    module = load_script(SCRIPT, monkeypatch)
    state = tmp_path / "state"
    common = ["--smoke", "--device", "cpu", "--state", str(state)]
    vae_log = module.main([*common, "--phase", "vae"])["vae"]["log"]
    assert vae_log and all(e["low"] >= 0 and e["topk"] >= e["l1"] for e in vae_log)  # every loss term is logged
    with pytest.raises(SystemExit, match="no trained VAE"):  # an empty state: nothing to export
        module.main(["--smoke", "--device", "cpu", "--state", str(tmp_path / "empty"), "--phase", "export",
                     "--out", str(tmp_path / "none")])  # fmt: skip
    # a VAE-only state exports too (a call that trained only the VAE brings its result back) ...
    vae_only = tmp_path / "vae-only"
    module.main([*common, "--phase", "export", "--out", str(vae_only)])
    from diffusers import AutoencoderKL

    trained_vae = torch.load(state / "vae.pt", weights_only=True)
    exported_vae = AutoencoderKL.from_pretrained(vae_only / "vae").state_dict()
    assert all(torch.equal(exported_vae[k].float(), v.half().float()) for k, v in trained_vae["vae"].items())
    assert json.loads((vae_only / "train_log.json").read_text())["unet"] == {}
    # ... and a state started from it trains its UNet from the start (no EMA of initial weights)
    from_vae = tmp_path / "from-vae-only"
    module.main(["--smoke", "--device", "cpu", "--state", str(from_vae), "--phase", "unet", "--init-base", str(vae_only)])
    fresh = torch.load(from_vae / "unet.pt", weights_only=True)
    assert (fresh["steps"], fresh["ema_n"], [e["step"] for e in fresh["log"]]) == (2, 2, [1, 2])
    first = module.main([*common, "--phase", "unet", "--plan-unet-minutes", "10"])["unet"]
    second = module.main([*common, "--phase", "unet", "--plan-unet-minutes", "10"])["unet"]
    assert (first["steps"], second["steps"]) == (2, 4) and second["call_steps"] == 2
    assert second["seconds"] > first["seconds"] and [e["step"] for e in second["log"]] == [1, 2, 3, 4]
    saved = torch.load(state / "unet.pt", weights_only=True)
    assert saved["ema_n"] == 4 and saved["opt"]["state"]  # AdamW moments survive between calls
    calls = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
    assert [c["phase"] for c in calls] == ["vae", "export", "unet", "unet"]

    out = tmp_path / "export"
    module.main([*common, "--phase", "export", "--out", str(out)])
    log = json.loads((out / "train_log.json").read_text())
    assert log["unet"]["steps"] == 4 and log["vae"]["steps"] == 2
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(out / "unet")
    ema_first = saved["ema"][0]
    assert torch.equal(next(exported.parameters()).float(), ema_first.half().float())  # the export is the EMA, fp16

    restarted = tmp_path / "restart"
    module.main(["--smoke", "--device", "cpu", "--state", str(restarted), "--phase", "unet", "--init-base", str(out)])
    again = torch.load(restarted / "unet.pt", weights_only=True)
    # the shipped base's counters and loss log carry over, so the lr plan goes on where it stopped
    assert again["steps"] == 6 and again["opt"]["state"] and [e["step"] for e in again["log"]] == [1, 2, 3, 4, 5, 6]
    assert again["seconds"] > log["unet"]["seconds"]
    assert abs(torch.load(restarted / "vae.pt", weights_only=True)["scaling_factor"] - log["scaling_factor"]) < 1e-6

    # a new state from the export that first trains the VAE further keeps the exported UNet for its UNet call
    vae_first = tmp_path / "vae-first"
    module.main(["--smoke", "--device", "cpu", "--state", str(vae_first), "--phase", "vae", "--init-base", str(out)])
    assert torch.load(vae_first / "vae.pt", weights_only=True)["steps"] == 4  # the export's 2, then 2 more
    kept = torch.load(vae_first / "unet.pt", weights_only=True)
    assert kept["steps"] == 4 and torch.equal(kept["ema"][0], ema_first.half().float())
    module.main(["--smoke", "--device", "cpu", "--state", str(vae_first), "--phase", "unet", "--init-base", str(out)])
    assert torch.load(vae_first / "unet.pt", weights_only=True)["steps"] == 6


def test_schedule_continues_across_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_script(SCRIPT, monkeypatch)
    one = module.Schedule(1.0, warmup=10, seconds=60, max_steps=0, plan_seconds=600)
    resumed = module.Schedule(1.0, warmup=10, seconds=60, max_steps=0, plan_seconds=600, before_seconds=300,
                              before_steps=1000)
    assert one.lr(0) == pytest.approx(0.1)  # warm-up by cumulative steps
    assert resumed.lr(0) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-3)  # halfway through the plan's cosine
    fresh = module.Schedule(1.0, warmup=10, seconds=60, max_steps=0, plan_seconds=600, before_seconds=300,
                            before_steps=1000, rewarm=10)  # a fresh optimiser on trained weights
    assert fresh.lr(0) == pytest.approx(resumed.lr(0) / 10, rel=1e-3)
    assert fresh.lr(9) == pytest.approx(resumed.lr(9), rel=1e-3)


def _python(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """This interpreter in a new process (the package and scripts/ importable, one thread), which must succeed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "scripts")]), OMP_NUM_THREADS="1",
               **env)  # fmt: skip
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _script_in_new_process(code: str, inductor_cache: Path) -> str:
    """Run `code` with the script imported as `m` in a fresh interpreter (torch's compile caches are per process
    and on disk: a fresh inductor folder each, so nothing leaks into this process or between the two); its log."""
    prelude = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s'); "
               "import torch; import train_demo_base as m\n")  # fmt: skip
    return _python(["-c", prelude + code], ROOT, TORCHINDUCTOR_CACHE_DIR=str(inductor_cache)).stdout


def test_compile_artefacts_travel_to_a_new_process(tmp_path: Path) -> None:
    """--compile-cache: torch's artefacts are written once compiled and read back by another process (as on the
    next machine); a bad file only warns, an absent one or no path does nothing."""
    files = tmp_path / "files"
    files.mkdir()
    saved, bad, absent = files / "compile-cache.bin", files / "bad.bin", files / "absent.bin"
    bad.write_bytes(b"not artefacts")
    _script_in_new_process(f"f = torch.compile(lambda x: (x * 2).sin(), backend='inductor'); f(torch.arange(4.0)); "
                           f"m.save_compile_cache({str(saved)!r})", tmp_path / "inductor-1")  # fmt: skip
    log = _script_in_new_process(f"m.load_compile_cache({str(saved)!r}); m.load_compile_cache({str(bad)!r}); "
                                 f"m.load_compile_cache({str(absent)!r}); m.save_compile_cache('')", tmp_path / "inductor-2")  # fmt: skip
    assert f"compile artefacts loaded from {saved}" in log
    assert f"compile artefacts in {bad} not usable" in log
    assert str(absent) not in log  # no file yet: nothing to do, no error
    assert sorted(p.name for p in files.iterdir()) == ["bad.bin", "compile-cache.bin"]  # no path given: nothing written


def test_step_profiler_writes_where_the_step_time_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_script(SCRIPT, monkeypatch)
    target = tmp_path / "profile.txt"
    prof = module.StepProfiler(str(target), first=1, steps=2)
    x = torch.randn(64, 64)
    for step in range(5):
        prof.at(step)
        torch.mm(x, x)
    text = target.read_text()
    assert "ms per step (wall, profiled steps 1-2)" in text and "aten::mm" in text
    assert text.count("aten::mm") >= 2  # in both tables, by device and by host time
    module.StepProfiler("", first=0, steps=1).at(0)  # no file asked: nothing happens


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        raise RuntimeError("no CUDA graphs in the backward here")


@pytest.mark.parametrize("fails_in", ["forward", "backward"])
def test_a_failing_compiled_unet_falls_back_and_the_call_trains_on(fails_in: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """--compile-mode reduce-overhead that fails at its first step (forward or backward): the step reruns under the
    default mode, and the call trains on; a compiled VAE encoder (fresh images, every step) that fails encodes
    eagerly from then on."""
    import dataclasses

    module = load_script(SCRIPT, monkeypatch)
    argv = ["--out", str(tmp_path / "base"), "--smoke", "--device", "cpu", "--preview-scenes", "0"]
    cfg = dataclasses.replace(module.parse_args(argv), compile=True, compile_mode="reduce-overhead", preview_scenes=0)
    assert module.parse_args([*argv, "--compile", "--compile-mode", "reduce-overhead"]).compile_mode == "default"  # smoke
    assert module.parse_args(["--out", "x", "--compile-mode", "reduce-overhead"]).compile_mode == "reduce-overhead"
    assert module.parse_args(["--out", "x"]).channels_last and not module.parse_args(["--out", "x", "--no-channels-last"]).channels_last
    with pytest.raises(SystemExit):
        module.parse_args(["--out", "x", "--compile-mode", "fastest"])
    calls: list[str] = []

    def fake_compile(model: torch.nn.Module, mode: str = "default", **_kw: object) -> object:
        if not isinstance(model, torch.nn.Module):  # the VAE encoder's posterior
            def failing(*args: object) -> object:
                calls.append("encoder")
                raise RuntimeError("no encoder graphs here")

            return failing

        def run(*args: object) -> object:
            calls.append(mode)
            if mode == "reduce-overhead" and fails_in == "forward":
                raise RuntimeError("no CUDA graphs here")
            out = model(*args)
            if mode == "reduce-overhead":
                out.sample = _FailingBackward.apply(out.sample)
            return out

        return run

    monkeypatch.setattr(module, "parse_args", lambda _argv: cfg)
    monkeypatch.setattr(torch, "compile", fake_compile)
    with caplog.at_level("INFO"):
        log = module.main(argv)
    assert [c for c in calls if c != "encoder"] == ["reduce-overhead", "default", "default"]  # the failed step reruns
    assert "compiled UNet failed; falling back to torch.compile's default mode" in caplog.text
    assert calls.count("encoder") == 1 and "compiled VAE encoder failed; encoding eagerly" in caplog.text
    assert log["unet"]["steps"] == 2 and np.isfinite(log["unet"]["final_loss"])


def _torchrun(args: list[str], cwd: Path, n: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node n` (gloo on the CPU), one thread per process."""
    return _python(["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args], cwd)


def test_ranks_average_gradients_as_one_process_on_both_batches(tmp_path: Path) -> None:
    """Two processes, each its own half of a batch: after Ranks.average_gradients both hold the gradient that one
    process computes on the whole batch (the mean loss), and Ranks.mean/broadcast agree."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, sys, torch\n"
        "import train_demo_base as m\n"
        "cfg = m.parse_args(['--out', 'x', '--device', 'cpu', '--batch-unet', '4', '--batch-vae', '2'])\n"
        "ranks, device = m.Ranks.start(cfg)\n"
        "torch.manual_seed(0)\n"
        "net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))\n"
        "x, y = torch.randn(8, 3), torch.randn(8, 2)\n"
        "share = ranks.batch(8)\n"
        "part = slice(ranks.rank * share, (ranks.rank + 1) * share)\n"
        "torch.nn.functional.mse_loss(net(x[part]), y[part]).backward()\n"
        "ranks.average_gradients(list(net.parameters()))\n"
        "mean = ranks.mean(torch.tensor([float(ranks.rank)]))\n"
        "value = ranks.broadcast(3.5 if ranks.main else -1.0)\n"
        "torch.save({'grads': [p.grad for p in net.parameters()], 'mean': mean, 'value': value}, f'rank{ranks.rank}.pt')\n"
        "ranks.finish()\n"
    )
    _torchrun([str(worker)], tmp_path)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    torch.nn.functional.mse_loss(net(x), y).backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for g, ref in zip(got["grads"], [p.grad for p in net.parameters()], strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-7)
        assert float(got["mean"]) == 0.5 and got["value"] == 3.5


def test_training_under_torchrun_keeps_ranks_in_step_and_exports_once(tmp_path: Path) -> None:
    """vae → unet → export of the smoke model with two processes: every rank ends each phase with the same
    weights (checked by the script), rank 0 alone writes the state and the export, which diffusers loads."""
    from diffusers import StableDiffusionPipeline

    state, out = tmp_path / "state", tmp_path / "base"
    script = str(ROOT / SCRIPT)
    logs = [_torchrun([script, "--smoke", "--device", "cpu", "--state", str(state), "--phase", phase], tmp_path).stderr
            for phase in ("vae", "unet")]  # fmt: skip
    assert "VAE: all 2 ranks hold the same weights" in logs[0]
    assert "UNet and text encoder: all 2 ranks hold the same weights" in logs[1]
    calls = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
    assert [c["phase"] for c in calls] == ["vae", "unet"]  # one line per call: rank 0 alone writes
    assert calls[1]["unet"]["steps"] == 2 and calls[1]["unet"]["samples_per_step"] == 2
    _torchrun([script, "--smoke", "--device", "cpu", "--state", str(state), "--phase", "export", "--out", str(out)],
              tmp_path)  # fmt: skip
    saved = json.loads((out / "train_log.json").read_text())
    assert saved["unet"]["steps"] == 2 and saved["processes"] == 2
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    assert abs(pipe.vae.config.scaling_factor - saved["scaling_factor"]) < 1e-6
