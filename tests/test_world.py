"""The procedural world: deterministic scenes whose condition maps agree with their geometry."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from t2iadapter.demo import world

SEEDS = range(100, 160)


@pytest.fixture(scope="module")
def scenes() -> list[world.Scene]:
    return [world.generate(s) for s in SEEDS]


def test_deterministic_and_typed() -> None:
    a, b = world.generate(7), world.generate(7)
    assert a.caption == b.caption and len(a.objects) == len(b.objects)
    for name in ("image", "sketch", "seg", "depth", "pose", "color", "mask"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.image.shape == (256, 256, 3) and a.image.dtype == np.uint8
    assert a.sketch.shape == (256, 256) and a.sketch.dtype == np.uint8
    for name in ("seg", "depth", "pose", "color"):
        assert getattr(a, name).shape == (256, 256, 3) and getattr(a, name).dtype == np.uint8
    assert a.mask.shape == (256, 256) and a.mask.dtype == bool
    assert world.generate(8).caption != a.caption or not np.array_equal(world.generate(8).image, a.image)


def test_sizes_and_bad_size() -> None:
    assert world.generate(3, size=128).image.shape == (128, 128, 3)
    with pytest.raises(ValueError):
        world.generate(3, size=100)


def test_variety(scenes: list[world.Scene]) -> None:
    counts = {len(s.objects) for s in scenes}
    assert counts == {1, 2, 3, 4}
    objs = [o for s in scenes for o in s.objects]
    assert {o.kind for o in objs} == set(world.KINDS) and len(world.KINDS) >= 6
    assert {o.colour for o in objs} == set(world.COLOURS) and len(world.COLOURS) >= 8
    assert {o.size for o in objs} == {"small", "large"}
    assert len({s.caption for s in scenes}) == len(scenes)


def test_caption_names_every_object(scenes: list[world.Scene]) -> None:
    vocab = set(world.VOCABULARY)
    for s in scenes:
        assert set(s.caption.split()) <= vocab, s.caption
        for o in s.objects:
            assert f"{o.size} {o.colour} {o.kind}" in s.caption
        if len(s.objects) >= 2:
            assert any(r in s.caption for r in world.RELATIONS)


def test_masks_and_occlusion(scenes: list[world.Scene]) -> None:
    for s in scenes:
        union = np.zeros_like(s.mask)
        for o in s.objects:
            assert not (union & o.mask).any(), "visible masks overlap"
            union |= o.mask
            x0, y0, x1, y1 = o.bbox
            ys, xs = np.nonzero(o.mask)
            assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
        assert np.array_equal(union, s.mask)
        assert sorted(o.depth_rank for o in s.objects) == list(range(len(s.objects)))


def test_condition_maps_agree_with_geometry(scenes: list[world.Scene]) -> None:
    for s in scenes:
        assert not s.seg[~s.mask].any() and (s.seg[s.mask].max(axis=1) > 0).all()
        for o in s.objects:
            assert (s.seg[o.mask] == world.SEG_COLOURS[o.kind]).all()
        # Sketch: white outlines only on the boundaries of the objects.
        assert set(np.unique(s.sketch)) <= {0, 255} and s.sketch.any()
        boundary = cv2.dilate(s.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert not s.sketch[~boundary].any()
        # Depth: grey, background dark, nearer objects brighter.
        assert (s.depth[..., 0] == s.depth[..., 1]).all() and (s.depth[..., 1] == s.depth[..., 2]).all()
        assert s.depth[~s.mask, 0].max() < s.depth[s.mask, 0].min()
        by_rank = sorted(s.objects, key=lambda o: o.depth_rank)
        medians = [np.median(s.depth[o.mask, 0]) for o in by_rank]
        assert medians == sorted(medians, reverse=True)
        # Pose only where there are persons, with keypoints inside the image.
        persons = [o for o in s.objects if o.kind == "person"]
        assert bool(s.pose.any()) == bool(persons)
        for o in persons:
            assert o.keypoints.shape == (18, 2) and (o.keypoints >= 0).all() and (o.keypoints < s.size).all()
        # Palette: the original recipe on the image.
        small = cv2.resize(s.image, (4, 4), interpolation=cv2.INTER_CUBIC)
        assert np.array_equal(s.color, cv2.resize(small, (256, 256), interpolation=cv2.INTER_NEAREST))


def test_objects_saturated_background_not(scenes: list[world.Scene]) -> None:
    for s in scenes:
        hsv = cv2.cvtColor(s.image, cv2.COLOR_RGB2HSV)
        assert hsv[~s.mask, 1].max() <= 0.12 * 255
        assert hsv[s.mask, 1].min() >= 0.5 * 255
        assert hsv[..., 2].min() >= 0.4 * 255


def test_openpose_colours() -> None:
    scene = next(s for s in map(world.generate, range(1000)) if any(o.kind == "person" for o in s.objects))
    person = next(o for o in scene.objects if o.kind == "person")
    x, y = np.round(person.keypoints[1]).astype(int)  # the neck joint is OpenPose's colour 1 (orange)
    assert scene.pose[y, x].max() > 0
    assert len(world.OPENPOSE_COLOURS) == 18 and len(world.KEYPOINT_NAMES) == 18


def test_render_condition_and_batch() -> None:
    s = world.generate(11)
    for name in ("sketch", "seg", "depth", "pose", "color", "mask", "image"):
        out = world.render_condition(s, name)
        assert np.array_equal(out, getattr(s, name)) and out is not getattr(s, name)
    assert world.render_condition(s, "canny").shape == (256, 256)
    with pytest.raises(ValueError):
        world.render_condition(s, "normals")
    batch = world.generate_batch([11, 12], names=("image", "sketch", "canny"))
    assert batch.maps["image"].shape == (2, 256, 256, 3) and batch.maps["sketch"].shape == (2, 256, 256)
    assert np.array_equal(batch.maps["image"][0], s.image) and batch.captions[0] == s.caption
    assert np.array_equal(batch.maps["sketch"][1], world.generate(12).sketch)


def test_seed_ranges_and_builtins() -> None:
    assert max(world.TRAIN_SEEDS) < min(world.EVAL_SEEDS)
    for seed in world.BUILTIN_SEEDS:
        assert seed not in world.TRAIN_SEEDS and seed not in world.EVAL_SEEDS
    builtins = world.builtin_scenes()
    assert 4 <= len(builtins) <= 6
    assert any(o.kind == "person" for s in builtins for o in s.objects)
    assert tuple(world.VOCABULARY) == tuple(dict.fromkeys(world.VOCABULARY))


def test_fast_enough() -> None:
    start = time.perf_counter()
    world.generate_batch(range(50), names=("image",))
    full = time.perf_counter()
    for seed in range(50):
        world.generate(seed)
    end = time.perf_counter()
    assert (full - start) / 50 < 0.02 and (end - full) / 50 < 0.03  # ~2 / ~4 ms on one free core
