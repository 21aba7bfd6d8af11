"""Model-based extractors through controlnet-aux (PiDiNet, HED, lineart, OpenPose), the field's standard."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from t2iadapter.devices import check_device
from t2iadapter.errors import T2IAdapterError
from t2iadapter.extractors.base import (
    LINEART_ADAPTERS,
    OPENPOSE_ADAPTERS,
    SKETCH_ADAPTERS,
    Extractor,
    check,
)

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from t2iadapter.extractors.images import ImageInput

ANNOTATORS_REPO = "lllyasviel/Annotators"
MAX_DETECT_RESOLUTION = 4096  # the detectors' work grows with its square; the server accepts 4096² images


@dataclass
class _ControlNetAux(Extractor):
    """Shared loading for controlnet-aux detectors; `model` is a folder with the .pth files or a hub id."""

    detector: ClassVar[str]  # controlnet_aux class name
    files: ClassVar[tuple[str, ...]]  # weight files its from_pretrained reads from the folder
    what: ClassVar[str]
    weights = ANNOTATORS_REPO

    model: str = ""  # folder holding the detector's .pth files, or a hub repo id; empty: lllyasviel/Annotators
    detect_resolution: int = 512  # the detector runs with the short side resized to this (controlnet-aux default)
    device: str = "cpu"  # torch device to run on, e.g. "cuda"
    _loaded: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if importlib.util.find_spec("controlnet_aux") is None:
            raise T2IAdapterError(
                f"the {self.name!r} extractor runs {self.what} from controlnet-aux, which is not installed: "
                "pip install 't2iadapter[annotators]'"
            )
        check(
            64 <= self.detect_resolution <= MAX_DETECT_RESOLUTION,
            f"{self.name} needs 64 <= --detect-resolution <= {MAX_DETECT_RESOLUTION}, got {self.detect_resolution}",
        )
        check_device(self.device)  # an unknown device, or CUDA where there is none: one line, before any loading

    def load(self) -> None:
        """Find the weight files (folder, hub cache or download) and build the detector (once)."""
        if self._loaded is not None:
            return
        import controlnet_aux

        from t2iadapter.extractors.weights import hub_folder

        folder = hub_folder(
            self.model or ANNOTATORS_REPO, self.files, extractor=self.name, what=self.what, default=ANNOTATORS_REPO
        )
        self._loaded = getattr(controlnet_aux, self.detector).from_pretrained(folder).to(self.device)

    def _detect(self, image: ImageInput, **kwargs: Any) -> np.ndarray:
        """Run the detector and resize its HxWx3 uint8 map back to the input size."""
        import cv2

        from t2iadapter.extractors import images

        self.load()
        rgb = images.to_rgb(image)
        result = self._loaded(
            rgb,
            detect_resolution=self.detect_resolution,
            image_resolution=self.detect_resolution,
            output_type="np",
            **kwargs,
        )
        return cv2.resize(images.to_rgb(result), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)


@dataclass
class Sketch(_ControlNetAux):
    """PiDiNet edges binarised at 0.5; original `get_cond_sketch` (table5_pidinet.pth, edge > 0.5)."""

    name = "sketch"
    feeds = SKETCH_ADAPTERS
    channels = 1
    recipe = "PiDiNet (controlnet-aux PidiNetDetector) edge map > threshold → white lines on black"
    detector = "PidiNetDetector"
    files = ("table5_pidinet.pth",)
    what = "PiDiNet"

    threshold: float = 0.5  # the released SD1 sketch adapters were trained on edges > 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.threshold <= 1, f"{self.name} needs 0 <= --threshold <= 1, got {self.threshold}")

    def __call__(self, image: ImageInput) -> Image.Image:
        from t2iadapter.extractors import images

        edges = self._detect(image)[:, :, 0]
        return images.binary(edges, self.threshold * 255.0)


@dataclass
class Hed(_ControlNetAux):
    """HED soft edges (ControlNet's Apache-2 HED), binarised for the sketch adapters."""

    name = "hed"
    feeds = SKETCH_ADAPTERS
    channels = 1
    recipe = "HED (controlnet-aux HEDdetector) edge map > threshold → white lines on black"
    detector = "HEDdetector"
    files = ("ControlNetHED.pth",)
    what = "HED"

    threshold: float = 0.5  # binarise as the sketch recipe does; 0 keeps the soft edge map

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.threshold <= 1, f"{self.name} needs 0 <= --threshold <= 1, got {self.threshold}")

    def __call__(self, image: ImageInput) -> Image.Image:
        from t2iadapter.extractors import images

        edges = self._detect(image)[:, :, 0]
        if self.threshold <= 0:
            return images.to_pil(edges)
        return images.binary(edges, self.threshold * 255.0)


@dataclass
class Lineart(_ControlNetAux):
    """Line art (ControlNet 1.1 lineart generator), white lines on black, as the SDXL lineart adapter's card."""

    name = "lineart"
    feeds = LINEART_ADAPTERS
    channels = 1
    recipe = "controlnet-aux LineartDetector (sk_model.pth; coarse: sk_model2.pth), soft white lines on black"
    detector = "LineartDetector"
    files = ("sk_model.pth", "sk_model2.pth")
    what = "the lineart generator"

    coarse: bool = False  # the coarse model draws fewer, bolder lines

    def __call__(self, image: ImageInput) -> Image.Image:
        from t2iadapter.extractors import images

        return images.to_pil(self._detect(image, coarse=self.coarse)[:, :, 0])


@dataclass
class OpenPose(_ControlNetAux):
    """OpenPose body keypoints drawn as coloured limbs (controlnet-aux OpenposeDetector, ControlNet 1.1 drawing)."""

    name = "openpose"
    feeds = OPENPOSE_ADAPTERS
    channels = 3
    recipe = "controlnet-aux OpenposeDetector (body_pose_model.pth) → skeleton in OpenPose colours"
    detector = "OpenposeDetector"
    files = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
    what = "OpenPose"

    def __call__(self, image: ImageInput) -> Image.Image:
        from t2iadapter.extractors import images

        return images.to_pil(self._detect(image, include_body=True, include_hand=False, include_face=False))
