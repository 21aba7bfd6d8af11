"""The extractor interface: a typed options dataclass that is called on an image (DESIGN.md §5)."""

from __future__ import annotations

import abc
import dataclasses
import typing
from typing import Any, ClassVar

from t2iadapter.errors import ConfigError

if typing.TYPE_CHECKING:
    from t2iadapter.extractors.images import ImageInput

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MAX_SIDE = 4096  # the largest image side the server accepts: the bound on sizes the extractors draw or take

# Released adapters, by the condition they were trained on (DESIGN.md §4). SD1 and CoAdapter
# names are files of the TencentARC/T2I-Adapter hub repo; SDXL names are TencentARC/ hub repos.
SKETCH_ADAPTERS = (
    "t2iadapter_sketch_sd14v1",
    "t2iadapter_sketch_sd15v2",
    "coadapter-sketch-sd15v1",
    "t2i-adapter-sketch-sdxl-1.0",
)
CANNY_ADAPTERS = (
    "t2iadapter_canny_sd14v1",
    "t2iadapter_canny_sd15v2",
    "coadapter-canny-sd15v1",
    "t2i-adapter-canny-sdxl-1.0",
)
COLOR_ADAPTERS = ("t2iadapter_color_sd14v1", "coadapter-color-sd15v1")
DEPTH_ADAPTERS = (
    "t2iadapter_depth_sd14v1",
    "t2iadapter_depth_sd15v2",
    "coadapter-depth-sd15v1",
    "t2i-adapter-depth-midas-sdxl-1.0",
)
ZOEDEPTH_ADAPTERS = ("t2iadapter_zoedepth_sd15v1", "t2i-adapter-depth-zoe-sdxl-1.0")
OPENPOSE_ADAPTERS = ("t2iadapter_openpose_sd14v1", "t2i-adapter-openpose-sdxl-1.0")
SEG_ADAPTERS = ("t2iadapter_seg_sd14v1",)
LINEART_ADAPTERS = ("t2i-adapter-lineart-sdxl-1.0",)
STYLE_ADAPTERS = ("t2iadapter_style_sd14v1", "coadapter-style-sd15v1")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class Extractor(abc.ABC):
    """An image → condition-image callable; subclasses are dataclasses whose fields are the options."""

    name: ClassVar[str]
    feeds: ClassVar[tuple[str, ...]]  # released adapters trained on this condition
    channels: ClassVar[int | None]  # 1 (white lines on black), 3 (RGB), None: not an image
    recipe: ClassVar[str]  # one line: what it computes and where the recipe comes from
    weights: ClassVar[str | None] = None  # hub repo the weights come from; None: no weights
    input_kind: ClassVar[str] = "image"
    input_suffixes: ClassVar[tuple[str, ...]] = IMAGE_SUFFIXES
    output_suffix: ClassVar[str] = ".png"

    @abc.abstractmethod
    def __call__(self, image: ImageInput) -> Any:
        """Compute the condition for one input."""

    def load(self) -> None:  # noqa: B027 - a hook: offline extractors have nothing to load
        """Make the extractor ready to run (load weights); offline extractors have nothing to load."""

    @classmethod
    def options(cls) -> dict[str, tuple[type, Any]]:
        """The user-settable options as {name: (type, default)}, read from the dataclass fields."""
        hints = typing.get_type_hints(cls)
        return {
            f.name: (_scalar_type(hints[f.name]), f.default)
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.init
        }

    @classmethod
    def coerce(cls, raw: dict[str, str]) -> dict[str, Any]:
        """Turn option strings (from the command line) into typed values for this extractor."""
        known = cls.options()
        values: dict[str, Any] = {}
        for key, text in raw.items():
            if key not in known:
                valid = ", ".join("--" + k.replace("_", "-") for k in known) or "none"
                raise ConfigError(
                    f"extractor {cls.name!r} has no option --{key.replace('_', '-')} (its options: {valid})"
                )
            kind = known[key][0]
            values[key] = _parse(kind, text, f"--{key.replace('_', '-')}")
        return values


def _scalar_type(hint: Any) -> type:
    """The concrete type of an option annotation (int, float, bool or str)."""
    if hint in (int, float, bool, str):
        return hint
    raise TypeError(f"extractor options must be int, float, bool or str, not {hint!r}")


def _parse(kind: type, text: str, flag: str) -> Any:
    """Parse one option string as `kind`, with a user-facing error."""
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{flag} expects true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{flag} expects a{'n' if kind is int else ''} {kind.__name__}, got {text!r}") from None


def check(condition: bool, message: str) -> None:
    """Fail fast with a ConfigError when an option value cannot work."""
    if not condition:
        raise ConfigError(message)
