"""The embedded demo model: shipped weights load everywhere, `eval` and `demo` run end to end."""
import json

import numpy as np
import pytest
import torch

from t2iadapter import assets, load_adapter
from t2iadapter.cli import main as cli
from t2iadapter.evaluation.controllability import Row, Setting, format_table, merge_summaries


def test_shipped_demo_weights_are_small_fp16_and_load():
    files = list(assets.DEMO.rglob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    assert total <= 64 * 2**20
    names = assets.demo_adapter_names()
    assert {"sketch", "seg", "depth", "pose", "color", "fuser"} <= set(names)
    kinds = {n: load_adapter(f"demo/{n}") for n in names}
    assert kinds["color"].kind == "light" and kinds["fuser"].kind == "fuser" and kinds["sketch"].config.in_channels == 1
    assert all(m.dtype == torch.float16 for m in kinds.values())


def test_eval_command_on_held_out_scenes(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli(["eval", "--scenes", "1", "--steps", "2", "--only", "text only", "--only", "sketch",
                "--only", "sketch+color (fuser)", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["setting"] for r in rows] == ["text only", "sketch", "sketch+color (fuser)"]
    for r in rows:
        assert 0.0 <= r["structure_iou"] <= 1.0 and 0.0 <= r["colour_accuracy"] <= 1.0
        assert 0.0 <= r["edge_f1"] <= 1.0 and 0.0 <= r["spurious_foreground"] <= 1.0 and r["n_edge_f1"] == 1
    assert rows[2]["palette_error"] is not None
    assert "| sketch |" in capsys.readouterr().out
    assert cli(["eval", "--scenes", "0"]) == 2


def test_demo_command_writes_grid_and_table(tmp_path, capsys):
    assert cli(["demo", "--out", str(tmp_path), "--scenes", "1", "--steps", "2"]) == 0
    assert (tmp_path / "demo_grid.png").is_file() and (tmp_path / "controllability.md").is_file()
    assert "structure IoU" in capsys.readouterr().out
    # a second run keeps them unless told (it overwrote them, and other files of those names, silently)
    (tmp_path / "controllability.md").write_text("mine")
    assert cli(["demo", "--out", str(tmp_path), "--scenes", "1", "--steps", "2"]) == 2
    assert "already holds demo_grid.png, controllability.md" in capsys.readouterr().err
    assert (tmp_path / "controllability.md").read_text() == "mine"
    assert cli(["demo", "--out", str(tmp_path), "--scenes", "1", "--steps", "1", "--force"]) == 0
    assert "structure IoU" in (tmp_path / "controllability.md").read_text()


def test_merged_summaries_weight_by_counts():
    a, b = Row(Setting("x")), Row(Setting("x"))
    a.values.update(structure_iou=[1.0], edge_f1=[0.9], colour_accuracy=[1.0], seconds_per_image=[1.0])
    b.values.update(structure_iou=[0.0, 0.0, 0.5], edge_f1=[0.1, 0.2, 0.3], spurious_foreground=[0.01, 0.02, 0.03],
                    colour_accuracy=[0.0, 0.0, 0.0], palette_error=[0.2], seconds_per_image=[2.0, 2.0, 2.0])
    merged = merge_summaries([[a.summary()], [b.summary()]])[0]
    assert merged["structure_iou"] == pytest.approx(np.mean([1.0, 0.0, 0.0, 0.5]))
    assert merged["edge_f1"] == pytest.approx(np.mean([0.9, 0.1, 0.2, 0.3])) and merged["n_edge_f1"] == 4
    assert merged["spurious_foreground"] == pytest.approx(0.02) and merged["n_spurious_foreground"] == 3
    assert merged["palette_error"] == pytest.approx(0.2) and merged["scenes"] == 4
    assert merged["seconds_per_image"] == pytest.approx(7.0 / 4)
    assert "| x | 0.375 | 0.375 | 2% | 25% | 0.200 | 1.750 |" in format_table([merged])


def test_training_time_budget_stops_early(tmp_path):
    assert cli(["train", "--config", "configs/tiny-cpu.yaml", "--set", "max_minutes=1e-9", "--set", "max_steps=40",
                "--set", "checkpoint.every=0", "--output-dir", str(tmp_path)]) == 0
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert steps == ["step-00000001"]  # log_every=1: the budget is checked after the first step
    assert (tmp_path / "adapter.safetensors").is_file()


def test_readme_python_example_runs_with_default_dtype():
    from t2iadapter import AdapterPipeline

    pipe = AdapterPipeline.from_pretrained("demo", adapters={"sketch": "demo/sketch", "color": "demo/color"},
                                           fuser="demo/fuser")
    dtypes = {m.dtype for m in pipe.base.modules.values()} | {m.dtype for m in pipe.modules_to_move()}
    assert dtypes == {torch.float32}  # fp16 files and transformers' file-dtype default are unified
    result = pipe("a large blue star left of a large cyan triangle",
                  conditions={"sketch": "examples/sketch.png", "color": "examples/palette.png"},
                  weights={"sketch": 1.0, "color": 0.8}, windows={"color": (0.0, 0.5)}, compose="fuser",
                  steps=2, seed=1, size=(256, 256), scheduler="dpm++2m", progress=False)
    assert result.image.size == (256, 256) and result.parameters["compose"] == "fuser"


def test_eval_refuses_an_adapter_it_would_not_score(tmp_path, capsys):
    # a PATH named otherwise (my-sketch-v2.safetensors) was loaded and silently left out of the table
    assert cli(["eval", "--adapter", str(tmp_path / "my-sketch-v2.safetensors"), "--scenes", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--adapter my-sketch-v2: eval scores an adapter by the condition it takes" in err[0]


def test_batched_evaluation_scores_what_one_by_one_does():
    """`eval --batch N` (GPU evaluation of hundreds of scenes) runs a setting's scenes through generate_batch: each
    scene keeps its own prompt, conditions, seed, weights and window; images equal the unbatched ones to rounding."""
    from t2iadapter.demo import world
    from t2iadapter.demo.loading import demo_pipeline
    from t2iadapter.errors import ConfigError
    from t2iadapter.evaluation.controllability import default_settings, evaluate

    torch.set_num_threads(1)
    pipe = demo_pipeline(device="cpu")
    settings = [s for s in default_settings(pipe.spatial_names, True, {})
                if s.name in ("text only", "sketch", "sketch+color (fuser)", "sketch, window 0–0.5")]
    assert len(settings) == 4
    scenes = [world.generate(s) for s in range(world.EVAL_SEEDS.start, world.EVAL_SEEDS.start + 3)]
    one, one_images = evaluate(pipe, scenes, settings, steps=2, progress=False, keep_images=True)
    batched, batched_images = evaluate(pipe, scenes, settings, steps=2, progress=False, keep_images=True, batch=2)
    for name in one_images:
        assert len(batched_images[name]) == 3
        for a, b in zip(one_images[name], batched_images[name]):
            assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 2, name
    scenes_differ = np.abs(np.asarray(one_images["sketch"][0], np.int16) - np.asarray(one_images["sketch"][1], np.int16))
    assert scenes_differ.mean() > 10  # each scene is its own, not the batch's first
    for r1, r2 in zip(one, batched):
        for key in ("structure_iou", "colour_accuracy", "spurious_foreground"):
            assert r1.summary()[key] == pytest.approx(r2.summary()[key], abs=0.01), (r1.setting.name, key)
    with pytest.raises(ConfigError, match="batch"):
        evaluate(pipe, scenes, settings, batch=0)


def test_eval_uses_the_fuser_it_is_given_with_the_demo_adapters(tmp_path, capsys):
    # with the demo base and no --adapter, --fuser was ignored: the shipped fuser was scored under its name
    missing = tmp_path / "my-fuser.safetensors"
    assert cli(["eval", "--fuser", str(missing), "--scenes", "1", "--steps", "1", "--only", "text only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]


def test_eval_only_refuses_a_name_that_matches_no_setting(capsys):
    # "--only sketch --only skech" evaluated sketch alone and left the misspelt row out without a word
    assert cli(["eval", "--scenes", "1", "--steps", "1", "--only", "sketch", "--only", "skech"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--only 'skech' matches no setting" in err[0] and "'sketch'" in err[0]
