"""Controllability metrics: exact on the world's own images, low on unrelated ones."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from t2iadapter.demo import world
from t2iadapter.evaluation import metrics
from t2iadapter.evaluation import colour_accuracy, foreground_mask, palette_error, structure_iou


@pytest.fixture(scope="module")
def scenes() -> list[world.Scene]:
    return [world.generate(s) for s in world.EVAL_SEEDS[:20]]


def test_world_images_score_perfectly(scenes: list[world.Scene]) -> None:
    for s in scenes:
        assert structure_iou(s.image, s) >= 0.95
        assert colour_accuracy(s.image, s) == 1.0
        assert colour_accuracy(s.image, s, region="image") == 1.0
        assert palette_error(s.image, s.color) == 0.0


def test_accepts_pil_and_other_sizes(scenes: list[world.Scene]) -> None:
    s = scenes[0]
    assert structure_iou(Image.fromarray(s.image), s) >= 0.95
    big = np.asarray(Image.fromarray(s.image).resize((512, 512), Image.NEAREST))
    assert structure_iou(big, s) >= 0.9
    assert colour_accuracy(s.image.astype(np.float32) / 255.0, s) == 1.0


def test_other_integer_arrays_are_refused_not_read_as_floats(scenes: list[world.Scene]) -> None:
    """An int64/uint16 array was read as floats in [0, 1], so every pixel clipped to white and every score was 0."""
    s = scenes[0]
    for dtype in (np.int16, np.int64, np.uint16):
        with pytest.raises(ValueError, match=f"uint8 image or floats in \\[0, 1\\], got dtype {np.dtype(dtype).name}"):
            structure_iou(s.image.astype(dtype), s)
    assert metrics.as_rgb(np.ones((2, 2), bool))[0, 0].tolist() == [255, 255, 255]


def test_palette_and_sixteen_bit_images_read_as_their_rgb_copies(scenes: list[world.Scene], tmp_path) -> None:
    """A P-mode (indexed) image was scored by its palette indices, 16-bit grey clipped to white."""
    s = scenes[0]
    Image.fromarray(s.image).convert("P", palette=Image.ADAPTIVE, colors=256).save(tmp_path / "indexed.png")
    indexed = Image.open(tmp_path / "indexed.png")
    assert indexed.mode == "P"
    np.testing.assert_array_equal(metrics.as_rgb(indexed), np.asarray(indexed.convert("RGB")))
    assert structure_iou(indexed, s) == pytest.approx(structure_iou(indexed.convert("RGB"), s))
    assert structure_iou(indexed, s) >= 0.95 and colour_accuracy(indexed, s) == 1.0

    grey8 = np.asarray(Image.fromarray(s.image).convert("L"))
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # its 16-bit copy
    sixteen = Image.open(tmp_path / "grey16.png")
    assert sixteen.mode == "I;16"
    expected = np.repeat(grey8[..., None], 3, axis=2)
    for image in (sixteen, sixteen.convert("I"), sixteen.convert("F")):
        np.testing.assert_array_equal(metrics.as_rgb(image), expected)


def test_transparent_pixels_read_as_white_as_the_extractors_read_them(scenes: list[world.Scene]) -> None:
    """An RGBA image was scored by the colours under its transparent pixels (alpha dropped, not composited)."""
    s = scenes[0]
    rgba = np.dstack([s.image, np.where(s.mask, 255, 0).astype(np.uint8)])
    rgba[~s.mask, :3] = (230, 30, 30)  # saturated red under the fully transparent background
    image = Image.fromarray(rgba, "RGBA")
    expected = np.where(s.mask[..., None], s.image, 255).astype(np.uint8)
    np.testing.assert_array_equal(metrics.as_rgb(image), expected)
    assert structure_iou(image, s) >= 0.95 and metrics.spurious_foreground(image, s) < 0.002


def test_blank_and_noise_score_low(scenes: list[world.Scene]) -> None:
    rng = np.random.default_rng(0)
    blank = np.full((256, 256, 3), 200, np.uint8)
    uniform = []
    for s in scenes[:10]:
        noise = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)  # iid colours: ~60% "saturated"
        grey_noise = np.clip(rng.normal(150, 25, (256, 256, 3)), 0, 255).astype(np.uint8)
        assert structure_iou(blank, s) == 0.0 and colour_accuracy(blank, s) == 0.0
        uniform.append(structure_iou(noise, s))
        assert structure_iou(grey_noise, s) < 0.1
        assert structure_iou(s.depth, s) == 0.0  # grey images have no saturated foreground
        assert structure_iou(s.image[::-1, ::-1], s) < 0.9
    assert np.mean(uniform) < 0.25
    assert not foreground_mask(blank).any()


def test_wrong_colour_is_caught(scenes: list[world.Scene]) -> None:
    s = next(x for x in scenes if len({o.colour for o in x.objects}) == len(x.objects) >= 2)
    recoloured = s.image.copy()
    target = s.objects[0]
    other = next(c for c in world.COLOURS if c != target.colour)
    recoloured[target.mask] = world.COLOURS[other]
    assert structure_iou(recoloured, s) >= 0.95
    assert colour_accuracy(recoloured, s) == pytest.approx(1 - 1 / len(s.objects))


def test_palette_error_range(scenes: list[world.Scene]) -> None:
    s = scenes[0]
    assert palette_error(np.zeros_like(s.image), np.full_like(s.color, 255)) == pytest.approx(1.0)
    assert 0.0 < palette_error(scenes[1].image, s.color) < 1.0


def test_hue_helpers() -> None:
    names = list(world.COLOURS)
    hues = metrics.hsv(np.array([list(world.COLOURS.values())], np.uint8))[0][0]
    assert [names[i] for i in metrics.nearest_colour(hues)] == names
    assert metrics.iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    with pytest.raises(ValueError):
        colour_accuracy(np.zeros((256, 256, 3), np.uint8), world.generate(1), region="everywhere")


def _reference_edge_f1(found: np.ndarray, truth: np.ndarray, tol: int) -> float:
    """Edge F1 by brute-force distances (an independent reference for metrics.edge_f1)."""
    fy, fx = np.nonzero(found)
    ty, tx = np.nonzero(truth)
    d = np.hypot(fy[:, None] - ty[None, :], fx[:, None] - tx[None, :])
    disc = d <= tol  # within tol px, Euclidean
    precision = disc.any(axis=1).mean()
    recall = disc.any(axis=0).mean()
    return 2 * precision * recall / (precision + recall)


def test_edge_f1_against_brute_force_and_shifts(scenes: list[world.Scene]) -> None:
    import cv2

    own = [metrics.edge_f1(s.image, s) for s in scenes]
    assert np.mean(own) >= 0.9  # the scene's own edges lie on its outlines
    s = scenes[0]
    small = world.generate(world.EVAL_SEEDS[0], 64)
    found = cv2.Canny(cv2.cvtColor(small.image, cv2.COLOR_RGB2GRAY), 100, 200) > 0
    assert metrics.edge_f1(small.image, small) == pytest.approx(_reference_edge_f1(found, small.sketch > 0, 2), abs=1e-12)
    # the same in every direction: a point √5 px from the edges counts neither across nor down (OpenCV's 5×5
    # "ellipse" took one and not the other)
    from types import SimpleNamespace

    box = np.full((32, 32, 3), 255, np.uint8)
    box[12:20, 12:20] = 0
    scores = []
    for point in ((14, 9), (9, 14)):
        truth = np.zeros((32, 32), np.uint8)
        truth[point] = 255
        scores.append(metrics.edge_f1(box, SimpleNamespace(size=32, sketch=truth)))
        found = cv2.Canny(cv2.cvtColor(box, cv2.COLOR_RGB2GRAY), 100, 200) > 0
        assert scores[-1] == pytest.approx(_reference_edge_f1(found, truth > 0, 2), abs=1e-12)
    assert scores[0] == scores[1]
    near = np.roll(s.image, 1, axis=1)  # a 1 px shift stays within the 2 px tolerance
    far = np.roll(s.image, 8, axis=1)
    assert metrics.edge_f1(near, s) >= 0.8 * metrics.edge_f1(s.image, s)
    assert metrics.edge_f1(far, s) < 0.5 * metrics.edge_f1(s.image, s)
    blank = np.full_like(s.image, 200)
    assert metrics.edge_f1(blank, s) == 0.0


def test_spurious_foreground_counts_painted_background(scenes: list[world.Scene]) -> None:
    s = scenes[0]
    assert metrics.spurious_foreground(s.image, s) < 0.002
    painted = s.image.copy()
    background = ~s.mask
    block = np.zeros_like(background)
    block[100:108, :] = True  # a band of background pixels, painted saturated red
    block &= background
    painted[block] = (230, 30, 30)
    share = metrics.spurious_foreground(painted, s)
    assert share == pytest.approx(np.count_nonzero(block) / np.count_nonzero(background), rel=0.2)
    assert metrics.spurious_foreground(np.full_like(s.image, 200), s) == 0.0



def test_pose_structure_iou_is_exact_on_the_scene_itself(scenes: list[world.Scene]) -> None:
    """Inside the persons' boxes the truth is the whole foreground: another object there counted as a false
    positive (the scene's own image scored 0.49 on some scenes)."""
    from t2iadapter.evaluation.controllability import person_iou

    with_people = [s for s in scenes if any(o.kind == "person" for o in s.objects)]
    assert any(len(s.objects) > 1 for s in with_people)
    for s in with_people:
        assert person_iou(s.image, s) >= 0.95, s.seed
    assert person_iou(np.full_like(with_people[0].image, 200), with_people[0]) == 0.0
