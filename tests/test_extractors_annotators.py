"""The controlnet-aux extractors (sketch/PiDiNet, hed, lineart, openpose) on random-weight networks.

Needs the `annotators` extra (controlnet-aux, which needs torchvision). The `dev` extra includes it and the
Makefile's constraints pin torch 2.14.1 + torchvision 0.29.1, so `make test` and CI run these; in CI a
missing controlnet-aux is a failure, elsewhere (a venv without the extra) a skip.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("CI"):
    import controlnet_aux
else:
    controlnet_aux = pytest.importorskip("controlnet_aux")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from t2iadapter import extractors  # noqa: E402
from t2iadapter.errors import MissingWeightsError  # noqa: E402

RES = 64  # the smallest detect resolution the extractors accept; keeps the CPU runs short
SIZE = (96, 80)  # (W, H): not a multiple of 64 and not square, so the resize back to the input is exercised


def _save(state: dict, path) -> None:
    torch.save({k: v.detach().clone() for k, v in state.items()}, path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """One folder laid out like hub lllyasviel/Annotators, every file a seeded random-weight network."""
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.lineart import Generator
    from controlnet_aux.open_pose.body import bodypose_model
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.hand import handpose_model
    from controlnet_aux.pidi.model import pidinet

    folder = tmp_path_factory.mktemp("annotators")
    torch.manual_seed(0)
    # PiDiNet's checkpoint is a training snapshot: {"state_dict": {"module.<key>": tensor}}.
    pidi = pidinet().state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in pidi.items()}}, folder / "table5_pidinet.pth")
    hed = ControlNetHED_Apache2()
    with torch.no_grad():
        hed.norm.copy_(torch.rand(1, 3, 1, 1))  # zeros by default; any value shows the file was read
    _save(hed.state_dict(), folder / "ControlNetHED.pth")
    _save(Generator(3, 1, 3).state_dict(), folder / "sk_model.pth")
    _save(Generator(3, 1, 3).state_dict(), folder / "sk_model2.pth")
    # OpenPose body/hand files key layers without the block prefix (util.transfer adds "model0." etc. back).
    for model, name in ((bodypose_model(), "body_pose_model.pth"), (handpose_model(), "hand_pose_model.pth")):
        _save({k.split(".", 1)[1]: v for k, v in model.state_dict().items()}, folder / name)
    _save(FaceNet().state_dict(), folder / "facenet.pth")
    return str(folder)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A small RGB picture with edges: a gradient, two rectangles and a disc, plus seeded noise."""
    w, h = SIZE
    rng = np.random.default_rng(0)
    array = np.zeros((h, w, 3), np.uint8)
    array[:] = np.linspace(0, 120, w, dtype=np.uint8)[None, :, None]
    array[10:40, 12:50] = (230, 40, 40)
    array[45:75, 55:90] = (30, 200, 90)
    cv2.circle(array, (30, 60), 12, (250, 250, 250), -1)
    noise = rng.integers(-10, 10, array.shape)
    return Image.fromarray((array.astype(np.int16) + noise).clip(0, 255).astype(np.uint8))


def _direct(detector: str, folder: str, image: Image.Image, **kwargs) -> np.ndarray:
    """controlnet-aux's own detector on the same weights, resized back to the input size: HxWx3 uint8."""
    det = getattr(controlnet_aux, detector).from_pretrained(folder)
    out = det(np.asarray(image), detect_resolution=RES, image_resolution=RES, output_type="np", **kwargs)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    return cv2.resize(out, image.size, interpolation=cv2.INTER_LINEAR)


@pytest.mark.parametrize(("name", "detector"), [("sketch", "PidiNetDetector"), ("hed", "HEDdetector")])
def test_binarised_edges_match_controlnet_aux(weights, image, name, detector) -> None:
    out = extractors.get(name, model=weights, detect_resolution=RES)(image)
    assert isinstance(out, Image.Image)
    assert out.mode == "L" and out.size == image.size
    assert extractors.info(name).channels == 1
    result = np.asarray(out)
    assert set(np.unique(result)) <= {0, 255}
    expected = np.where(_direct(detector, weights, image)[:, :, 0] > 127.5, 255, 0).astype(np.uint8)
    np.testing.assert_array_equal(result, expected)


def test_sketch_threshold_moves_the_cut(weights, image) -> None:
    soft = _direct("PidiNetDetector", weights, image)[:, :, 0]
    for threshold in (0.25, 0.75):
        out = np.asarray(extractors.get("sketch", model=weights, detect_resolution=RES, threshold=threshold)(image))
        np.testing.assert_array_equal(out, np.where(soft > threshold * 255.0, 255, 0))


def test_hed_threshold_zero_keeps_the_soft_map(weights, image) -> None:
    out = extractors.get("hed", model=weights, detect_resolution=RES, threshold=0)(image)
    assert out.mode == "L" and out.size == image.size
    np.testing.assert_array_equal(np.asarray(out), _direct("HEDdetector", weights, image)[:, :, 0])


def test_lineart_fine_and_coarse_match_controlnet_aux(weights, image) -> None:
    fine = extractors.get("lineart", model=weights, detect_resolution=RES)(image)
    coarse = extractors.get("lineart", model=weights, detect_resolution=RES, coarse=True)(image)
    for out, flag in ((fine, False), (coarse, True)):
        assert isinstance(out, Image.Image)
        assert out.mode == "L" and out.size == image.size
        np.testing.assert_array_equal(
            np.asarray(out), _direct("LineartDetector", weights, image, coarse=flag)[:, :, 0]
        )
    assert not np.array_equal(np.asarray(fine), np.asarray(coarse))  # sk_model.pth vs sk_model2.pth


def test_openpose_matches_controlnet_aux(weights, image) -> None:
    out = extractors.get("openpose", model=weights, detect_resolution=RES)(image)
    assert isinstance(out, Image.Image)
    assert out.mode == "RGB" and out.size == image.size
    assert extractors.info("openpose").channels == 3
    expected = _direct("OpenposeDetector", weights, image, include_body=True, include_hand=False, include_face=False)
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_openpose_draws_a_detected_skeleton(weights, image, monkeypatch) -> None:
    """Random weights find no person (a black map), so feed a fixed 18-point pose to the drawing path."""
    from controlnet_aux.open_pose import BodyResult, Keypoint, PoseResult

    points = [(0.5, 0.15), (0.5, 0.3), (0.35, 0.3), (0.3, 0.5), (0.3, 0.7), (0.65, 0.3), (0.7, 0.5), (0.7, 0.7),
              (0.4, 0.6), (0.4, 0.8), (0.4, 0.95), (0.6, 0.6), (0.6, 0.8), (0.6, 0.95), (0.45, 0.1), (0.55, 0.1),
              (0.4, 0.12), (0.6, 0.12)]  # fmt: skip
    pose = PoseResult(BodyResult([Keypoint(x, y) for x, y in points], 18.0, 18), None, None, None)
    monkeypatch.setattr(controlnet_aux.OpenposeDetector, "detect_poses", lambda self, *a, **k: [pose])
    out = np.asarray(extractors.get("openpose", model=weights, detect_resolution=RES)(image))
    assert out.shape == (image.size[1], image.size[0], 3)
    assert (out > 0).any(axis=2).mean() > 0.05 and len(np.unique(out.reshape(-1, 3), axis=0)) > 10  # coloured limbs
    np.testing.assert_array_equal(out, _direct("OpenposeDetector", weights, image, include_body=True))


def test_array_and_grey_inputs(weights, image) -> None:
    """HxWx3 arrays give the same map as the PIL image; HxW grey input works and keeps its size."""
    sketch = extractors.get("sketch", model=weights, detect_resolution=RES)
    np.testing.assert_array_equal(np.asarray(sketch(np.asarray(image))), np.asarray(sketch(image)))
    grey = sketch(np.asarray(image.convert("L")))
    assert grey.mode == "L" and grey.size == image.size


@pytest.mark.parametrize("name", ["sketch", "hed", "lineart", "openpose"])
def test_folder_lacking_a_file_is_a_clear_error(tmp_path, name) -> None:
    with pytest.raises(MissingWeightsError, match="lacks"):
        extractors.get(name, model=str(tmp_path))(Image.new("RGB", (64, 64)))
