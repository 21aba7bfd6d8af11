"""Model-based extractors through transformers: depth (DPT/MiDaS, Depth Anything), ZoeDepth, seg, CLIP style."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from t2iadapter.devices import check_device
from t2iadapter.extractors.base import (
    DEPTH_ADAPTERS,
    SEG_ADAPTERS,
    STYLE_ADAPTERS,
    ZOEDEPTH_ADAPTERS,
    Extractor,
)

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from t2iadapter.extractors.images import ImageInput


@dataclass
class _Transformers(Extractor):
    """Shared loading for transformers models: `model` is a local folder or a hub id (default: `weights`)."""

    model_class: ClassVar[str]  # transformers class that loads the network
    what: ClassVar[str]  # the network, for error messages

    model: str = ""  # local folder or hub repo id; empty: the default repo named in `weights`
    device: str = "cpu"  # torch device to run on, e.g. "cuda"
    _loaded: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_device(self.device)  # an unknown device, or CUDA where there is none: one line, before any loading

    def load(self) -> None:
        """Load the processor and the model from the folder, the hub cache or the hub (once)."""
        if self._loaded is not None:
            return
        from t2iadapter.extractors.weights import load_pretrained

        assert self.weights is not None
        import transformers

        model_id = self.model or self.weights
        common = {"extractor": self.name, "what": self.what, "default": self.weights}
        processor = load_pretrained(transformers.AutoImageProcessor.from_pretrained, model_id, **common)
        network = load_pretrained(getattr(transformers, self.model_class).from_pretrained, model_id, **common)
        network.to(self.device).eval()
        self._loaded = (processor, network)

    def _run(self, image: ImageInput) -> tuple[Any, Image.Image]:
        """Run the network on one RGB image; returns (model outputs, the PIL input)."""
        import torch
        from PIL import Image

        from t2iadapter.extractors import images

        self.load()
        processor, network = self._loaded
        picture = Image.fromarray(images.to_rgb(image))
        inputs = processor(images=picture, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            return network(**inputs), picture


def _resize_depth(depth: torch.Tensor, height: int, width: int) -> np.ndarray:
    """[1, h, w] network depth → [H, W] float64 at the input size (bicubic, as MiDaS' own resize).

    The same as DPTImageProcessor.post_process_depth_estimation(target_sizes=[(H, W)]) (DPT/MiDaS, Depth Anything).
    """
    import torch.nn.functional as F

    resized = F.interpolate(depth[:, None].float(), size=(height, width), mode="bicubic", align_corners=False)
    return resized[0, 0].double().cpu().numpy()


def _depth_map(processor: Any, outputs: Any, height: int, width: int) -> np.ndarray:
    """The network's depth → [H, W] float64 aligned with the input image.

    ZoeDepth's processor reflect-pads the input by int(sqrt(side / 2) * 3) pixels a side (original ZoeDepth
    `depth_model.py`); its own post-processing resizes to the padded size and crops the padding off. Other
    processors resize only (`_resize_depth`).
    """
    import inspect

    post_process = getattr(processor, "post_process_depth_estimation", None)
    if post_process is not None and "source_sizes" in inspect.signature(post_process).parameters:
        depth = post_process(outputs, source_sizes=[(height, width)])[0]["predicted_depth"]
        return depth.double().cpu().numpy()
    return _resize_depth(outputs.predicted_depth, height, width)


def _grey3(values: np.ndarray) -> Image.Image:
    """[H, W] values in [0, 1] → 3-channel grey uint8 image."""
    import numpy as np

    from t2iadapter.extractors import images

    grey = np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    return images.to_pil(np.repeat(grey[:, :, None], 3, axis=2))


@dataclass
class Depth(_Transformers):
    """Relative depth, min-max normalised per image; original `get_cond_depth` (MiDaS dpt_hybrid)."""

    name = "depth"
    feeds = DEPTH_ADAPTERS
    channels = 3
    recipe = "transformers depth-estimation (DPT/MiDaS, Depth Anything) → (d - min) / (max - min), grey RGB"
    weights = "Intel/dpt-hybrid-midas"
    what = "the depth model"

    model_class = "AutoModelForDepthEstimation"

    def __call__(self, image: ImageInput) -> Image.Image:
        outputs, picture = self._run(image)
        depth = _depth_map(self._loaded[0], outputs, picture.height, picture.width)
        depth -= depth.min()
        peak = depth.max()
        return _grey3(depth / peak if peak > 0 else depth)


@dataclass
class ZoeDepth(_Transformers):
    """Metric depth from ZoeDepth, normalised as controlnet-aux's ZoeDetector: 2nd-85th percentile, inverted."""

    name = "zoedepth"
    feeds = ZOEDEPTH_ADAPTERS
    channels = 3
    recipe = "transformers ZoeDepth → 1 - (d - p2) / (p85 - p2), clipped, grey RGB (near = bright)"
    weights = "Intel/zoedepth-nyu-kitti"
    what = "the ZoeDepth model"

    model_class = "AutoModelForDepthEstimation"

    def __call__(self, image: ImageInput) -> Image.Image:
        import numpy as np

        outputs, picture = self._run(image)
        depth = _depth_map(self._loaded[0], outputs, picture.height, picture.width)
        low, high = np.percentile(depth, 2), np.percentile(depth, 85)
        return _grey3(1.0 - (depth - low) / max(high - low, 1e-8))


@dataclass
class Seg(_Transformers):
    """Semantic segmentation by a transformers model → palette colour map (see seg-palette)."""

    name = "seg"
    feeds = SEG_ADAPTERS
    channels = 3
    recipe = "transformers semantic segmentation → class ids → COCO-Stuff/ADE20K palette by label count"
    weights = "openmmlab/upernet-convnext-small"
    what = "the segmentation model"

    palette: str = "auto"  # "auto": by the model's label count (171 coco-stuff, 150 ade20k), or a palette name

    def __post_init__(self) -> None:
        from t2iadapter.extractors.base import check
        from t2iadapter.extractors.palettes import PALETTE_NAMES

        super().__post_init__()
        check(
            self.palette in ("auto",) + PALETTE_NAMES,
            f"seg --palette must be auto, {', '.join(PALETTE_NAMES)}; not {self.palette!r}",
        )

    model_class = "AutoModelForSemanticSegmentation"

    def palette_name(self) -> str:
        """The palette to colour this model's classes with."""
        from t2iadapter.errors import ConfigError

        if self.palette != "auto":
            return self.palette
        self.load()
        labels = self._loaded[1].config.num_labels
        by_count = {171: "coco-stuff", 150: "ade20k"}
        if labels not in by_count:
            raise ConfigError(f"seg: the model has {labels} classes; pass --palette coco-stuff or ade20k explicitly")
        return by_count[labels]

    def __call__(self, image: ImageInput) -> Image.Image:
        from t2iadapter.extractors import images
        from t2iadapter.extractors.palettes import colorize

        outputs, picture = self._run(image)
        processor = self._loaded[0]
        labels = processor.post_process_semantic_segmentation(outputs, target_sizes=[(picture.height, picture.width)])[
            0
        ]
        return images.to_pil(colorize(labels.cpu().numpy().astype("int64"), self.palette_name()))


@dataclass
class Style(_Transformers):
    """CLIP ViT-L/14 vision features; original `get_cond_style`: last_hidden_state [1, 257, 1024], a tensor."""

    name = "style"
    feeds = STYLE_ADAPTERS
    channels = None
    recipe = "CLIPVisionModel(image).last_hidden_state, a [1, 257, 1024] float tensor (not an image)"
    weights = "openai/clip-vit-large-patch14"
    what = "the CLIP ViT-L/14 vision model"
    output_suffix = ".safetensors"

    model_class = "CLIPVisionModel"

    def __call__(self, image: ImageInput) -> torch.Tensor:
        outputs, _ = self._run(image)
        return outputs.last_hidden_state.float().cpu()
