"""scripts/ship_demo.py: stages, checks and replaces the shipped demo; every refusal is one line and exit 2."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from t2iadapter import assets
from script_modules import load_script

SCRIPT = "scripts/ship_demo.py"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An exported base (the shipped v1 one plus an export's extra files), its adapters, a ControlNet file."""
    from safetensors.torch import save_file

    from t2iadapter.generation.controlnet import METADATA_KEY, controlnet_from_unet, read_single_file
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("ship-inputs")
    base = root / "export"
    shutil.copytree(assets.DEMO / "base", base)
    (base / "samples.png").write_bytes(b"not shipped")
    (base / "train_log.json").write_text("{}")
    adapters = root / "adapters"
    shutil.copytree(assets.DEMO / "adapters", adapters)
    torch.manual_seed(0)
    cn = controlnet_from_unet(UNet2DConditionModel.from_pretrained(base / "unet"), conditioning_channels=1)
    controlnets = root / "controlnets"
    controlnets.mkdir()
    state = {k: v.to(torch.float16).contiguous() for k, v in cn.state_dict().items()}
    save_file(state, str(controlnets / "controlnet-sketch.safetensors"),
              {"format": "pt", METADATA_KEY: json.dumps(dict(cn.config))})  # fmt: skip
    read_single_file(controlnets / "controlnet-sketch.safetensors")  # the file is one the package reads
    return {"base": base, "adapters": adapters, "controlnets": controlnets}


def _argv(inputs: dict[str, Path], dest: Path, *extra: str) -> list[str]:
    return ["--base", str(inputs["base"]), "--adapters", str(inputs["adapters"]), "--dest", str(dest), *extra]


def test_ships_the_files_checked_and_replaces_only_with_force(inputs: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # fmt: skip
    module = load_script(SCRIPT, monkeypatch)
    dest = tmp_path / "assets" / "demo"
    assert module.main(_argv(inputs, dest, "--controlnets", str(inputs["controlnets"]))) == 0
    shipped = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert "base/samples.png" not in shipped and "base/train_log.json" not in shipped
    assert "controlnets/controlnet-sketch.safetensors" in shipped
    assert {f"adapters/{n}.safetensors" for n in module.ADAPTERS} <= set(shipped)
    for rel in shipped:  # byte for byte what was handed in
        top, rest = rel.split("/", 1)
        src = {"base": inputs["base"], "adapters": inputs["adapters"], "controlnets": inputs["controlnets"]}[top] / rest
        assert (dest / rel).read_bytes() == src.read_bytes(), rel
    out = capsys.readouterr().out
    total = sum((dest / rel).stat().st_size for rel in shipped)
    assert f"{total / 2**20:8.2f} MiB  in all (budget 96 MiB)" in out

    marker = dest / "adapters" / "sketch.safetensors"
    before = marker.read_bytes()
    assert module.main(_argv(inputs, dest)) == 2  # exists, no --force: untouched
    assert "exists; pass --force" in capsys.readouterr().err and marker.read_bytes() == before
    assert module.main(_argv(inputs, dest, "--force")) == 0  # replaced: no ControlNets this time
    assert not (dest / "controlnets").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["demo"]  # no staging folder left behind


def test_refusals_leave_the_shipped_demo_alone(inputs: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # fmt: skip
    from safetensors import safe_open
    from safetensors.torch import save_file

    module = load_script(SCRIPT, monkeypatch)
    dest = tmp_path / "demo"
    assert module.main(_argv(inputs, dest)) == 0
    capsys.readouterr()
    snapshot = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}

    def refused(argv: list[str]) -> str:
        assert module.main(argv) == 2
        assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == snapshot
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ")
        return err

    assert "over the 10 MiB budget" in refused(_argv(inputs, dest, "--force", "--budget-mib", "10"))

    partial = tmp_path / "partial"
    shutil.copytree(inputs["adapters"], partial)
    (partial / "pose.safetensors").unlink()
    assert "lacks pose.safetensors" in refused(["--base", str(inputs["base"]), "--adapters", str(partial),
                                                "--dest", str(dest), "--force"])  # fmt: skip

    wide = tmp_path / "wide"
    shutil.copytree(inputs["adapters"], wide)
    with safe_open(str(wide / "seg.safetensors"), "pt") as f:
        tensors, meta = {k: f.get_tensor(k).float() for k in f.keys()}, f.metadata()
    save_file(tensors, str(wide / "seg.safetensors"), meta)
    assert "adapters/seg.safetensors holds" in refused(["--base", str(inputs["base"]), "--adapters", str(wide),
                                                         "--dest", str(dest), "--force"])  # fmt: skip

    assert "is not an exported demo base" in refused(["--base", str(inputs["adapters"]), "--adapters",
                                                       str(inputs["adapters"]), "--dest", str(dest), "--force"])  # fmt: skip
    pickled = tmp_path / "pickled"
    shutil.copytree(inputs["base"], pickled)
    (pickled / "unet" / "extra.bin").write_bytes(b"x")
    assert "pickled weights would ship" in refused(["--base", str(pickled), "--adapters", str(inputs["adapters"]),
                                                    "--dest", str(dest), "--force"])  # fmt: skip
