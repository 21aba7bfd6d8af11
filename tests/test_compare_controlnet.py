"""Adapter vs ControlNet tooling (issue 16, item 4): our single ControlNet file, `demo/controlnet-sketch`,
ControlNet settings in `t2iadapter eval`, the trainer's samples/s and peak memory, the training script's compare
phase and the comparison benchmark. Tiny seeded models only; no weights are committed."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from t2iadapter import assets
from t2iadapter.bases import load_base, tiny_adapter_config
from t2iadapter.cli import main as cli
from t2iadapter.demo import world
from t2iadapter.errors import MissingWeightsError
from t2iadapter.evaluation import metrics
from t2iadapter.evaluation.controllability import Row, Setting, condition_of, default_settings, score
from t2iadapter.generation.controlnet import controlnet_from_unet, load_controlnet
from t2iadapter.pipeline import AdapterPipeline
from t2iadapter.train.controlnet import TrainableControlNet
from t2iadapter.train.throughput import Meter
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def acting_controlnet(base, seed, channels=1):
    """A ControlNet from the base UNet (as trained), its zero convs given random weights so that it acts."""
    torch.manual_seed(seed)
    cn = controlnet_from_unet(base.unet, base.vae_scale_factor, conditioning_channels=channels).eval()
    with torch.no_grad():
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0, 0.3)
            conv.bias.normal_(0, 0.1)
    return cn


# ------------------------------------------------------------------ files and demo names


def test_our_single_controlnet_file_round_trips_and_keeps_fp16(base, tmp_path):
    cn = acting_controlnet(base, 0)
    path = TrainableControlNet(cn).to(torch.float16).save_file(tmp_path / "controlnet-sketch.safetensors")
    loaded = load_controlnet(path)
    want = {k: v.half() for k, v in cn.state_dict().items()}
    got = loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert loaded.dtype == torch.float16 and loaded.config.conditioning_channels == 1
    assert tuple(loaded.config.block_out_channels) == tuple(cn.config.block_out_channels)


def test_demo_controlnet_resolves_when_shipped_and_says_so_when_not(base, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(assets, "DEMO_CONTROLNETS", tmp_path / "controlnets")
    assert assets.demo_controlnet_names() == []
    with pytest.raises(MissingWeightsError, match=r"no demo ControlNet named 'controlnet-sketch' \(shipped: none"):
        load_controlnet("demo/controlnet-sketch")
    assert cli(["eval", "--base", "tiny", "--controlnet", "controlnet-sketch=demo/controlnet-sketch", "--scenes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no demo ControlNet named 'controlnet-sketch'") and "\n" not in err

    cn = acting_controlnet(base, 1)
    TrainableControlNet(cn).to(torch.float16).save_file(tmp_path / "controlnets" / "controlnet-sketch.safetensors")
    assert assets.demo_controlnet_names() == ["controlnet-sketch"]
    pipe = AdapterPipeline(base, controlnets=["demo/controlnet-sketch"])
    assert list(pipe.controlnets) == ["controlnet-sketch"]
    loaded = pipe.controlnets["controlnet-sketch"].state_dict()
    assert all(torch.equal(loaded[k], v.half().float()) for k, v in cn.state_dict().items())


# ------------------------------------------------------------------ evaluation


def test_condition_of_names_and_controlnet_settings():
    assert [condition_of(n) for n in ("controlnet-sketch", "cn_depth", "my.pose.net", "controlnet")] == \
        ["sketch", "depth", "pose", None]
    names = [s.name for s in default_settings(["sketch", "color"], False, ["controlnet-sketch", "controlnet"])]
    assert names == ["text only", "sketch", "color", "controlnet-sketch", "sketch+color (sum)", "sketch, window 0–0.5"]
    assert Setting("x", ("sketch",), controlnets=("cn-color",)).conditions() == {"sketch": "sketch", "cn-color": "color"}


def test_score_treats_a_controlnet_like_the_adapter_of_its_condition():
    """Pose: IoU inside the persons' boxes; colour: palette error; sketch: neither special case."""
    scene = next(world.generate(s, 128) for s in world.EVAL_SEEDS if any(o.kind == "person" for o in world.generate(s, 128).objects))
    image = np.asarray(world.generate(scene.seed + 1, 128).image)
    rows = {}
    for setting in (Setting("pose", ("pose",)), Setting("cn-pose", controlnets=("cn-pose",)),
                    Setting("color", ("color",)), Setting("cn-color", controlnets=("cn-color",)),
                    Setting("cn-sketch", controlnets=("cn-sketch",))):
        rows[setting.name] = Row(setting)
        score(setting, image, scene, rows[setting.name])
    assert rows["cn-pose"].values == rows["pose"].values
    assert rows["cn-color"].values == rows["color"].values and rows["cn-color"].values["palette_error"]
    assert rows["cn-sketch"].values["palette_error"] == []
    assert rows["cn-sketch"].values["structure_iou"] == [metrics.structure_iou(image, scene)]


def test_eval_routes_the_condition_through_the_controlnet(base, tmp_path):
    """`t2iadapter eval --controlnet` scores the image AdapterPipeline makes with that ControlNet and the scene's sketch."""
    cn = acting_controlnet(base, 2)
    path = TrainableControlNet(cn).save_file(tmp_path / "controlnet-sketch.safetensors")
    out = tmp_path / "eval.json"
    assert cli(["eval", "--base", "tiny", "--controlnet", str(path), "--scenes", "1", "--steps", "2",
                "--only", "text only", "--only", "controlnet-sketch", "--json", str(out)]) == 0
    rows = {r["setting"]: r for r in json.loads(out.read_text())}
    scene = world.generate(world.EVAL_SEEDS.start)
    call = dict(steps=2, guidance_scale=5.0, seed=scene.seed, size=(scene.size, scene.size), progress=False)
    with_cn = AdapterPipeline(base, controlnets={"c": cn})(scene.caption, {"c": scene.sketch}, **call).image
    plain = AdapterPipeline(base)(scene.caption, **call).image
    assert np.abs(np.asarray(with_cn, np.float32) - np.asarray(plain, np.float32)).max() > 10  # the ControlNet acts
    for name, image in (("controlnet-sketch", with_cn), ("text only", plain)):
        row = rows[name]
        assert row["structure_iou"] == pytest.approx(metrics.structure_iou(image, scene), abs=1e-12)
        assert row["edge_f1"] == pytest.approx(metrics.edge_f1(image, scene), abs=1e-12)
        assert row["spurious_foreground"] == pytest.approx(metrics.spurious_foreground(image, scene), abs=1e-12)
        assert row["colour_accuracy"] == pytest.approx(metrics.colour_accuracy(image, scene, region="image"), abs=1e-12)
    assert rows["controlnet-sketch"]["palette_error"] is None and rows["text only"]["palette_error"] is not None
    assert rows["controlnet-sketch"]["structure_iou"] != rows["text only"]["structure_iou"]


def test_eval_includes_the_shipped_demo_controlnet_by_default(tmp_path, monkeypatch):
    """With the demo base, a ControlNet under assets/demo/controlnets joins the table; a fresh one (zero convs, as
    training starts) adds exact zeros, so its row equals text only."""
    demo_unet = load_base("demo").unet
    monkeypatch.setattr(assets, "DEMO_CONTROLNETS", tmp_path)
    TrainableControlNet(controlnet_from_unet(demo_unet, 8, conditioning_channels=1)).to(torch.float16).save_file(
        tmp_path / "controlnet-sketch.safetensors")
    out = tmp_path / "eval.json"
    assert cli(["eval", "--scenes", "1", "--steps", "2", "--only", "text only", "--only", "controlnet-sketch",
                "--json", str(out)]) == 0
    rows = {r["setting"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"text only", "controlnet-sketch"}
    for key in ("structure_iou", "edge_f1", "spurious_foreground", "colour_accuracy"):
        assert rows["controlnet-sketch"][key] == rows["text only"][key]
    assert cli(["eval", "--base", "tiny", "--controlnet", str(tmp_path / "controlnet-sketch.safetensors"), "--scenes", "1",
                "--controlnet", "net=x"]) == 2  # a name without a condition


# ------------------------------------------------------------------ training: samples/s and peak memory


def test_meter_samples_per_second_from_marks():
    meter = Meter(first_step=10, samples_per_step=8, start=100.0)
    meter.mark(20, 110.0)
    meter.mark(40, 120.0)
    r = meter.result(45, 125.0)
    assert (r.steps, r.samples, r.seconds) == (35, 280, 25.0)
    assert r.samples_per_second == pytest.approx(280 / 25) and r.steady_samples_per_second == pytest.approx(20 * 8 / 10)
    one = Meter(0, 4, 0.0)
    one.mark(5, 1.0)
    assert one.result(5, 2.0).steady_samples_per_second is None and Meter(3, 4, 0.0).result(3, 1.0).samples_per_second is None


def test_loss_curve_is_means_over_equal_step_ranges():
    from t2iadapter.train.throughput import loss_curve

    losses = [float(v) for v in range(1, 11)]  # steps 11..20 of a resumed run
    assert loss_curve(losses, last_step=20, points=4) == [
        {"first_step": 11, "last_step": 12, "loss": 1.5},
        {"first_step": 13, "last_step": 15, "loss": 4.0},
        {"first_step": 16, "last_step": 17, "loss": 6.5},
        {"first_step": 18, "last_step": 20, "loss": 9.0},
    ]
    assert loss_curve([2.0, 4.0], last_step=2, points=20) == [
        {"first_step": 1, "last_step": 1, "loss": 2.0}, {"first_step": 2, "last_step": 2, "loss": 4.0}]
    assert loss_curve([], last_step=0) == []


def test_trainer_writes_samples_per_second_and_peak_memory(base, tmp_path, capsys):
    from t2iadapter.train.config import load_config
    from t2iadapter.train.loop import Trainer

    overrides = ["adapter.kind=controlnet", "data.resolution=64", "data.num_samples=4", "recipe.batch_size=2",
                 "recipe.grad_accumulation=2", "recipe.max_steps=3", "checkpoint.every=2", "log_every=1",
                 f"output_dir={tmp_path}"]
    trainer = Trainer(load_config(ROOT / "configs" / "tiny-cpu.yaml", overrides), base=base)
    result = trainer.run(stop_at=2)
    first = json.loads((tmp_path / "train_summary.json").read_text())
    assert (first["steps"], first["samples"], first["step"]) == (2, 2 * 2 * 2, 2)
    assert first["samples_per_second"] == pytest.approx(first["samples"] / first["loop_seconds"])
    assert first["samples_per_second"] == pytest.approx(result.throughput.samples_per_second)
    assert first["peak_memory_gib"] is None and first["device"] == "cpu" and first["kinds"] == {"sketch": "controlnet"}
    assert first["trainable_parameters"] == sum(p.numel() for p in trainer.model.adapters["sketch"].controlnet.parameters())
    assert first["last_loss"] == result.losses[-1] and first["loop_seconds"] <= first["run_seconds"]
    assert first["loss_curve"] == [{"first_step": i + 1, "last_step": i + 1, "loss": loss} for i, loss in enumerate(result.losses)]
    resumed = Trainer(load_config(ROOT / "configs" / "tiny-cpu.yaml", overrides), base=base).run(resume="latest")
    second = json.loads((tmp_path / "train_summary.json").read_text())
    assert (second["steps"], second["samples"], second["step"]) == (1, 4, 3) and resumed.step == 3
    assert second["loss_curve"] == [{"first_step": 3, "last_step": 3, "loss": resumed.losses[0]}]  # this run's steps
    assert cli(["train", "--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "--set", "max_steps=1", "--set",
                "data.resolution=64", "--output-dir", str(tmp_path / "cli")]) == 0
    assert " samples/s" in capsys.readouterr().out and (tmp_path / "cli" / "train_summary.json").is_file()


# ------------------------------------------------------------------ the training script's compare phase


class _Done:
    """What `launch` returns in the test: a finished process with the train command's exit status."""

    def __init__(self, rc):
        self.rc = rc

    def wait(self):
        return self.rc


def test_training_script_compare_phase_is_fair_and_writes_what_ships(tmp_path, monkeypatch):
    """The adapter and the ControlNet get the same config but for the kind; fp16 files; the log carries both summaries."""
    script = load_script("scripts/train_demo_adapters.py", monkeypatch)
    order = []

    def launch(cfg, out):  # in-process `t2iadapter train` instead of a subprocess (same config file and flags)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg))
        (out / "train.log").write_text("trained to step 3 (in-process)\n")
        order.append(out.name)
        return _Done(cli(["train", "--config", str(out / "config.json"), "--force"]))

    monkeypatch.setattr(script, "launch", launch)
    out = tmp_path / "demo"
    log = script.main(["--base", "tiny", "--out", str(out), "--smoke", "--controlnet-sketch", "--phases", "compare"])
    assert order == ["sketch", "controlnet-sketch"]  # one after the other, each alone
    cfgs = {n: json.loads((out / "runs" / n / "config.json").read_text()) for n in order}
    kinds = {n: cfgs[n]["adapter"].pop("kind") for n in order}
    assert kinds == {"sketch": "full", "controlnet-sketch": "controlnet"}
    for cfg in cfgs.values():
        cfg.pop("output_dir")
    assert cfgs["sketch"] == cfgs["controlnet-sketch"]  # same data, resolution, batch, recipe, budget

    shipped = load_controlnet(out / "controlnets" / "controlnet-sketch.safetensors")
    trained = load_controlnet(out / "runs" / "controlnet-sketch" / "controlnet.safetensors")
    assert shipped.dtype == torch.float16
    assert all(torch.equal(shipped.state_dict()[k], v.half()) for k, v in trained.state_dict().items())
    assert (out / "adapters" / "sketch.safetensors").is_file() and not (out / "adapters" / "seg.safetensors").exists()
    for name in order:
        summary = json.loads((out / "runs" / name / "train_summary.json").read_text())
        assert log["compare"]["runs"][name] == summary and summary["samples"] == 3 * 2
    assert json.loads((out / "adapters_log.json").read_text())["compare"] == log["compare"]
    curves = (out / "loss_curves.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in curves[2:]] == ["| sketch", "| controlnet-sketch"]
    sketch_curve = log["summaries"]["sketch"]["loss_curve"]  # 3 steps: the 10 columns repeat its 3 points
    assert curves[2].split(" | ")[2] == f"{sketch_curve[0]['loss']:.4f}" and curves[2].split(" | ")[-2] == f"{sketch_curve[-1]['loss']:.4f}"
    with pytest.raises(SystemExit):
        script.main(["--base", "tiny", "--out", str(out), "--smoke", "--phases", "compare"])  # needs --controlnet-sketch


# ------------------------------------------------------------------ the comparison benchmark


def test_comparison_table_format(monkeypatch):
    bench = load_script("benchmarks/compare_adapter_controlnet.py", monkeypatch)
    rows = {s: {"structure_iou": iou, "edge_f1": f1, "spurious_foreground": 0.01, "colour_accuracy": 0.5}
            for s, iou, f1 in (("text only", 0.1, 0.2), ("sketch", 0.6, 0.7), ("controlnet-sketch", 0.65, 0.75))}
    results = {"setup": {"base": "b", "size": 256, "steps": 25, "guidance": 5.0},
               "quality": {"scenes": 3, "seeds": [1, 3], "source": "s", "rows": rows},
               "parameters": {"sketch": 1_234_567, "controlnet-sketch": 6_207_312, "unet": 12_974_756},
               "timing": {"CPU": {"text only": 2000.0, "sketch": 2012.4, "controlnet-sketch": 2900.0}},
               "training": {"minutes": 4, "runs": {
                   "sketch": {"samples_per_second": 900.0, "samples": 216000, "loop_seconds": 240.2, "peak_memory_gib": 3.5,
                              "device": "GPU", "batch_size": 48},
                   "controlnet-sketch": {"samples_per_second": 450.26, "samples": 108000, "loop_seconds": 239.9,
                                         "peak_memory_gib": 7.25}}}}
    table = bench.format_table(results)
    for line in ("| structure IoU | 0.100 | 0.600 | 0.650 |", "| parameters | – | 1.23M (1,234,567) | 6.21M (6,207,312) |",
                 "| ms/image, CPU (text only; extra) | 2000 | +12 | +900 |",
                 "| training samples/s (GPU, each alone for 4 min) | – | 900.0 | 450.3 |",
                 "| samples seen (batch 48) | – | 216,000 in 240 s | 108,000 in 240 s |",
                 "| training peak GPU memory, GiB | – | 3.50 | 7.25 |"):
        assert line in table, line
    assert "means over 3 held-out scenes, seeds 1–3" in table and "base UNet: 12.97M" in table


def test_comparison_benchmark_smoke_with_a_merged_gpu_row(tmp_path, monkeypatch):
    bench = load_script("benchmarks/compare_adapter_controlnet.py", monkeypatch)
    gpu = {"timing": {"NVIDIA H200, fast mode (optimize())": {"text only": 100.0, "sketch": 101.0, "controlnet-sketch": 150.0}}}
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    merged = bench.main(["--smoke", "--threads", "1", "--json", str(tmp_path / "cpu.json"), "--merge", str(tmp_path / "gpu.json"),
                         "--out", str(tmp_path / "table.md")])
    table = (tmp_path / "table.md").read_text()
    own = json.loads((tmp_path / "cpu.json").read_text())
    tiny = load_base("tiny")
    from t2iadapter.models import build_adapter

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert own["parameters"] == {"sketch": count(build_adapter(tiny_adapter_config(tiny, 1))),
                                 "controlnet-sketch": count(controlnet_from_unet(tiny.unet, 8, conditioning_channels=1)),
                                 "unet": count(tiny.unet)}
    (cpu_label, cpu), = own["timing"].items()
    assert cpu_label.endswith("1 thread, eager fp32") and "-core CPU" in cpu_label
    assert f"| ms/image, {cpu_label} (text only; extra) | {cpu['text only']:.0f} | " in table
    assert "| ms/image, NVIDIA H200, fast mode (optimize()) (text only; extra) | 100 | +1 | +50 |" in table
    assert set(merged["timing"]) == {cpu_label, "NVIDIA H200, fast mode (optimize())"}
    runs = own["training"]["runs"]
    assert runs["sketch"]["samples"] == runs["controlnet-sketch"]["samples"] == 4  # 2 steps × batch 2, from the logs
    assert f"| {runs['sketch']['samples_per_second']:.1f} | {runs['controlnet-sketch']['samples_per_second']:.1f} |" in table
    assert set(own["quality"]["rows"]) == {"text only", "sketch", "controlnet-sketch"} and own["quality"]["scenes"] == 1
