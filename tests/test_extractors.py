"""Offline extractors against exact expected outputs, the registry, and the `extract` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from t2iadapter import extractors
from t2iadapter.cli import main
from t2iadapter.errors import ConditionError, ConfigError, T2IAdapterError
from t2iadapter.extractors import palettes, pose


def square(size: int = 96, color: tuple[int, int, int] = (40, 80, 200)) -> np.ndarray:
    """A filled square on a light background."""
    image = np.full((size, size, 3), 230, np.uint8)
    cv2.rectangle(image, (24, 24), (71, 71), color, thickness=-1)
    return image


# ---- reading images ------------------------------------------------------------------------


def band_photo() -> np.ndarray:
    """80x120 stored pixels, a dark band along the stored left edge: the turn shows where it ends up."""
    pixels = np.full((80, 120, 3), 255, np.uint8)
    pixels[:, :20] = (30, 60, 90)
    pixels[:10, 20:40] = (200, 40, 40)  # a red corner patch, so a mirror image is told apart from a turn
    return pixels


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize(("orientation", "turn"), [(6, lambda a: np.rot90(a, -1)), (3, lambda a: np.rot90(a, 2)),
                                                   (8, lambda a: np.rot90(a, 1)), (2, lambda a: a[:, ::-1])])
def test_open_image_turns_by_exif_orientation_as_diffusers_load_image(tmp_path, suffix, orientation, turn):
    """A phone photo stored landscape with Orientation=6 is shown portrait by diffusers' load_image and cv2.imread."""
    from diffusers.utils import load_image

    from t2iadapter.extractors.images import open_image

    image = Image.fromarray(band_photo())
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"phone{suffix}"
    image.save(path, exif=exif.tobytes(), **({"quality": 95} if suffix == ".jpg" else {}))
    opened = np.asarray(open_image(path).convert("RGB"))
    np.testing.assert_array_equal(opened, np.asarray(load_image(str(path))))
    np.testing.assert_array_equal(np.asarray(open_image(path.read_bytes()).convert("RGB")), opened)
    if suffix == ".png":  # lossless: the stored pixels, turned
        np.testing.assert_array_equal(opened, turn(band_photo()))
        if orientation == 6:
            np.testing.assert_array_equal(cv2.imread(str(path))[..., ::-1], opened)  # OpenCV turns it too
    np.testing.assert_array_equal(np.asarray(extractors.get("canny")(path)), cv2.Canny(opened, 100, 200))


def test_sixteen_bit_grey_reads_as_its_eight_bit_copy(tmp_path):
    """16-bit grey (PIL mode I;16, and I or F after a convert) is value >> 8, as cv2.imread reads it; not white."""
    from t2iadapter.extractors.images import to_rgb

    grey8 = np.random.default_rng(5).integers(0, 256, (48, 64), dtype=np.uint8)
    Image.fromarray(grey8).save(tmp_path / "grey8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # PIL writes 16-bit PNG
    sixteen = Image.open(tmp_path / "grey16.png")
    assert sixteen.mode == "I;16"
    expected = to_rgb(tmp_path / "grey8.png")
    np.testing.assert_array_equal(expected, np.repeat(grey8[:, :, None], 3, axis=2))
    for image in (tmp_path / "grey16.png", sixteen, sixteen.convert("I"), sixteen.convert("F")):
        np.testing.assert_array_equal(to_rgb(image), expected)
    np.testing.assert_array_equal(
        np.asarray(extractors.get("canny")(tmp_path / "grey16.png")), np.asarray(extractors.get("canny")(grey8))
    )

    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value, written by OpenCV
    cv2.imwrite(str(tmp_path / "ramp16.png"), ramp)
    np.testing.assert_array_equal(to_rgb(tmp_path / "ramp16.png"), cv2.imread(str(tmp_path / "ramp16.png"))[..., ::-1])


# ---- registry ------------------------------------------------------------------------------


def test_registry_lists_every_extractor_with_its_adapters_and_channels():
    expected = {
        "canny",
        "color",
        "sketch-classic",
        "binarize",
        "pose-json",
        "seg-palette",
        "sketch",
        "hed",
        "lineart",
        "depth",
        "zoedepth",
        "openpose",
        "seg",
        "style",
    }
    assert set(extractors.names()) == expected
    for name in expected:
        cls = extractors.info(name)
        assert cls.feeds and all(isinstance(a, str) for a in cls.feeds)
        assert cls.channels in (1, 3, None)
    assert extractors.info("canny").channels == 1 and extractors.info("color").channels == 3
    assert "t2iadapter_canny_sd14v1" in extractors.info("canny").feeds
    assert "t2i-adapter-canny-sdxl-1.0" in extractors.info("canny").feeds
    assert extractors.info("style").channels is None
    assert [row[2] for row in extractors.table()].count("no") == 6


def test_unknown_names_and_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown extractor 'cany'"):
        extractors.get("cany")
    with pytest.raises(ConfigError, match="no option model"):
        extractors.get("canny", model="x")
    with pytest.raises(ConfigError, match="low <= high"):
        extractors.get("canny", low=300, high=200)
    assert extractors.info("canny").coerce({"low": "50"}) == {"low": 50}
    with pytest.raises(ConfigError, match="--low expects an int"):
        extractors.info("canny").coerce({"low": "fifty"})
    assert extractors.info("lineart").coerce({"coarse": "yes"}) == {"coarse": True}


def test_docs_table_names_every_extractor():
    text = (Path(__file__).parents[1] / "docs" / "extractors.md").read_text(encoding="utf-8")
    for name, feeds, _, _ in extractors.table():
        assert f"| `{name}` |" in text and feeds.split(", ")[0] in text


# ---- canny, color ---------------------------------------------------------------------------


def test_canny_equals_the_original_cv2_call_on_a_drawn_square():
    image = square()
    out = extractors.get("canny")(Image.fromarray(image))
    assert out.mode == "L" and out.size == (96, 96)
    np.testing.assert_array_equal(np.asarray(out), cv2.Canny(image, 100, 200))
    edges = np.asarray(out)
    assert edges[24, 40] == 255 or edges[23, 40] == 255  # the square's top edge
    assert edges[48, 48] == 0 and edges[5, 5] == 0  # flat inside and outside
    np.testing.assert_array_equal(np.asarray(extractors.get("canny", low=10, high=20)(image)), cv2.Canny(image, 10, 20))


def test_color_palette_is_cubic_down_by_64_then_nearest_up():
    blocks = np.zeros((128, 192, 3), np.uint8)
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0), (0, 128, 128), (10, 20, 30)]
    for i, c in enumerate(colors):
        blocks[(i // 3) * 64 : (i // 3 + 1) * 64, (i % 3) * 64 : (i % 3 + 1) * 64] = c
    # Each 64x64 block is uniform, so its 1/64 sample is exactly its colour and nearest-up repeats it.
    np.testing.assert_array_equal(np.asarray(extractors.get("color")(blocks)), blocks)

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (200, 130, 3), dtype=np.uint8)
    expected = cv2.resize(
        cv2.resize(photo, (2, 3), interpolation=cv2.INTER_CUBIC), (130, 200), interpolation=cv2.INTER_NEAREST
    )
    out = extractors.get("color")(photo)
    assert out.mode == "RGB" and out.size == (130, 200)
    np.testing.assert_array_equal(np.asarray(out), expected)
    assert extractors.get("color")(photo[:40, :40]).size == (40, 40)  # smaller than 64: one colour


# ---- sketch-classic, binarize ---------------------------------------------------------------


def test_sketch_classic_outlines_a_square_in_white_on_black():
    out = np.asarray(extractors.get("sketch-classic")(square()))
    assert out.shape == (96, 96) and set(np.unique(out)) == {0, 255}
    ring = np.zeros((96, 96), bool)
    ring[20:76, 20:76] = True
    ring[28:68, 28:68] = False  # a band of ±4 px around the square's border
    assert not out[~ring].any()
    sides = (out[20:28, 30:66], out[68:76, 30:66], out[30:66, 20:28].T, out[30:66, 68:76].T)
    assert all(side.any(axis=0).all() for side in sides)  # every side is drawn along its whole length


def test_sketch_classic_draws_a_small_outline_where_canny_finds_edges():
    """A 20 px square drawn with a 2 px pen on 512² covers < 1 % of the page: all black when the percentile was
    taken over every pixel. The sketch covers every canny edge pixel and strays at most one diagonal step off."""
    for corner, far, size in ((240, 260, 512), (100, 400, 512), (20, 40, 96)):
        drawing = np.full((size, size, 3), 255, np.uint8)
        cv2.rectangle(drawing, (corner, corner), (far, far), (0, 0, 0), 2)
        sketch = np.asarray(extractors.get("sketch-classic")(drawing)) > 0
        edges = cv2.Canny(drawing, 100, 200) > 0
        assert edges.any() and sketch.any()
        to_sketch = cv2.distanceTransform((~sketch).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        to_edges = cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        assert to_sketch[edges].max() == 0 and to_edges[sketch].max() <= 1.5
    for flat in (np.full((64, 64, 3), 255, np.uint8), np.full((64, 64, 3), 37, np.uint8)):
        assert not np.asarray(extractors.get("sketch-classic")(flat)).any()


def test_binarize_turns_a_dark_stroke_into_a_white_line():
    drawing = np.full((64, 80, 3), 255, np.uint8)
    cv2.line(drawing, (10, 10), (70, 50), (0, 0, 0), thickness=3)
    expected = np.where(cv2.cvtColor(drawing, cv2.COLOR_RGB2GRAY) < 127.5, 255, 0)
    out = extractors.get("binarize")(Image.fromarray(drawing))
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), expected)
    np.testing.assert_array_equal(np.asarray(extractors.get("binarize")(255 - drawing)), expected)  # chalk on board

    speck = drawing.copy()
    speck[60, 2] = 0  # one-pixel dust is dropped by min_area
    np.testing.assert_array_equal(np.asarray(extractors.get("binarize")(speck)), expected)
    assert np.asarray(extractors.get("binarize", min_area=0)(speck))[60, 2] == 255

    rgba = np.zeros((64, 80, 4), np.uint8)  # transparent canvas, opaque black stroke
    rgba[..., 3] = np.where(expected == 255, 255, 0)
    np.testing.assert_array_equal(np.asarray(extractors.get("binarize")(Image.fromarray(rgba))), expected)


def test_inputs_are_checked():
    with pytest.raises(ConditionError, match="uint8"):
        extractors.get("canny")(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ConditionError, match="shape"):
        extractors.get("canny")(np.zeros((8, 8, 2), np.uint8))


# ---- pose-json ------------------------------------------------------------------------------


def keypoints(points: dict[int, tuple[float, float]], count: int = 18) -> list[float]:
    """An OpenPose pose_keypoints_2d list with the given (0-based) points visible."""
    flat: list[float] = []
    for i in range(count):
        x, y = points.get(i, (0.0, 0.0))
        flat += [x, y, 1.0 if i in points else 0.0]
    return flat


def test_pose_json_draws_limbs_in_openpose_colours(tmp_path):
    # Neck (1) to right shoulder (2) is limb 0, red; right shoulder to elbow (3) is limb 2, orange-yellow.
    data = {
        "people": [{"pose_keypoints_2d": keypoints({1: (40, 50), 2: (100, 50), 3: (100, 110)})}],
        "canvas_width": 160,
        "canvas_height": 128,
    }
    path = tmp_path / "pose.json"
    path.write_text(json.dumps(data))
    out = extractors.get("pose-json")(path)
    assert out.mode == "RGB" and out.size == (160, 128)
    canvas = np.asarray(out)
    blended = np.round(0.6 * np.array(pose.COLORS, float)).astype(np.uint8)  # each limb blended in at 60 %
    np.testing.assert_array_equal(canvas[50, 70], blended[0])
    np.testing.assert_array_equal(canvas[80, 100], blended[2])
    assert not canvas[5, 5].any() and not canvas[110, 30].any()

    aux = np.asarray(extractors.get("pose-json", draw="aux")(json.dumps(data)))
    np.testing.assert_array_equal(aux[50, 70], (np.array(pose.COLORS[0]) * 0.6).astype(np.uint8))
    np.testing.assert_array_equal(aux[50, 40], pose.COLORS[1])  # joints drawn last at full colour

    normalized = {
        "people": [{"pose_keypoints_2d": keypoints({1: (0.25, 50 / 128), 2: (0.625, 50 / 128), 3: (0.625, 110 / 128)})}]
    }
    scaled = extractors.get("pose-json", width=160, height=128)(normalized)
    np.testing.assert_array_equal(np.asarray(scaled)[50, 70], blended[0])


def test_pose_json_reads_body25_and_rejects_malformed_files(tmp_path):
    body25 = keypoints({1: (40, 50), 2: (100, 50)}, count=25)
    canvas = np.asarray(extractors.get("pose-json", width=128, height=96)({"people": [{"pose_keypoints_2d": body25}]}))
    assert canvas.shape == (96, 128, 3) and canvas[50, 70].any()
    assert not np.asarray(extractors.get("pose-json")({"people": []})).any()  # nobody: a black 512² canvas
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConditionError, match="not valid JSON"):
        extractors.get("pose-json")(bad)
    with pytest.raises(ConditionError, match="18 \\(COCO\\) or 25"):
        extractors.get("pose-json")({"people": [{"pose_keypoints_2d": [1, 2, 3]}]})


@pytest.mark.parametrize(("changes", "match"), [
    ({"canvas_width": -5}, "canvas_width must be a whole number of pixels from 1 to 4096, got -5"),
    ({"canvas_height": 10**9}, "canvas_height must be a whole number"),
    ({"canvas_width": 12.7}, "canvas_width must be a whole number"),
    ({"canvas_width": "wide"}, "canvas_width must be a whole number"),
    ({"x": float("nan")}, "NaN or infinite"),
    ({"x": float("inf")}, "NaN or infinite"),
    ({"x": 1e30}, r"beyond ±100000 pixels"),
    ({"x": "left"}, "must hold numbers"),
])
def test_pose_json_bad_values_are_one_condition_error(tmp_path, changes, match):
    data = {"people": [{"pose_keypoints_2d": keypoints({1: (40, 50), 2: (100, 50)})}], "canvas_width": 160,
            "canvas_height": 128}
    data.update({k: v for k, v in changes.items() if k != "x"})
    if "x" in changes:
        data["people"][0]["pose_keypoints_2d"][3] = changes["x"]  # keypoint 1's x
    with pytest.raises(ConditionError, match=match):
        pose.read_people(data, width=0, height=0, normalized="auto")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))  # Python writes NaN and Infinity as JSON does not, but json.load reads them
    with pytest.raises(ConditionError, match=match) as caught:
        extractors.get("pose-json")(path)
    assert "\n" not in str(caught.value)
    for flag in ("width", "height"):
        for value in (-1, 4097, 10**9):
            with pytest.raises(ConfigError, match=r"pose-json needs 0 <= --width, --height <= 4096"):
                extractors.get("pose-json", **{flag: value})


def test_pose_json_paths_are_files_and_only_strings_may_be_json_text(tmp_path, monkeypatch):
    """A file named "[take 2] pose.json" was read as JSON text (it starts with "["), and failed."""
    data = {"people": [{"pose_keypoints_2d": keypoints({1: (40, 50), 2: (100, 50)})}], "canvas_width": 160,
            "canvas_height": 128}
    expected = np.asarray(extractors.get("pose-json")(data))
    assert expected[50, 70].any()
    monkeypatch.chdir(tmp_path)
    for name in ("[take 2] pose.json", "{draft} pose.json"):
        (tmp_path / name).write_text(json.dumps(data))
        np.testing.assert_array_equal(np.asarray(extractors.get("pose-json")(tmp_path / name)), expected)  # a Path
        np.testing.assert_array_equal(np.asarray(extractors.get("pose-json")(name)), expected)  # an existing file
    np.testing.assert_array_equal(np.asarray(extractors.get("pose-json")(json.dumps(data))), expected)  # JSON text
    np.testing.assert_array_equal(np.asarray(extractors.get("pose-json")(json.dumps([data]))), expected)
    with pytest.raises(ConditionError, match="cannot read pose JSON .*missing.json"):
        extractors.get("pose-json")(tmp_path / "missing.json")


# ---- seg-palette ----------------------------------------------------------------------------


def test_seg_palette_maps_label_k_to_palette_k():
    coco, ade = palettes.palette("coco-stuff"), palettes.palette("ade20k")
    assert coco.shape == (171, 3) and ade.shape == (150, 3)
    assert tuple(coco[0]) == (0, 192, 64) and tuple(ade[0]) == (120, 120, 120) and tuple(ade[149]) == (92, 0, 255)
    labels = np.arange(180, dtype=np.uint8).reshape(12, 15)
    labels[0, 0] = 255  # ignore index
    out = np.asarray(extractors.get("seg-palette")(Image.fromarray(labels)))
    assert out.shape == (12, 15, 3)
    for k in (1, 7, 100, 170):
        np.testing.assert_array_equal(out[labels == k][0], coco[k])
    assert not out[labels >= 171].any()
    out16 = np.asarray(extractors.get("seg-palette", palette="ade20k")(labels.astype(np.uint16)))
    np.testing.assert_array_equal(out16[labels == 149][0], ade[149])
    assert not out16[labels == 150].any()


def test_seg_palette_raw_dataset_ids():
    # COCO-Stuff PNGs store category id - 1: 0 person → class 0; 12 (stop sign, id 13) → class 11 (id 12 unused).
    raw = np.array([[0, 12, 91, 181, 255]], np.uint8)
    out = np.asarray(extractors.get("seg-palette", ids="raw")(raw))
    coco = palettes.palette("coco-stuff")
    np.testing.assert_array_equal(out[0, :4], coco[[0, 11, 80, 170]])
    assert not out[0, 4].any()
    ade = np.asarray(extractors.get("seg-palette", palette="ade20k", ids="raw")(np.array([[0, 1, 150]], np.uint8)))
    np.testing.assert_array_equal(ade[0], [[0, 0, 0], palettes.palette("ade20k")[0], palettes.palette("ade20k")[149]])
    with pytest.raises(ConditionError, match="colours"):
        extractors.get("seg-palette")(square())


# ---- controlnet-aux extractors --------------------------------------------------------------


@pytest.mark.parametrize("name", ["sketch", "hed", "lineart", "openpose"])
def test_controlnet_aux_extractors_say_how_to_install_it(name, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec  # controlnet-aux is installed for the tests: hide it
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "controlnet_aux" else find_spec(n, *a))
    with pytest.raises(T2IAdapterError, match=r"pip install 't2iadapter\[annotators\]'"):
        extractors.get(name)


@pytest.mark.parametrize("name", ["sketch", "hed", "lineart", "openpose", "depth", "zoedepth", "seg", "style"])
def test_model_extractors_check_the_device_when_built(name, monkeypatch):
    """--device bogus, or cuda without a GPU, ended in torch's traceback at load time; now one line at once."""
    import torch

    with pytest.raises(ConfigError, match=r"^unknown device 'bogus'; use cpu, cuda, cuda:N or mps$"):
        extractors.get(name, device="bogus")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^device 'cuda': no CUDA GPU is available here; run on the CPU"):
        extractors.get(name, device="cuda")
    assert extractors.get(name, device="cpu").device == "cpu"


def test_annotator_weights_folder_is_checked(tmp_path):
    from t2iadapter.errors import MissingWeightsError
    from t2iadapter.extractors.weights import hub_folder

    (tmp_path / "sk_model.pth").write_bytes(b"x")
    with pytest.raises(MissingWeightsError, match="lacks sk_model2.pth.*lllyasviel/Annotators.*--model DIR"):
        hub_folder(
            str(tmp_path),
            ("sk_model.pth", "sk_model2.pth"),
            extractor="lineart",
            what="lineart",
            default="lllyasviel/Annotators",
        )
    (tmp_path / "sk_model2.pth").write_bytes(b"x")
    assert hub_folder(
        str(tmp_path),
        ("sk_model.pth", "sk_model2.pth"),
        extractor="lineart",
        what="lineart",
        default="lllyasviel/Annotators",
    ) == str(tmp_path)


# ---- CLI ------------------------------------------------------------------------------------


def test_cli_single_file_with_options(tmp_path, capsys):
    source = tmp_path / "in.png"
    Image.fromarray(square()).save(source)
    assert main(["extract", "canny", str(source), str(tmp_path / "out.png"), "--low", "50", "--high", "150"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), cv2.Canny(square(), 50, 150))
    assert "canny:" in capsys.readouterr().out


def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys):
    source = tmp_path / "in.png"
    Image.fromarray(square()).save(source)
    assert main(["extract", "canny", str(source), str(tmp_path / "o.png"), "--palette", "ade20k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: extractor 'canny' has no option --palette") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert main(["extract", "nope", str(source), str(tmp_path / "o.png")]) == 2
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert main(["extract", "color", str(tmp_path / "broken.png"), str(tmp_path / "o.png")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_cli_list_prints_the_table(capsys):
    assert main(["extract", "--list"]) == 0
    out = capsys.readouterr().out
    for name in extractors.names():
        assert name in out
    assert "Intel/dpt-hybrid-midas" in out and "t2iadapter_color_sd14v1" in out


def test_cli_batch_is_resumable_and_skips_unreadable_files(tmp_path, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    (inputs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(12):
        folder = inputs / "sub" if i % 3 == 0 else inputs
        Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (inputs / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    (inputs / "notes.txt").write_text("not an input")

    args = ["extract", "color", "--input-dir", str(inputs), "--output-dir", str(outputs), "--no-progress"]
    assert main(args + ["--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert "12 done, 0 already there, 1 failed of 13" in captured.out
    assert "corrupt.jpg" in captured.err
    assert (outputs / "sub" / "img0.png").is_file() and not (outputs / "corrupt.png").exists()
    np.testing.assert_array_equal(
        np.asarray(Image.open(outputs / "img1.png")),
        np.asarray(extractors.get("color")(Image.open(inputs / "img1.png"))),
    )
    assert not list(outputs.rglob("*.part"))

    (outputs / "img1.png").unlink()
    assert main(args + ["--workers", "1"]) == 0
    assert "1 done, 11 already there, 1 failed of 13" in capsys.readouterr().out

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"garbage")
    assert (
        main(["extract", "canny", "--input-dir", str(only_bad), "--output-dir", str(tmp_path / "o2"), "--no-progress"])
        == 1
    )
    assert main(["extract", "canny", "--input-dir", str(tmp_path / "missing"), "--output-dir", str(outputs)]) == 2


def test_cli_batch_pose_json(tmp_path, capsys):
    inputs = tmp_path / "poses"
    inputs.mkdir()
    for i in range(3):
        (inputs / f"p{i}.json").write_text(
            json.dumps(
                {
                    "people": [{"pose_keypoints_2d": keypoints({1: (10, 10), 2: (50, 10)})}],
                    "canvas_width": 64,
                    "canvas_height": 64,
                }
            )
        )
    assert (
        main(
            [
                "extract",
                "pose-json",
                "--input-dir",
                str(inputs),
                "--output-dir",
                str(tmp_path / "o"),
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "o" / "p2.png").size == (64, 64)


def test_an_output_folder_inside_the_input_folder_is_not_read_as_input(tmp_path, capsys):
    """`extract --input-dir D --output-dir D/out` took the last run's outputs for new inputs (D/out/out/… grew)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(inputs / "a.png")
    args = ["extract", "canny", "--input-dir", str(inputs), "--output-dir", str(inputs / "out"), "--workers", "1",
            "--no-progress"]
    assert main(args) == 0 and "1 done, 0 already there, 0 failed of 1" in capsys.readouterr().out
    assert main(args) == 0 and "0 done, 1 already there, 0 failed of 1" in capsys.readouterr().out
    assert sorted(p.relative_to(inputs).as_posix() for p in inputs.rglob("*.png")) == ["a.png", "out/a.png"]


def test_two_inputs_that_would_share_an_output_are_refused(tmp_path, capsys):
    """a.png and a.jpg both wrote out/a.png: one condition lost, "2 done" reported."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    pixels = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(inputs / "a.png")
    Image.fromarray(pixels).save(inputs / "a.jpg")
    assert main(["extract", "canny", "--input-dir", str(inputs), "--output-dir", str(tmp_path / "out"), "--workers", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a.jpg and a.png would both be written to" in err and not (tmp_path / "out").exists()
