"""`t2iadapter train` with `kind: controlnet` (issue 16): the loss falls, resume is exact, the output loads in our
pipeline and in diffusers' ControlNet pipeline."""
from pathlib import Path

import numpy as np
import pytest
import torch

from t2iadapter.bases import load_base
from t2iadapter.errors import ConfigError
from t2iadapter.train.config import load_config
from t2iadapter.train.loop import Trainer
from train_probe import first_batch, fixed_loss

ROOT = Path(__file__).resolve().parents[1]
CONTROLNET = ["adapter.kind=controlnet", "adapter.condition=sketch", "adapter.in_channels=1", "data.resolution=64"]


pytestmark = pytest.mark.usefixtures("one_thread")


def config(out, *extra):
    return load_config(ROOT / "configs" / "tiny-cpu.yaml", [*CONTROLNET, *extra, f"output_dir={out}"])


def test_controlnet_training_lowers_the_loss_and_loads_everywhere(base, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from PIL import Image

    from t2iadapter.pipeline import AdapterPipeline

    cfg = config(tmp_path, "data.num_samples=2", "recipe.batch_size=2", "recipe.lr=2e-3", "recipe.max_steps=16",
                 "recipe.timesteps=uniform", "recipe.cache_latents=true", "recipe.cache_text=true", "checkpoint.every=0",
                 "validation.every=16", "validation.steps=2")
    trainer = Trainer(cfg, base=base)
    net = trainer.model.adapters["sketch"].controlnet
    assert sum(p.numel() for p in net.parameters()) > 0 and all(p.requires_grad for p in net.parameters())
    assert not any(p.requires_grad for p in base.unet.parameters())
    batch = first_batch(trainer, 2)
    before = fixed_loss(trainer, batch, 3)
    result = trainer.run()
    after = fixed_loss(trainer, batch, 3)
    assert after < 0.95 * before, (before, after)
    assert (tmp_path / "controlnet.safetensors").is_file() and (tmp_path / "validation").is_dir()
    folder = tmp_path / "controlnet-diffusers"
    sketch = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8), "L")
    cn = ControlNetModel.from_pretrained(folder)
    assert cn.config.conditioning_channels == 1
    ours = AdapterPipeline(base, controlnets={"sketch": folder})("a red star", {"sketch": sketch}, steps=2, seed=0,
                                                               size=(64, 64), output_type="np", progress=False).images[0]
    ref = StableDiffusionControlNetPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                            unet=base.unet, controlnet=cn, scheduler=base.scheduler, safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
    x = torch.from_numpy(np.asarray(sketch, dtype=np.float32) / 255.0)[None, None]  # a PIL image would become RGB
    ref = ref("a red star", image=x, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0),
              output_type="np").images[0]
    assert np.abs(ours - ref).max() <= 1e-4
    assert result.losses and len(result.losses) == 16


def test_controlnet_resume_is_exact(base, tmp_path):
    from safetensors.torch import load_file

    extra = ("data.num_samples=4", "recipe.batch_size=1", "recipe.lr=1e-3", "recipe.max_steps=6", "checkpoint.every=3",
             "recipe.ema_decay=0.8", "recipe.grad_clip=1.0", "recipe.warmup_steps=2", "recipe.schedule=cosine",
             "recipe.text_dropout=0.3", "log_every=1")
    straight = Trainer(config(tmp_path / "a", *extra), base=base).run()
    first = Trainer(config(tmp_path / "b", *extra), base=base).run(stop_at=3)
    second = Trainer(config(tmp_path / "b", *extra), base=base).run(resume="latest")
    assert second.resumed_from.name == "step-00000003" and second.step == 6
    assert first.losses + second.losses == straight.losses
    wa, wb = load_file(tmp_path / "a" / "controlnet.safetensors"), load_file(tmp_path / "b" / "controlnet.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_controlnet_config_checks(tmp_path):
    with pytest.raises(ConfigError, match="trains alone"):
        load_config(None, ["adapters=[{kind: controlnet, condition: sketch}, {kind: full, condition: depth}]",
                           "fuser={}"])


def test_sdxl_controlnet_step_with_gradient_checkpointing():
    """An SDXL ControlNet gets the pooled text and time ids too; recomputing activations changes no gradient."""
    base = load_base("tiny-xl")
    grads = []
    for checkpointing in (False, True):
        cfg = config("unused", "base=tiny-xl", "recipe.batch_size=1", "checkpoint.every=0",
                     f"recipe.gradient_checkpointing={checkpointing}")
        trainer = Trainer(cfg, base=base)
        batch = first_batch(trainer, 1)
        trainer.micro_loss(batch).backward()
        grads.append([p.grad.clone() for p in trainer.params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert any(g.abs().sum() > 0 for g in grads[1])


def test_controlnet_spec_refuses_adapter_layout_fields():
    """`kind: controlnet` silently ignored channels, num_res_blocks and options (a misspelt key included)."""
    from t2iadapter.errors import ConfigError
    from t2iadapter.train.config import AdapterSpec

    for extra in ({"channels": (32, 64)}, {"num_res_blocks": 1}, {"options": {"conditioning_chanels": 3}}):
        with pytest.raises(ConfigError, match="controlnet takes its layout from the base UNet; drop"):
            AdapterSpec(kind="controlnet", condition="sketch", **extra)
    assert AdapterSpec(kind="controlnet", condition="depth", in_channels=3).in_channels == 3
