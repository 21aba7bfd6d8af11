"""`t2iadapter generate` with --init-image/--strength/--mask/--paste-back/--lora (issue 15): runs, and mistakes exit 2."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2iadapter.cli import main as cli
from t2iadapter.pngmeta import read_parameters as read_png


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    image, small_mask, mask = tmp_path / "in.png", tmp_path / "small.png", tmp_path / "mask.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 16:48] = 255
    Image.fromarray(m).save(mask)
    Image.fromarray(m[:32, :32]).save(small_mask)
    return {"image": image, "mask": mask, "small": small_mask, "dir": tmp_path}


def generate(f, *extra):
    return ["generate", "--base", "tiny", "--prompt", "a red star", "--steps", "2", "--seed", "1",
            "--out", str(f["dir"] / "out.png"), *extra]


CASES = {
    "strength 0": (lambda f: generate(f, "--init-image", str(f["image"]), "--strength", "0"), "strength must be in (0, 1]"),
    "strength 1.5": (lambda f: generate(f, "--init-image", str(f["image"]), "--strength", "1.5"), "(0, 1]"),
    "strength without image": (lambda f: generate(f, "--strength", "0.5"), "--strength needs --init-image"),
    "mask without image": (lambda f: generate(f, "--mask", str(f["mask"])), "--mask needs --init-image"),
    "mask of another size": (lambda f: generate(f, "--init-image", str(f["image"]), "--mask", str(f["small"])),
                             "--mask is 32x32 but --init-image is 64x64"),
    "missing init image": (lambda f: generate(f, "--init-image", str(f["dir"] / "nope.png")), "does not exist"),
    # the steps asked for, not int(steps·strength): "30 steps: LCMScheduler refuses them; use fewer steps" for --steps 60
    "lcm steps from an image": (lambda f: generate(f, "--init-image", str(f["image"]), "--strength", "0.5", "--scheduler",
                                                   "lcm", "--steps", "60"), "60 steps: LCMScheduler refuses them"),
    "missing lora": (lambda f: generate(f, "--lora", str(f["dir"] / "nope.safetensors") + ":0.5"), "LoRA"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mistake_is_one_line_exit_2(name, files, capsys):
    argv, mention = CASES[name]
    with pytest.raises(SystemExit) as raised:
        raise SystemExit(cli(argv(files)))
    assert raised.value.code == 2, name
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert mention in err, err
    assert not (files["dir"] / "out.png").exists()


def test_img2img_and_inpainting_write_pngs(files):
    assert cli(generate(files, "--init-image", str(files["image"]), "--strength", "0.5")) == 0
    params = read_png(files["dir"] / "out.png")
    assert params["strength"] == 0.5 and params["init_image"] == str(files["image"])
    assert cli(generate(files, "--init-image", str(files["image"]), "--mask", str(files["mask"]), "--paste-back",
                        "--scheduler", "lcm", "--guidance", "1", "--force")) == 0
    out = np.asarray(Image.open(files["dir"] / "out.png"))
    keep = np.asarray(Image.open(files["mask"])) == 0
    assert (out == np.asarray(Image.open(files["image"])))[keep].all()
