"""The demo base: SD1.5 layout within the size budget, and its training script end to end on a CPU."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from t2iadapter.demo import world
from t2iadapter.demo import DemoBaseConfig, build_demo_tokenizer, scheduler_config, unet_config, vae_config
from t2iadapter.demo.architecture import text_encoder_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_base.py"


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

    spec = importlib.util.spec_from_file_location("train_demo_base", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
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


def _load_script(monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("train_demo_base", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_training_resumes_across_calls_from_its_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vae → unet → unet → export as four calls: counters, loss log and the lr schedule continue; --init-base restarts."""
    module = _load_script(monkeypatch)
    state = tmp_path / "state"
    common = ["--smoke", "--device", "cpu", "--state", str(state)]
    vae_log = module.main([*common, "--phase", "vae"])["vae"]["log"]
    assert vae_log and all(e["low"] >= 0 and e["topk"] >= e["l1"] for e in vae_log)  # every loss term is logged
    with pytest.raises(SystemExit):  # no UNet trained yet: nothing to export
        module.main([*common, "--phase", "export", "--out", str(tmp_path / "none")])
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
    kept = torch.load(vae_first / "unet.pt", weights_only=True)
    assert kept["steps"] == 4 and torch.equal(kept["ema"][0], ema_first.half().float())
    module.main(["--smoke", "--device", "cpu", "--state", str(vae_first), "--phase", "unet", "--init-base", str(out)])
    assert torch.load(vae_first / "unet.pt", weights_only=True)["steps"] == 6


def test_schedule_continues_across_calls() -> None:
    spec = importlib.util.spec_from_file_location("train_demo_base_sched", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        one = module.Schedule(1.0, warmup=10, seconds=60, max_steps=0, plan_seconds=600)
        resumed = module.Schedule(1.0, warmup=10, seconds=60, max_steps=0, plan_seconds=600, before_seconds=300,
                                  before_steps=1000)
        assert one.lr(0) == pytest.approx(0.1)  # warm-up by cumulative steps
        assert resumed.lr(0) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-3)  # halfway through the plan's cosine
        fresh = module.Schedule(1.0, warmup=10, seconds=60, max_steps=0, plan_seconds=600, before_seconds=300,
                                before_steps=1000, rewarm=10)  # a fresh optimiser on trained weights
        assert fresh.lr(0) == pytest.approx(resumed.lr(0) / 10, rel=1e-3)
        assert fresh.lr(9) == pytest.approx(resumed.lr(9), rel=1e-3)
    finally:
        del sys.modules[spec.name]


def test_compile_artefacts_are_written_and_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """--compile-cache: torch's artefacts are written once compiled, read back by torch, and a bad file only warns."""
    module = _load_script(monkeypatch)
    saved = tmp_path / "compile-cache.bin"
    compiled = torch.compile(lambda x: (x * 2).sin(), backend="inductor")
    compiled(torch.arange(4.0))
    module.save_compile_cache(str(saved))
    caplog.set_level(logging.INFO, logger="train_demo_base")
    module.load_compile_cache(str(saved))
    assert "compile artefacts loaded" in caplog.text
    caplog.clear()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not artefacts")
    module.load_compile_cache(str(bad))
    assert "not usable" in caplog.text
    module.load_compile_cache(str(tmp_path / "absent.bin"))  # no file yet: nothing to do, no error
    module.save_compile_cache("")  # no path given: nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.bin", "compile-cache.bin"]


def test_step_profiler_writes_where_the_step_time_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _load_script(monkeypatch)
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
