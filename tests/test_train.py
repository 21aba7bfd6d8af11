"""`t2iadapter train` on the tiny base: the loss falls, CoAdapter joint training, recipe pieces, config and CLI."""
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from t2iadapter.errors import ConfigError
from t2iadapter.formats import load_adapter
from t2iadapter.train.config import load_config
from t2iadapter.train.loop import Trainer, condition_keep, sample_timesteps, training_target
from train_probe import first_batch, fixed_loss

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_cubic_timesteps_match_the_paper():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps("cubic", 400_000, 1000, g).float()
    assert t.min() >= 0 and t.max() <= 999
    assert abs((t / 1000).mean().item() - 0.75) < 0.003  # E[1 - u³] = 3/4
    assert abs((t > 500).float().mean().item() - 0.5 ** (1 / 3)) < 0.003  # P(u < 2^(-1/3)) ≈ 0.794
    u = sample_timesteps("uniform", 100_000, 1000, g).float()
    assert abs((u / 1000).mean().item() - 0.5) < 0.005
    c = sample_timesteps("cosine", 100_000, 1000, g).float()
    assert abs((c / 1000).mean().item() - 2 / torch.pi) < 0.005


def test_v_prediction_target_is_the_velocity():
    sched = DDPMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 250, 600, 999])
    v = training_target(sched, x0, eps, t)
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, abar.sqrt() * eps - (1 - abar).sqrt() * x0)
    torch.testing.assert_close(v, sched.get_velocity(x0, eps, t))
    eps_sched = DDPMScheduler.from_config({**sched.config, "prediction_type": "epsilon"})
    assert training_target(eps_sched, x0, eps, t) is eps


def test_coadapter_condition_dropout_frequencies():
    from t2iadapter.train.config import RecipeConfig

    g, names, r = torch.Generator().manual_seed(1), ["sketch", "depth", "color"], RecipeConfig()
    draws = [condition_keep(names, r, g) for _ in range(20_000)]
    frac_all = sum(len(d) == 3 for d in draws) / len(draws)  # 0.1 + 0.8 · 0.5³
    frac_none = sum(len(d) == 0 for d in draws) / len(draws)  # 0.1 + 0.8 · 0.5³
    assert abs(frac_all - 0.2) < 0.015 and abs(frac_none - 0.2) < 0.015
    assert abs(sum("depth" in d for d in draws) / len(draws) - 0.5) < 0.015


def test_training_lowers_the_loss(base, tmp_path):
    cfg = load_config(TINY, ["data.num_samples=2", "recipe.batch_size=2", "recipe.lr=5e-3", "recipe.max_steps=30",
                             "recipe.timesteps=uniform", "recipe.cache_latents=true", "recipe.cache_text=true",
                             "checkpoint.every=0", f"output_dir={tmp_path}"])
    trainer = Trainer(cfg, base=base)
    batch = first_batch(trainer, 2)
    before = fixed_loss(trainer, batch, 4)
    result = trainer.run()
    after = fixed_loss(trainer, batch, 4)
    assert after < 0.93 * before, (before, after)  # deterministic: 1.136 → 1.037 here
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < first, (first, last)
    assert (tmp_path / "adapter.safetensors").is_file() and (tmp_path / "adapter-diffusers" / "config.json").is_file()
    assert load_adapter(tmp_path / "adapter.safetensors").config == trainer.model.adapters["sketch"].config
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))


def test_coadapter_joint_training_saves_adapters_and_fuser(base, tmp_path):
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "recipe.max_steps=4", "checkpoint.every=0", "log_every=2",
                             "recipe.lr=1e-3", "recipe.batch_size=1"])
    data = {**cfg.to_dict(), "adapters": [{"kind": "full", "condition": "sketch", "in_channels": 1},
                                         {"kind": "full", "condition": "depth", "in_channels": 3},
                                         {"kind": "light", "condition": "color", "in_channels": 3}],
            "fuser": {"num_heads": 4}}
    from t2iadapter.train.config import from_dict

    cfg = from_dict(data)
    assert cfg.text_dropout == 0.5  # DESIGN.md §6
    trainer = Trainer(cfg, base=base)
    fuser0 = {k: v.clone() for k, v in trainer.model.fuser.state_dict().items()}
    result = trainer.run()
    assert result.step == 4 and len(result.losses) == 4
    for stem, kind in (("adapter-sketch", "full"), ("adapter-depth", "full"), ("adapter-color", "light"), ("fuser", "fuser")):
        assert load_adapter(tmp_path / f"{stem}.safetensors").kind == kind
    fuser1 = load_adapter(tmp_path / "fuser.safetensors").state_dict()
    assert any(not torch.equal(fuser0[k], fuser1[k]) for k in fuser0)


def test_style_adapter_trains_on_precomputed_tokens(base, tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    (tmp_path / "data" / "style").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (80, 64), (40 * i, 90, 200)).save(tmp_path / "data" / f"{i}.png")
        (tmp_path / "data" / f"{i}.txt").write_text("a red circle")
        save_file({"last_hidden_state": torch.randn(1, 5, 16)}, str(tmp_path / "data" / "style" / f"{i}.safetensors"))
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'out'}", "recipe.max_steps=2", "checkpoint.every=0",
                             "data.kind=folder", f"data.path={tmp_path / 'data'}", "data.conditions={style: style}",
                             "data.num_samples=null", "adapter.kind=style", "adapter.condition=style",
                             "adapter.options={width: 16, num_heads: 2, num_layers: 1, num_tokens: 4}"])
    result = Trainer(cfg, base=base).run()
    assert result.step == 2
    assert load_adapter(tmp_path / "out" / "adapter.safetensors").kind == "style"
    assert not (tmp_path / "out" / "adapter-diffusers").exists()  # diffusers has no style adapter


def test_corrupt_samples_are_skipped_and_counted(base, tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    (root / "cond").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 64), (60 * i, 100, 30)).save(root / f"{i}.png")
        Image.new("L", (64, 64), 255 * (i % 2)).save(root / "cond" / f"{i}.png")
    (root / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    Image.new("L", (64, 64)).save(root / "cond" / "3.png")
    (root / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a red circle"}\n')
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'out'}", "recipe.max_steps=4", "recipe.batch_size=2",
                             "checkpoint.every=0", "data.kind=folder", f"data.path={root}",
                             "data.conditions={sketch: cond}", "data.num_samples=null"])
    result = Trainer(cfg, base=base).run()
    assert result.step == 4
    assert result.skipped == 2  # 8 draws over 2 epochs of 4 files: the broken one, once per epoch


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\nrecipe:\n  lr: 1e-4\n  learning_rate: 3\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        load_config(TINY, ["nope=1"])
    with pytest.raises(ConfigError, match="ambiguous"):
        load_config(TINY, ["every=3"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(TINY, ["max_steps=many"])
    with pytest.raises(ConfigError, match="timesteps"):
        load_config(TINY, ["recipe.timesteps=quadratic"])
    with pytest.raises(ConfigError, match="fuser"):
        load_config(TINY, ["adapters=[{condition: sketch}, {condition: depth}]", "adapter=null"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    assert load_config(TINY, ["recipe.lr=1e-4"]).recipe.lr == 1e-4  # YAML 1.1 would read "1e-4" as a string
    # values that reached torch or the DataLoader before anything named them (tracebacks, exit 1)
    for override, words in (("data.conditions={sketch: 3}", "data.conditions maps"), ("data.num_samples=-3", "num_samples"),
                            ("data.num_workers=-1", "num_workers"), ("recipe.weight_decay=-1", "weight_decay"),
                            ("recipe.warmup_steps=-2", "warmup_steps"), ("recipe.betas=[1.5, 0.9]", r"betas must be .* \[0, 1\)"),
                            ("recipe.betas=[0.9, 1]", "betas must be"), ("recipe.betas=[a, 0.9]", "betas needs two numbers"),
                            ("recipe.max_minutes=-1", "max_minutes must be > 0"), ("recipe.max_minutes=0", "max_minutes")):
        with pytest.raises(ConfigError, match=words):
            load_config(TINY, [override])
    # validation that could never render: no grid and no word at every step, or an error only at the first grid
    for override, words in ((["validation.every=5", "validation.world_seeds=[]"], "nothing to render"),
                            (["validation.seeds=[a]"], "seeds must be a list of integers"),
                            (["validation.world_seeds=[-1]"], "world_seeds must be")):
        with pytest.raises(ConfigError, match=words):
            load_config(TINY, override)


def test_cli_train_and_its_errors(tmp_path, capsys):
    from t2iadapter.cli import main

    assert main(["train", "--config", str(TINY), "--set", "max_steps=3", "--set", f"output_dir={tmp_path}",
                 "--set", "checkpoint.every=2", "--set", "grad_accumulation=2", "--set", "validation.every=3"]) == 0
    out = capsys.readouterr().out
    assert "trained to step 3" in out and (tmp_path / "adapter.safetensors").is_file()
    assert (tmp_path / "validation" / "step-00000003.png").is_file()  # condition | base | with adapter
    # a resume takes a longer run and other checkpoint/validation settings, not another recipe
    assert main(["train", "--config", str(TINY), "--max-steps", "5", "--output-dir", str(tmp_path), "--resume"]) == 2
    assert "was written with another config: recipe.grad_accumulation 2 → 1" in capsys.readouterr().err
    assert main(["train", "--config", str(TINY), "--max-steps", "4", "--output-dir", str(tmp_path), "--resume",
                 "--set", "grad_accumulation=2", "--set", "checkpoint.every=1"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert main(["train", "--config", str(TINY), "--set", "recipe.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key(s) bogus in recipe") and err.count("\n") == 1


@pytest.mark.parametrize("name", ["tiny-cpu", "sd15-sketch", "sdxl-canny"])
def test_example_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.recipe.timesteps == "cubic"
    if name == "sdxl-canny":
        assert (cfg.recipe.mixed_precision, cfg.recipe.grad_clip, cfg.recipe.batch_size, cfg.recipe.grad_accumulation) == \
            ("fp16", 1.0, 1, 4)
    if name == "sd15-sketch":
        assert (cfg.recipe.mixed_precision, cfg.recipe.batch_size, cfg.recipe.lr) == ("bf16", 8, 1e-5)


@pytest.mark.parametrize("base, size", [("tiny", 64), ("tiny-xl", 128)])
def test_no_resolution_trains_at_the_bases_own_size_and_the_run_records_it(base, size, tmp_path):
    """It was 512 whatever the base: a tiny base ran 64x the pixels it was made for (25 s a CPU step, not 0.2)."""
    import json

    adapter = "full" if base == "tiny" else "full_xl"
    cfg = load_config(None, [f"base={base}", f"adapter.kind={adapter}", f"output_dir={tmp_path}", "max_steps=1",
                             "batch_size=1", "checkpoint.every=0", "data.num_samples=1"])
    assert cfg.data.resolution is None
    trainer = Trainer(cfg)
    assert trainer.config.data.resolution == size and trainer.stream[0]["pixels"].shape[-1] == size
    trainer.run()
    assert json.loads((tmp_path / "train_config.json").read_text())["data"]["resolution"] == size


def test_train_command_says_what_it_trains_before_the_first_step(tmp_path, capsys):
    from t2iadapter.cli import main as cli

    assert cli(["train", "--set", "max_steps=1", "--set", "batch_size=1", "--set", "checkpoint.every=0",
                "--set", "data.num_samples=1", "--output-dir", str(tmp_path / "run")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == ("training full sketch adapter (0.23M parameters) on tiny (a random test base, for smoke runs), "
                     f"cpu; data world (the demo world's scenes) at 64x64; 1 step of batch 1; no checkpoints "
                     f"in {tmp_path / 'run'} (--resume continues)")


def test_force_starts_over_and_a_resume_then_continues_the_new_run(tmp_path, capsys):
    """--force kept the earlier run's checkpoints: they counted as newer than the new run's (whose own were pruned
    at once) and a later --resume continued the earlier run, silently."""
    from t2iadapter.cli import main

    common = ["train", "--config", str(TINY), "--output-dir", str(tmp_path), "--set", "checkpoint.keep=2",
              "--set", "batch_size=1", "--set", "data.num_samples=4"]
    assert main([*common, "--max-steps", "8", "--set", "checkpoint.every=4"]) == 0
    assert main([*common, "--max-steps", "3", "--set", "checkpoint.every=1", "--set", "recipe.lr=0.01", "--force"]) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    capsys.readouterr()
    assert main([*common, "--max-steps", "5", "--set", "checkpoint.every=1", "--set", "recipe.lr=0.01", "--resume"]) == 0
    assert f"trained to step 5 (resumed from {tmp_path / 'checkpoints' / 'step-00000003'})" in capsys.readouterr().out


def test_a_section_with_every_key_commented_out_is_its_defaults(tmp_path):
    """YAML reads such a section as null; it ended in AttributeError tracebacks (validation, data)."""
    from t2iadapter.train import load_config
    from t2iadapter.train.config import DataConfig, ValidationConfig

    path = tmp_path / "c.yaml"
    path.write_text("base: tiny\nadapters:\n  - {kind: full, condition: sketch, in_channels: 1}\nvalidation:\n"
                    "  # every: 20\ndata:\nfuser:\n")
    config = load_config(path, [])
    assert config.validation == ValidationConfig() and config.data == DataConfig() and config.fuser is None


def test_no_stale_or_empty_diffusers_folder_when_diffusers_cannot_express_the_adapter(tmp_path):
    """A ksize-3 adapter has no diffusers form: a fresh run left an empty adapter-diffusers/, a --force run the
    earlier run's (another adapter's weights beside this run's adapter.safetensors)."""
    from t2iadapter.cli import main

    common = ["train", "--config", str(TINY), "--output-dir", str(tmp_path), "--max-steps", "1",
              "--set", "checkpoint.every=0", "--set", "batch_size=1", "--set", "data.num_samples=1"]
    assert main(common) == 0 and (tmp_path / "adapter-diffusers" / "config.json").is_file()
    assert main([*common, "--set", "adapter.options={ksize: 3}", "--force"]) == 0
    assert (tmp_path / "adapter.safetensors").is_file() and not (tmp_path / "adapter-diffusers").exists()
    fresh = tmp_path / "fresh"
    common[4] = str(fresh)
    assert main([*common, "--set", "adapter.options={ksize: 3}"]) == 0 and not (fresh / "adapter-diffusers").exists()


def test_style_adapter_trains_with_the_style_extractor_on_the_fly(base, tmp_path, monkeypatch):
    """`adapter.extractor: style` gives [1, L, width] tokens per image (CLIPVisionModel's last_hidden_state); they were
    stacked to [B, 1, L, width] and the first step failed ('style adapter takes CLIP-vision tokens [N, L, ...]')."""
    from PIL import Image

    import t2iadapter.extractors

    monkeypatch.setattr(t2iadapter.extractors, "get", lambda name, **kw: lambda image: torch.randn(1, 5, 16))
    (tmp_path / "data").mkdir()
    for i in range(2):
        Image.new("RGB", (80, 64), (40 * i, 90, 200)).save(tmp_path / "data" / f"{i}.png")
        (tmp_path / "data" / f"{i}.txt").write_text("a red circle")
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'out'}", "recipe.max_steps=1", "checkpoint.every=0",
                             "data.kind=folder", f"data.path={tmp_path / 'data'}", "data.num_samples=null",
                             "adapter.kind=style", "adapter.condition=style", "adapter.extractor=style",
                             "adapter.options={width: 16, num_heads: 2, num_layers: 1, num_tokens: 4}"])
    trainer = Trainer(cfg, base=base)
    assert first_batch(trainer, 2)["conditions"]["style"].shape == (2, 5, 16)
    assert trainer.run().step == 1


def test_force_deletes_the_earlier_runs_files_and_nothing_else(tmp_path):
    """--force deleted only the checkpoints: a two-adapter run's adapter-sketch/adapter-color files stayed beside a
    later single adapter's adapter.safetensors, and its TensorBoard events mixed with the new run's curves."""
    import json

    from t2iadapter.cli import main

    two = tmp_path.parent / f"{tmp_path.name}-two.yaml"
    two.write_text(TINY.read_text().replace("adapter:\n  kind: full\n  condition: sketch        # the world renders "
                                            "exact sketches\n  in_channels: 1\n",
                                            "adapters:\n  - {kind: full, condition: sketch, in_channels: 1}\n"
                                            "  - {kind: light, condition: color}\nfuser: {}\n"))
    common = ["train", "--output-dir", str(tmp_path), "--max-steps", "1",
              "--set", "checkpoint.every=0", "--set", "batch_size=1", "--set", "data.num_samples=1"]
    assert main([*common, "--config", str(two)]) == 0
    earlier = set(json.loads((tmp_path / "train_summary.json").read_text())["outputs"])
    assert {"adapter-sketch.safetensors", "adapter-color.safetensors"} <= earlier
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / "logs" / "events.old").write_text("the earlier run's curve")
    (tmp_path / "validation").mkdir(exist_ok=True)
    (tmp_path / "validation" / "step-00000001.png").write_bytes(b"grid")
    (tmp_path / "notes.txt").write_text("the user's own file")
    assert main([*common, "--config", str(TINY), "--force"]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert not any(name.startswith(("adapter-sketch", "adapter-color")) for name in names), names
    assert "adapter.safetensors" in names and (tmp_path / "notes.txt").read_text() == "the user's own file"
    assert not (tmp_path / "logs" / "events.old").exists() and not (tmp_path / "validation").exists()
    assert set(json.loads((tmp_path / "train_summary.json").read_text())["outputs"]) == {
        "adapter.safetensors", "adapter-diffusers"}


def test_two_processes_log_the_loss_of_the_whole_batch(tmp_path):
    """Under torchrun (two CPU processes, gloo) each step's logged loss is the mean of both processes' losses (the
    global batch the gradients follow), on every rank; it was the main process's half alone."""
    import json
    import os
    import subprocess
    import sys

    worker = tmp_path / "worker.py"
    worker.write_text(
        "import json, sys, torch\n"
        "from t2iadapter.bases import load_base\n"
        "from t2iadapter.train.config import load_config\n"
        "from t2iadapter.train.loop import Trainer\n"
        "torch.set_num_threads(1)\n"
        f"cfg = load_config({str(TINY)!r}, ['data.resolution=64', 'data.num_samples=8', 'recipe.batch_size=1',\n"
        f"                  'recipe.max_steps=4', 'log_every=2', 'output_dir={tmp_path / 'run'}'])\n"
        "trainer = Trainer(cfg, base=load_base('tiny'))\n"
        "own, data, real = [], [], trainer.train_step\n"
        "def step(micro):\n"
        "    data.append(micro[0]['index'].tolist())\n"
        "    metrics = real(micro)\n"
        "    own.append(float(metrics['loss']))\n"
        "    return metrics\n"
        "trainer.train_step = step\n"
        "result = trainer.run()\n"
        "rank = trainer.accelerator.process_index\n"
        "json.dump({'own': own, 'logged': result.losses, 'data': data}, open(f'rank{rank}.json', 'w'))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(worker)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["data"] != ranks[1]["data"] and ranks[0]["own"] != ranks[1]["own"]  # each its own half
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["own"], ranks[1]["own"], strict=True)]
    for r in ranks:
        assert r["logged"] == pytest.approx(mean, rel=1e-6, abs=1e-7)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["last_loss"] == pytest.approx(mean[-1], rel=1e-6)
