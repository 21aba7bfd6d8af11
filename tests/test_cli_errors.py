"""Every mistake a user can make on the command line: exit 2, one line on stderr, no traceback, no file touched."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2iadapter.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny-cpu.yaml")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """An input image, an existing output image, a plain file, an empty folder and an earlier training run."""
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    existing = tmp_path / "existing.png"
    existing.write_bytes(b"not to be overwritten")
    plain = tmp_path / "plain.txt"
    plain.write_text("a file, not a folder")
    folder = tmp_path / "folder"
    folder.mkdir()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    table = tmp_path / "table.json"
    table.write_text("[]")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    two = tmp_path / "two.jsonl"
    two.write_text('{"prompt": "a"}\n{"prompt": "b", "num_images": "two"}\n')
    poses = {}  # OpenPose JSON with one bad value each: 18 keypoints, the first one's x replaced
    for name, first_x, canvas in (("neg", "100", -5), ("nan", "NaN", 64), ("huge", "1e30", 64)):
        poses[f"pose {name}"] = tmp_path / f"{name}.json"
        keypoints = ", ".join([f"{first_x}, 10, 1"] + ["10, 10, 1"] * 17)
        poses[f"pose {name}"].write_text(
            f'{{"people": [{{"pose_keypoints_2d": [{keypoints}]}}], "canvas_width": {canvas}, "canvas_height": 64}}')
    return {"image": image, "existing": existing, "plain": plain, "folder": folder, "run": run, "table": table,
            "binary": binary, "two": two, **poses}


# name → (argv from the files, what the one line must mention)
CASES: dict[str, tuple[Callable[[dict[str, Path]], list[str]], str]] = {
    "typo in the command": (lambda f: ["generat"], "invalid choice"),
    "unknown option": (lambda f: ["info", "demo/sketch", "--bogus"], "unrecognized"),
    "extract over an existing file": (lambda f: ["extract", "canny", str(f["image"]), str(f["existing"])], "--force"),
    "extract into a folder": (lambda f: ["extract", "canny", str(f["image"]), str(f["folder"])], "folder"),
    "extract into a file's child": (lambda f: ["extract", "canny", str(f["image"]), str(f["plain"] / "x.png")], "does not exist"),
    "extract to an unknown suffix": (lambda f: ["extract", "canny", str(f["image"]), str(f["folder"] / "out.xyz")], ".xyz"),
    "extract IN a folder": (lambda f: ["extract", "canny", str(f["folder"]), str(f["folder"] / "o.png")], "is a folder"),
    "extract --output-dir a file": (lambda f: ["extract", "canny", "--input-dir", str(f["image"].parent), "--output-dir", str(f["plain"])], "is a file"),
    "extract --output-dir under a file": (lambda f: ["extract", "canny", "--input-dir", str(f["image"].parent), "--output-dir", str(f["plain"] / "out")], "plain.txt is a file"),
    "extract pose-json not JSON": (lambda f: ["extract", "pose-json", str(f["plain"]), str(f["folder"] / "o.png")], "plain.txt: not valid JSON"),
    "extract pose-json negative canvas": (lambda f: ["extract", "pose-json", str(f["pose neg"]), str(f["folder"] / "o.png")], "canvas_width must be a whole number of pixels from 1 to 4096, got -5"),
    "extract pose-json NaN keypoint": (lambda f: ["extract", "pose-json", str(f["pose nan"]), str(f["folder"] / "o.png")], "NaN or infinite"),
    "extract pose-json huge keypoint": (lambda f: ["extract", "pose-json", str(f["pose huge"]), str(f["folder"] / "o.png")], "beyond ±100000 pixels"),
    "extract pose-json --width huge": (lambda f: ["extract", "pose-json", str(f["pose neg"]), str(f["folder"] / "o.png"), "--width", "99999"], "--width, --height <= 4096"),
    "extract depth --device bogus": (lambda f: ["extract", "depth", str(f["image"]), str(f["folder"] / "o.png"), "--device", "bogus"], "unknown device 'bogus'"),
    "extract sketch --device cuda without CUDA": (lambda f: ["extract", "sketch", str(f["image"]), str(f["folder"] / "o.png"), "--device", "cuda:7"], "cuda:7"),
    "convert into a file's child": (lambda f: ["convert", "demo/color", str(f["plain"] / "c.safetensors")], "plain.txt"),
    "convert to a folder format over a file": (lambda f: ["convert", "demo/sketch", str(f["existing"])], "is a file"),
    "convert to a folder format over a file, --force": (lambda f: ["convert", "demo/sketch", str(f["existing"]), "--force"], "is a file"),
    "export-base over a file": (lambda f: ["export-base", "tiny", str(f["existing"])], "is a file"),
    "train --config a folder": (lambda f: ["train", "--config", str(f["folder"])], "is a folder"),
    "eval --out a folder": (lambda f: ["eval", "--out", str(f["folder"])], "folder"),
    "eval --json an existing file": (lambda f: ["eval", "--json", str(f["table"])], "--force"),
    "eval --first-seed negative": (lambda f: ["eval", "--first-seed", "-5"], "--first-seed"),
    "train lr nan": (lambda f: ["train", "--config", TINY, "--set", "recipe.lr=.nan", "--output-dir", str(f["folder"] / "o")], "finite"),
    "train checkpoint.keep -1": (lambda f: ["train", "--config", TINY, "--set", "checkpoint.keep=-1"], "checkpoint.keep"),
    "train checkpoint.every -5": (lambda f: ["train", "--config", TINY, "--set", "checkpoint.every=-5"], "checkpoint.every"),
    "train --output-dir a file": (lambda f: ["train", "--config", TINY, "--output-dir", str(f["plain"])], "is a file"),
    "train over an earlier run": (lambda f: ["train", "--config", TINY, "--output-dir", str(f["run"])], "--resume"),
    "generate --condition NAME=PATH": (lambda f: ["generate", "--prompt", "x", "--adapter", "sketch=demo/sketch", "--condition", f"sketch={f['image']}", "--out", str(f["folder"] / "o.png")], "conditions take no NAME="),
    "generate --adapter FUSER": (lambda f: ["generate", "--prompt", "x", "--adapter", "demo/fuser", "--condition", str(f["image"]), "--out", str(f["folder"] / "o.png")], "--fuser to generate"),
    "generate --mask without --init-image": (lambda f: ["generate", "--prompt", "x", "--mask", str(f["image"]), "--out", str(f["folder"] / "o.png")], "--mask needs --init-image"),
    "generate --guidance -1": (lambda f: ["generate", "--prompt", "x", "--guidance", "-1", "--out", str(f["folder"] / "o.png")], "--guidance must be"),
    "generate --out a folder": (lambda f: ["generate", "--base", "tiny", "--prompt", "x", "--out", str(f["folder"])], "folder"),
    "generate --out a file's child": (lambda f: ["generate", "--base", "tiny", "--prompt", "x", "--out", str(f["plain"] / "x.png")], "does not exist"),
    # issue 14, items 7 and 9: checked before anything loads, by the request's (and the device parser's) own checks
    "generate --seed beyond 64 bits": (lambda f: ["generate", "--prompt", "x", "--seed", str(2**64), "--out", str(f["folder"] / "o.png")], "seed"),
    "generate --seed -1": (lambda f: ["generate", "--prompt", "x", "--seed", "-1", "--out", str(f["folder"] / "o.png")], "seed"),
    "generate --guidance nan": (lambda f: ["generate", "--prompt", "x", "--guidance", "nan", "--out", str(f["folder"] / "o.png")], "guidance"),
    "generate --guidance -5": (lambda f: ["generate", "--prompt", "x", "--guidance", "-5", "--out", str(f["folder"] / "o.png")], "guidance"),
    "generate --size 0x0": (lambda f: ["generate", "--prompt", "x", "--size", "0x0", "--out", str(f["folder"] / "o.png")], "size"),
    "generate --device bogus": (lambda f: ["generate", "--prompt", "x", "--device", "bogus", "--out", str(f["folder"] / "o.png")], "bogus"),
    "generate --device cuda without CUDA": (lambda f: ["generate", "--prompt", "x", "--device", "cuda:7", "--out", str(f["folder"] / "o.png")], "cuda"),
    "generate --threads 0": (lambda f: ["generate", "--prompt", "x", "--threads", "0", "--out", str(f["folder"] / "o.png")], "--threads"),
    "generate --window backwards": (lambda f: ["generate", "--prompt", "x", "--adapter", "demo/sketch", "--condition", str(f["image"]), "--window", "0.9:0.1", "--out", str(f["folder"] / "o.png")], "window"),
    "generate --adapter bad name": (lambda f: ["generate", "--prompt", "x", "--adapter", "a b=demo/sketch", "--condition", str(f["image"]), "--out", str(f["folder"] / "o.png")], "NAME=PATH"),
    "generate --weight nan": (lambda f: ["generate", "--prompt", "x", "--adapter", "demo/sketch", "--condition", str(f["image"]), "--weight", "nan", "--out", str(f["folder"] / "o.png")], "finite"),
    # the CLI sweep: an input image named by its flag, a folder told from a missing file, before anything loads
    "generate --condition a folder": (lambda f: ["generate", "--prompt", "x", "--adapter", "demo/sketch", "--condition", str(f["folder"]), "--out", str(f["folder"] / "o.png")], "--condition"),
    "generate --style-image missing": (lambda f: ["generate", "--prompt", "x", "--style-adapter", "demo/color", "--style-image", str(f["folder"] / "no.png"), "--out", str(f["folder"] / "o.png")], "--style-image"),
    "generate --init-image a folder": (lambda f: ["generate", "--prompt", "x", "--init-image", str(f["folder"]), "--out", str(f["folder"] / "o.png")], "is a folder"),
    "generate --init-image not an image": (lambda f: ["generate", "--base", "tiny", "--prompt", "x", "--steps", "2", "--size", "64x64", "--init-image", str(f["plain"]), "--out", str(f["folder"] / "o.png")], "cannot read --init-image"),
    "generate --mask not an image": (lambda f: ["generate", "--base", "tiny", "--prompt", "x", "--steps", "2", "--size", "64x64", "--init-image", str(f["image"]), "--mask", str(f["plain"]), "--out", str(f["folder"] / "o.png")], "cannot read --mask"),
    "generate --lora missing file": (lambda f: ["generate", "--base", "tiny", "--prompt", "x", "--steps", "1", "--size", "64x64", "--lora", str(f["folder"] / "no.safetensors"), "--out", str(f["folder"] / "o.png")], "no such file"),
    "generate --lora without a path": (lambda f: ["generate", "--prompt", "x", "--lora", ":2", "--out", str(f["folder"] / "o.png")], "name a LoRA"),
    "generate --lora scale nan": (lambda f: ["generate", "--prompt", "x", "--lora", "style.safetensors:nan", "--out", str(f["folder"] / "o.png")], "finite"),
    "generate --batch a folder": (lambda f: ["generate", "--batch", str(f["folder"]), "--out", str(f["folder"] / "o")], "is a folder"),
    "generate --batch not UTF-8": (lambda f: ["generate", "--batch", str(f["binary"]), "--out", str(f["folder"] / "o")], "UTF-8"),
    "generate --batch num_images text": (lambda f: ["generate", "--batch", str(f["two"]), "--out", str(f["folder"] / "o")], "two.jsonl:2: num_images"),
    "eval --steps 0": (lambda f: ["eval", "--steps", "0"], "steps must be between"),
    "eval --guidance nan": (lambda f: ["eval", "--guidance", "nan"], "guidance_scale"),
    "eval --out and --json one file": (lambda f: ["eval", "--out", str(f["folder"] / "t"), "--json", str(f["folder"] / "t")], "different files"),
    "demo --scenes 0": (lambda f: ["demo", "--scenes", "0", "--out", str(f["folder"])], "--scenes"),
    "demo --steps 0": (lambda f: ["demo", "--steps", "0", "--out", str(f["folder"])], "steps must be between"),
    "demo --out a file": (lambda f: ["demo", "--out", str(f["plain"])], "is a file"),
    "compile --cache-dir a file": (lambda f: ["compile", "--base", "tiny", "--size", "64x64", "--device", "cpu", "--cache-dir", str(f["plain"])], "is a file"),
    "compile --batch past a call's images": (lambda f: ["compile", "--base", "tiny", "--size", "64x64", "--device", "cpu", "--batch", "300"], "--batch must be from 1 to 256"),
    "compile --guidance nan": (lambda f: ["compile", "--base", "tiny", "--size", "64x64", "--device", "cpu", "--guidance", "nan"], "--guidance must be"),
    "eval --device bogus": (lambda f: ["eval", "--device", "bogus"], "bogus"),
    "serve --device bogus": (lambda f: ["serve", "--device", "bogus", "--port", "1"], "bogus"),
    "serve --port -1": (lambda f: ["serve", "--base", "tiny", "--port", "-1"], "65535"),
    "serve --port 70000": (lambda f: ["serve", "--base", "tiny", "--port", "70000"], "65535"),
    "serve --warmup 0x0": (lambda f: ["serve", "--base", "tiny", "--warmup", "0x0", "--port", "1"], "warmup size 0x0"),
    "serve --devices with a bogus one": (lambda f: ["serve", "--base", "tiny", "--devices", "cpu,bogus", "--port", "1"], "bogus"),
    "serve --base an empty folder, no warning first": (lambda f: ["serve", "--base", str(f["folder"]), "--port", "1"], "model_index.json"),
}  # fmt: skip


def snapshot(root: Path) -> dict[str, str]:
    """Path → content hash of every file under root (what must not change)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_exit_2_and_touches_nothing(name: str, files: dict[str, Path], capsys) -> None:
    argv, mention = CASES[name]
    root = files["image"].parent
    before = snapshot(root)
    with pytest.raises(SystemExit) as raised:  # argparse exits; our commands return 2
        raise SystemExit(cli(argv(files)))
    assert raised.value.code == 2, name
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert mention in err, err
    assert snapshot(root) == before


def test_serve_warns_nothing_before_a_base_that_cannot_load(tmp_path: Path, caplog) -> None:
    """The "no adapters registered" warning comes after the models load, so a failed start is its one error line."""
    assert cli(["serve", "--base", str(tmp_path), "--port", "1"]) == 2
    assert not [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("memory", ["CPU", "GPU"])
def test_out_of_memory_is_one_line_saying_what_to_ask_for(memory: str, files: dict[str, Path], monkeypatch, capsys) -> None:
    """Asking for more than the machine holds fails in torch's allocator deep inside the loop: one line, exit 2."""
    import torch

    from t2iadapter.generation import loop

    def start(self, *args):
        if memory == "CPU":  # torch's real CPU allocator refusing, as a too-large batch makes it
            return torch.empty(2**60, dtype=torch.uint8)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB (GPU 0; 79.19 GiB total)")

    monkeypatch.setattr(loop.Denoise, "start", start)
    out = files["image"].parent / "new.png"
    code = cli(["generate", "--base", "tiny", "--prompt", "a cat", "--steps", "2", "--size", "64x64", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: out of {memory} memory in `generate`: ask for less at once"), err
    assert not out.exists()


@pytest.mark.parametrize("message, expected", [
    ("mask_image needs init_image (the image to start from)", "--mask needs --init-image (the image to start from)"),
    ("guidance_scale must be a number from 0 to 100, got -1.0", "--guidance must be a number from 0 to 100, got -1.0"),
    ("steps must be between 1 and 1000, got 0", "--steps must be between 1 and 1000, got 0"),
    ("cannot read init_image /data/init_image.png: not an image", "cannot read --init-image /data/init_image.png: not an image"),
    ("prompts differ in length", "prompts differ in length"),  # a bare name only as the message's first word
    ("got 2 steps", "got 2 steps"),
])
def test_request_errors_speak_in_the_flags_a_user_typed(message, expected):
    from t2iadapter.commands.generate import as_flags

    assert as_flags(message) == expected
