"""Model-based extractors through their real loading code, on tiny random-weight transformers models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from t2iadapter import extractors
from t2iadapter.cli import main
from t2iadapter.errors import ConfigError, MissingWeightsError
from t2iadapter.extractors import palettes

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """Tiny DPT, ZoeDepth, Segformer and CLIP-vision models with their processors, saved as hub-style folders."""
    root = tmp_path_factory.mktemp("tiny-models")
    torch.manual_seed(0)
    vit = dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8
    )
    models = {
        "depth": (
            transformers.DPTForDepthEstimation(
                transformers.DPTConfig(
                    **vit, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16
                )
            ),
            transformers.DPTImageProcessor(size={"height": 32, "width": 32}),
        ),
        "zoedepth": (
            transformers.ZoeDepthForDepthEstimation(
                transformers.ZoeDepthConfig(
                    backbone_config=transformers.Dinov2Config(
                        **vit, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False
                    ),
                    backbone_hidden_size=32,
                    neck_hidden_sizes=[8, 8, 16, 16],
                    fusion_hidden_size=16,
                    bottleneck_features=16,
                    num_relative_features=16,
                    bin_embedding_dim=16,
                    num_attractors=[4, 2, 2, 1],
                    bin_configurations=[{"n_bins": 8, "min_depth": 1e-3, "max_depth": 10.0, "name": "nyu"}],
                    reassemble_factors=[4, 2, 1, 0.5],
                    use_pretrained_backbone=False,
                )
            ),
            transformers.ZoeDepthImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False),
        ),
        "seg": (
            transformers.SegformerForSemanticSegmentation(
                transformers.SegformerConfig(
                    num_encoder_blocks=2,
                    depths=[1, 1],
                    sr_ratios=[2, 1],
                    hidden_sizes=[8, 16],
                    patch_sizes=[3, 3],
                    strides=[2, 2],
                    num_attention_heads=[1, 1],
                    mlp_ratios=[2, 2],
                    decoder_hidden_size=16,
                    num_labels=150,
                )
            ),
            transformers.SegformerImageProcessor(size={"height": 32, "width": 32}),
        ),
        "style": (
            transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**{k: v for k, v in vit.items()})),
            transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        ),
    }
    paths = {}
    for name, (model, processor) in models.items():
        folder = root / name
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        paths[name] = str(folder)
    return paths


def photo(height: int = 40, width: int = 56) -> Image.Image:
    """A deterministic random RGB image of a size that is not the model's own."""
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_depth_is_min_max_normalised_grey_at_the_input_size(tiny):
    extractor = extractors.get("depth", model=tiny["depth"])
    out = extractor(photo())
    assert out.mode == "RGB" and out.size == (56, 40)
    grey = np.asarray(out)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 0] == grey[..., 2]).all()
    assert grey.min() == 0 and grey.max() == 255

    processor, network = extractor._loaded
    with torch.no_grad():
        raw = network(**processor(images=photo(), return_tensors="pt")).predicted_depth
    depth = torch.nn.functional.interpolate(raw[:, None], size=(40, 56), mode="bicubic")[0, 0].double().numpy()
    expected = np.round((depth - depth.min()) / (depth.max() - depth.min()) * 255)
    np.testing.assert_array_equal(grey[..., 0], expected.astype(np.uint8))


def test_zoedepth_is_percentile_normalised_and_inverted(tiny):
    extractor = extractors.get("zoedepth", model=tiny["zoedepth"])
    out = np.asarray(extractor(np.asarray(photo())))
    assert out.shape == (40, 56, 3) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255  # beyond the 85th percentile clips to 0, below the 2nd to 255
    assert (out[..., 0] == out[..., 2]).all()

    # transformers' own post-processing: resize to the reflect-padded size, crop the padding off
    processor, network = extractor._loaded
    with torch.no_grad():
        outputs = network(**processor(images=photo(), return_tensors="pt"))
    depth = processor.post_process_depth_estimation(outputs, source_sizes=[(40, 56)])[0]["predicted_depth"]
    depth = depth.double().numpy()
    low, high = np.percentile(depth, 2), np.percentile(depth, 85)
    expected = np.round(np.clip(1.0 - (depth - low) / (high - low), 0.0, 1.0) * 255.0)
    np.testing.assert_array_equal(out[..., 0], expected.astype(np.uint8))


def test_zoedepth_output_lines_up_with_the_input():
    """ZoeDepth's processor reflect-pads by int(sqrt(side / 2) * 3) px; resized with the padding left on, the
    depth map was shifted (an edge at column 127/128 came out at 147). A network whose depth is the input's
    brightness shows where each input column lands."""
    import types

    class Brightness(torch.nn.Module):
        def forward(self, pixel_values):
            return types.SimpleNamespace(predicted_depth=pixel_values.mean(1))  # [1, h, w]

    image = np.zeros((512, 512, 3), np.uint8)
    image[:, :128] = 255  # a bright band over columns 0..127
    extractor = extractors.get("zoedepth")
    extractor._loaded = (transformers.ZoeDepthImageProcessor(), Brightness())  # Intel/zoedepth-nyu-kitti's defaults
    out = np.asarray(extractor(image))[256, :, 0].astype(int)
    assert int(np.argmax(np.abs(np.diff(out)))) == 127
    assert (out[:120] == 0).all() and (out[136:] == 255).all()  # bright = far = dark after the inversion


def test_depth_resize_is_dpt_post_processing(tiny):
    """Depth models without padding (DPT/MiDaS, Depth Anything) resize bicubically, as their processor does."""
    from t2iadapter.extractors.hf import _depth_map

    processor = transformers.DPTImageProcessor.from_pretrained(tiny["depth"])
    network = transformers.DPTForDepthEstimation.from_pretrained(tiny["depth"])
    with torch.no_grad():
        outputs = network(**processor(images=photo(), return_tensors="pt"))
    expected = processor.post_process_depth_estimation(outputs, target_sizes=[(40, 56)])[0]["predicted_depth"]
    np.testing.assert_array_equal(_depth_map(processor, outputs, 40, 56), expected.double().numpy())


def test_seg_colours_every_pixel_with_the_palette_of_its_class(tiny):
    extractor = extractors.get("seg", model=tiny["seg"])
    out = np.asarray(extractor(photo()))
    assert out.shape == (40, 56, 3)
    assert extractor.palette_name() == "ade20k"  # 150 labels
    processor, network = extractor._loaded
    with torch.no_grad():
        outputs = network(**processor(images=photo(), return_tensors="pt"))
    labels = processor.post_process_semantic_segmentation(outputs, target_sizes=[(40, 56)])[0].numpy()
    np.testing.assert_array_equal(out, palettes.palette("ade20k")[labels])
    with pytest.raises(ConfigError, match="seg --palette"):
        extractors.get("seg", palette="pascal")


def test_style_returns_clip_last_hidden_state(tiny):
    features = extractors.get("style", model=tiny["style"])(photo())
    assert isinstance(features, torch.Tensor) and features.shape == (1, 17, 32)  # (32/8)² patches + class token
    network = transformers.CLIPVisionModel.from_pretrained(tiny["style"])
    processor = transformers.CLIPImageProcessor.from_pretrained(tiny["style"])
    with torch.no_grad():
        expected = network(**processor(images=photo(), return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(features, expected)


def test_missing_weights_give_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match=r"no folder .*nowhere.*hub repo Intel/dpt-hybrid-midas.*--model DIR"):
        extractors.get("depth", model=str(tmp_path / "nowhere")).load()
    with pytest.raises(
        MissingWeightsError, match=r"not in the local hub cache and HF_HUB_OFFLINE is set.*openai/clip-vit"
    ):
        extractors.get("style", model="nobody/no-such-clip").load()
    with pytest.raises(MissingWeightsError, match="is not a usable model folder"):
        extractors.get("seg", model=str(tmp_path)).load()


def test_cli_model_extractors(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = tmp_path / "in.png"
    photo().save(source)
    assert main(["extract", "depth", str(source), str(tmp_path / "o.png"), "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: depth: weights") and "--model DIR" in err and len(err.strip().splitlines()) == 1

    assert main(["extract", "style", str(source), str(tmp_path / "s.safetensors"), "--model", tiny["style"]]) == 0
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "s.safetensors"))["last_hidden_state"].shape == (1, 17, 32)

    inputs = tmp_path / "photos"
    inputs.mkdir()
    for i in range(2):
        photo(32 + 8 * i, 48).save(inputs / f"p{i}.png")
    assert (
        main(
            [
                "extract",
                "depth",
                "--input-dir",
                str(inputs),
                "--output-dir",
                str(tmp_path / "depths"),
                "--model",
                tiny["depth"],
                "--no-progress",
            ]
        )
        == 0
    )
    assert "2 done" in capsys.readouterr().out and Image.open(tmp_path / "depths" / "p1.png").size == (48, 40)
