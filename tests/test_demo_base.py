"""The demo base: SD1.5 layout within the size budget, and its training script end to end on a CPU."""

from __future__ import annotations

import importlib.util
import json
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
