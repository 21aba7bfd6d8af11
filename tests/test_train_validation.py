"""Mid-run validation (issue 12): EMA on and off, one adapter and a CoAdapter; training goes on after it."""
import logging
from pathlib import Path

import pytest
import torch

from t2iadapter.train.config import from_dict, load_config
from t2iadapter.train.loop import Trainer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
COADAPTER = {"adapters": [{"kind": "full", "condition": "sketch", "in_channels": 1},
                          {"kind": "light", "condition": "color", "in_channels": 3}],
             "fuser": {"num_heads": 4}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("coadapter", [False, True], ids=["single", "coadapter"])
@pytest.mark.parametrize("ema", [None, 0.9], ids=["ema-off", "ema-on"])
def test_mid_run_validation_renders_and_training_goes_on(base, tmp_path, caplog, ema, coadapter):
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "recipe.max_steps=3", "checkpoint.every=0", "recipe.batch_size=1",
                             "validation.every=1", "validation.steps=2", f"recipe.ema_decay={'null' if ema is None else ema}"])
    if coadapter:
        cfg = from_dict({**cfg.to_dict(), **COADAPTER})
    trainer = Trainer(cfg, base=base)
    live = {k: (m.training, {n: p.requires_grad for n, p in m.named_parameters()}, next(m.parameters()).dtype)
            for k, m in trainer.model.named_children()}
    with caplog.at_level(logging.WARNING):
        result = trainer.run()
    assert result.step == 3 and len(result.losses) == 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    for step in (1, 2, 3):  # validation after steps 1 and 2 is mid-run: the next step trains the same modules
        assert (tmp_path / "validation" / f"step-{step:08d}.png").is_file()
    after = {k: (m.training, {n: p.requires_grad for n, p in m.named_parameters()}, next(m.parameters()).dtype)
             for k, m in trainer.model.named_children()}
    assert after == live  # validation left the live modules as they were


def test_a_failed_validation_is_an_error_with_its_reason(base, tmp_path, caplog, monkeypatch):
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "recipe.max_steps=1", "checkpoint.every=0", "validation.every=1",
                             "validation.steps=1"])
    trainer = Trainer(cfg, base=base)

    def broken(*_a, **_k):
        raise RuntimeError("the grid broke")

    monkeypatch.setattr("t2iadapter.train.validation.render_grid", broken)
    with caplog.at_level(logging.WARNING):
        assert trainer.run().step == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "the grid broke" in errors[0].getMessage() and "validation" in errors[0].getMessage()


def test_cli_train_with_mid_run_validation_and_ema_off(tmp_path, capsys):
    """The issue's reproduction: `t2iadapter train --config configs/tiny-cpu.yaml --set validation.every=5`."""
    from t2iadapter.cli import main

    assert main(["train", "--config", str(TINY), "--set", "validation.every=5", "--set", "max_steps=6",
                 "--set", "checkpoint.every=0", "--set", f"output_dir={tmp_path}"]) == 0
    assert "trained to step 6" in capsys.readouterr().out
    assert (tmp_path / "validation" / "step-00000005.png").is_file()


def test_a_style_adapters_grid_shows_it(base, tmp_path, caplog):
    """A style adapter's grid: its tokens (a `.safetensors` as it trains on) were never handed to the pipeline, so the
    'with adapter' column equalled the base's; a token file as the validation condition was an error."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    (tmp_path / "data" / "style").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (80, 64), (40 * i, 90, 200)).save(tmp_path / "data" / f"{i}.png")
        save_file({"last_hidden_state": torch.randn(1, 5, 16)}, str(tmp_path / "data" / "style" / f"{i}.safetensors"))
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'out'}", "recipe.max_steps=1", "checkpoint.every=0",
                             "data.kind=folder", f"data.path={tmp_path / 'data'}", "data.conditions={style: style}",
                             "data.num_samples=null", "adapter.kind=style", "adapter.condition=style",
                             "adapter.options={width: 16, num_heads: 2, num_layers: 1, num_tokens: 4}",
                             "validation.every=1", "validation.steps=2", "validation.world_seeds=[]",
                             "validation.prompts=[a red circle]",
                             f"validation.conditions=[{tmp_path / 'data' / 'style' / '0.safetensors'}]"])
    with caplog.at_level(logging.WARNING):
        assert Trainer(cfg, base=base).run().step == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    grid = np.asarray(Image.open(tmp_path / "out" / "validation" / "step-00000001.png")).astype(int)
    assert grid.shape == (64, 192, 3)
    assert np.abs(grid[:, 64:128] - grid[:, 128:]).max() > 0  # base alone | with the style tokens
