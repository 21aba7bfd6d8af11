"""`GenerationRequest`: everything one generation takes, with the one set of defaults and checks (no torch here).

The Python API (`AdapterPipeline.__call__`/`generate`), the CLI (`t2iadapter generate`), the server's
schema and, through `GET /v1/models`, the web page all take their defaults from this module.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

from t2iadapter.errors import ConfigError
from t2iadapter.generation.schedulers import scheduler_key

COMPOSE_MODES = ("sum", "fuser")
# How the fuser meets step windows: "once" (the original CoAdapter: fuse all conditions once, gate the fused
# features per step) or "active" (fuse again over the adapters active at each step).
FUSER_WINDOW_MODES = ("once", "active")
MAX_STEPS = 1000
MAX_IMAGES = 256  # images per prompt in one call: 10**7 passed the checks and failed in torch's allocator
# strength=None means: 0.8 for img2img, 1.0 for inpainting (diffusers' StableDiffusionImg2Img/InpaintPipeline defaults)
STRENGTH_DEFAULTS = {"img2img": 0.8, "inpaint": 1.0}
SIDE_RANGE = (8, 8192)  # pixels a side any pipeline accepts (servers may lower the top)
SEED_RANGE = (0, 2**64)  # [lo, hi): what torch.Generator.manual_seed takes without wrapping around
GUIDANCE_RANGE = (0.0, 100.0)  # classifier-free guidance; diffusers' pipelines use 1..20, >100 only gives noise
OUTPUT_TYPES = ("pil", "np", "pt", "latent")  # what `AdapterPipeline.__call__/generate` return (diffusers' names)


@dataclass(frozen=True)
class Window:
    """Fraction of the denoising in which an adapter acts; step i (0-based, sampling order) of N is active when
    `N - int((1 - start)·N) <= i < N - int((1 - end)·N)`.

    For start=0 this is exactly the original's `cond_tau` gate (`N - i - 1 >= int((1 - tau)·N)`, TencentARC
    ddim.py); windows that meet (0:a, a:1) split the steps with no gap or overlap. ComfyUI calls these
    start/end percent; diffusers' SDXL `adapter_conditioning_factor` rounds the other way (`i < int(f·N)`).
    """

    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (self.start, self.end)):
            raise ConfigError(f"window start and end must be numbers, got {self.start!r}:{self.end!r}")
        if not (0.0 <= self.start <= self.end <= 1.0):
            raise ConfigError(f"window {self.start}:{self.end} must satisfy 0 <= start <= end <= 1")

    @classmethod
    def parse(cls, value: "Window | tuple[float, float] | list[float] | str | None") -> "Window":
        """A window from `Window`, `(start, end)`, `"START:END"` or None (the whole run)."""
        if value is None:
            return cls()
        if isinstance(value, Window):
            return value
        if isinstance(value, str):
            try:
                start, end = (float(v) for v in value.split(":"))
            except ValueError:
                raise ConfigError(f"window {value!r} must look like START:END, e.g. 0:0.5") from None
            return cls(start, end)
        try:
            start, end = value
            return cls(float(start), float(end))
        except (TypeError, ValueError):
            raise ConfigError(f"window {value!r} must be (start, end) or 'START:END'") from None

    def steps(self, total: int) -> range:
        """The active step indices of a `total`-step run."""
        return range(total - int((1 - self.start) * total), total - int((1 - self.end) * total))

    def active(self, step: int, total: int) -> bool:
        return step in self.steps(total)

    def controlnet_active(self, step: int, total: int) -> bool:
        """A ControlNet's window, as diffusers' `control_guidance_start/end` keep step i of N: i/N >= start and
        (i+1)/N <= end (one step fewer than `active` where end·N is not whole, e.g. 0:0.5 of 25 steps: 12, not 13)."""
        return not (step / total < self.start or (step + 1) / total > self.end)

    def __str__(self) -> str:
        return f"{self.start:g}:{self.end:g}"


@dataclass(frozen=True)
class AdapterUse:
    """One loaded adapter taking part in a call: its name, condition (image, array, tensor or path), weight, window.

    A style adapter's condition is its reference image (or precomputed CLIP-vision tokens).
    """

    name: str
    condition: Any
    weight: float = 1.0  # feature scale (original `cond_weight`); 0 turns the adapter off, >1 strengthens it
    window: Window = Window()  # the steps in which it acts (original `cond_tau` = Window(0, tau))

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"an adapter's name must be a string, got {self.name!r}")
        object.__setattr__(self, "window", Window.parse(self.window))
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ConfigError(f"weight of {self.name!r} must be a finite number, got {self.weight!r}")


@dataclass(frozen=True)
class ControlNetUse(AdapterUse):
    """One loaded ControlNet taking part in a call: its name, condition image, weight (diffusers'
    `controlnet_conditioning_scale`) and window (the adapters' step rule; outside it the ControlNet does not run)."""


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one generation takes; the defaults here are the only ones (API, CLI, server, web page)."""

    prompt: str | tuple[str, ...]
    adapters: tuple[AdapterUse, ...] = ()
    negative_prompt: str | tuple[str, ...] | None = None  # None: "" (SD1/SD2) or zero context (SDXL), as diffusers
    steps: int = 30  # denoising steps
    guidance_scale: float = 7.5  # classifier-free guidance; <= 1 turns CFG off
    size: tuple[int, int] | None = None  # (width, height); None: the base's own size
    seed: int | None = None  # None: a random one, returned in the parameters
    scheduler: Any = None  # a name from `scheduler_names()` or a diffusers scheduler (its kind and config); None: the base's
    num_images: int = 1  # per prompt
    compose: str = "sum"  # "sum" (Σ w·F, paper §3.4) or "fuser" (CoAdapter)
    fuser_windows: str = "once"  # with compose="fuser": see FUSER_WINDOW_MODES
    eta: float = 0.0  # DDIM eta (schedulers that take it)
    # --- img2img / inpainting (issue 15) ---
    init_image: Any = None  # image to start from (path, PIL, array, tensor); None: text-to-image
    strength: float | None = None  # noise level to start from, in (0, 1] (diffusers' img2img); None: STRENGTH_DEFAULTS
    mask_image: Any = None  # inpainting (needs init_image, same size): white = repaint, black = keep
    paste_back: bool = False  # inpainting: paste the kept pixels of init_image back exactly after decoding
    # --- ControlNets (issue 16) ---
    controlnets: tuple[ControlNetUse, ...] = ()  # run every step on both CFG branches; residuals add to the adapters'
    # --- diffusers habits (issue 14) ---
    clip_skip: int | None = None  # skip the last k CLIP layers (diffusers' clip_skip); None/0: the last layer
    prompt_2: str | tuple[str, ...] | None = None  # SDXL's second text encoder; None: the same prompt
    negative_prompt_2: str | tuple[str, ...] | None = None  # SDXL's second encoder's negative; None: negative_prompt
    original_size: tuple[int, int] | None = None  # SDXL micro-conditioning (width, height); None: the output canvas

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", _texts("prompt", self.prompt))
        if not self.prompts:
            raise ConfigError("no prompt given")
        for name in ("negative_prompt", "prompt_2", "negative_prompt_2"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _texts(name, value))
                if not isinstance(getattr(self, name), str) and len(getattr(self, name)) != len(self.prompts):
                    label = "negative prompts" if name == "negative_prompt" else name
                    raise ConfigError(f"got {len(getattr(self, name))} {label} for {len(self.prompts)} prompts")
        self._check_uses("adapters", "AdapterUse", "an adapter")
        for use in self.adapters:  # a list of conditions: one per prompt (diffusers' batched `image`)
            if isinstance(use.condition, (list, tuple)) and len(use.condition) != len(self.prompts):
                raise ConfigError(f"{use.name!r} got {len(use.condition)} conditions for {len(self.prompts)} prompts; "
                                  "give one condition, or one per prompt")
        if isinstance(self.scheduler, type):
            raise ConfigError(f"scheduler must be a name or a scheduler object, not the class "
                              f"{self.scheduler.__name__} (e.g. {self.scheduler.__name__}.from_config(pipe.base.scheduler.config))")
        if not (self.scheduler is None or isinstance(self.scheduler, str)
                or (hasattr(self.scheduler, "config") and hasattr(self.scheduler, "step"))):
            raise ConfigError(f"scheduler must be a name or a diffusers scheduler, not {type(self.scheduler).__name__}")
        if isinstance(self.scheduler, str):  # an unknown name fails here, not when a worker runs the request
            scheduler_key(self.scheduler)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise ConfigError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        if (isinstance(self.num_images, bool) or not isinstance(self.num_images, int)
                or not 1 <= self.num_images <= MAX_IMAGES):
            raise ConfigError(f"num_images must be from 1 to {MAX_IMAGES}, got {self.num_images}; "
                              "for more images, make several calls")
        lo, hi = GUIDANCE_RANGE
        if (isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float))
                or not lo <= self.guidance_scale <= hi):  # NaN fails both comparisons
            raise ConfigError(f"guidance_scale must be a number from {lo:g} to {hi:g}, got {self.guidance_scale!r}")
        if self.compose not in COMPOSE_MODES:
            raise ConfigError(f"compose must be 'sum' or 'fuser', got {self.compose!r}")
        if self.fuser_windows not in FUSER_WINDOW_MODES:
            raise ConfigError(f"fuser_windows must be one of {', '.join(FUSER_WINDOW_MODES)}, got {self.fuser_windows!r}")
        if self.size is not None:
            size = (self.size, self.size) if isinstance(self.size, int) and not isinstance(self.size, bool) else self.size
            try:
                w, h = (_whole(v) for v in size)
            except (TypeError, ValueError):
                raise ConfigError(f"size must be (width, height) in whole pixels, or one side for a square, "
                                  f"got {self.size!r}") from None
            lo, hi = SIDE_RANGE
            if not (lo <= w <= hi and lo <= h <= hi):
                raise ConfigError(f"size {w}x{h} is out of range ({lo}..{hi} pixels a side)")
            object.__setattr__(self, "size", (w, h))
        self._check_controlnets()
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise ConfigError(f"seed must be from 0 to 2**64 - 1, got {self.seed}")
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not 0.0 <= self.eta <= 1.0:
            # DDIM's eta above 1 makes (1 − ᾱ − σ²) negative: an all-NaN (black) image; TCD's gamma asserts ≤ 1
            raise ConfigError(f"eta must be from 0 to 1 (DDIM's eta, TCD's gamma), got {self.eta!r}")
        if self.clip_skip is not None and (isinstance(self.clip_skip, bool) or not isinstance(self.clip_skip, int)
                                           or self.clip_skip < 0):
            raise ConfigError(f"clip_skip must be a whole number >= 0, got {self.clip_skip!r}")
        if self.original_size is not None:
            try:
                w, h = (_whole(v) for v in self.original_size)
            except (TypeError, ValueError):
                raise ConfigError(f"original_size must be (width, height), got {self.original_size!r}") from None
            if not (w > 0 and h > 0):
                raise ConfigError(f"original_size must be positive, got {w}x{h}")
            object.__setattr__(self, "original_size", (w, h))
        self._check_source()

    def _check_source(self) -> None:
        """img2img / inpainting options: strength in (0, 1] and at least one step; a mask needs an image."""
        if not isinstance(self.paste_back, bool):
            raise ConfigError(f"paste_back must be True or False, got {self.paste_back!r}")
        if self.init_image is None:
            for name in ("strength", "mask_image"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name} needs init_image (the image to start from)")
            if self.paste_back:
                raise ConfigError("paste_back needs init_image and mask_image (inpainting)")
            return
        if self.paste_back and self.mask_image is None:
            raise ConfigError("paste_back needs mask_image (inpainting)")
        s = self.strength
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s <= 1.0):
            raise ConfigError(f"strength must be in (0, 1] (the noise level to start from), got {s!r}")
        if int(self.steps * self.denoise_strength) < 1:
            raise ConfigError(f"strength {self.denoise_strength} of {self.steps} steps runs no step; "
                              f"raise strength or steps (int(steps·strength) must be >= 1)")

    @property
    def denoise_strength(self) -> float:
        """The strength this request runs with (its own, or the default for img2img / inpainting)."""
        if self.strength is not None:
            return float(self.strength)
        return STRENGTH_DEFAULTS["inpaint" if self.mask_image is not None else "img2img"]

    @property
    def run_steps(self) -> int:
        """Denoising steps actually run: all of them for text-to-image, int(steps·strength) from an image (diffusers)."""
        if self.init_image is None:
            return self.steps
        return min(int(self.steps * self.denoise_strength), self.steps)

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,) if isinstance(self.prompt, str) else self.prompt

    def _check_controlnets(self) -> None:  # ControlNets (issue 16), taken as the adapters are: one, or a list
        self._check_uses("controlnets", "ControlNetUse", "a ControlNet")
        both = {u.name for u in self.controlnets} & {u.name for u in self.adapters}
        if both:
            raise ConfigError(f"{sorted(both)} named both as an adapter and as a ControlNet")

    def _check_uses(self, field: str, kind: str, one: str) -> None:
        """`field` (adapters or controlnets) as a tuple of uses: one use or a list of them, each named once."""
        given = getattr(self, field)
        try:
            object.__setattr__(self, field, tuple((given,) if isinstance(given, AdapterUse) else given))
        except TypeError:
            raise ConfigError(f"{field} must be a list of {kind}, not {type(given).__name__}") from None
        for use in getattr(self, field):
            if not isinstance(use, AdapterUse):
                raise ConfigError(f"{field} must be {kind}(name, condition, ...) items, got {use!r:.60}")
        names = [u.name for u in getattr(self, field)]
        if len(set(names)) != len(names):
            raise ConfigError(f"{one} is used twice: {names}")

    def batch_key(self, size: tuple[int, int] | None = None) -> tuple:
        """What requests must share to run in one UNet call (`AdapterPipeline.generate_batch`): size, steps,
        scheduler, guidance, eta, composition and the adapter set. Prompts, conditions, seeds, weights and
        windows may differ. `size`: the resolved size when `self.size` is None.
        """
        return (self.size or size, self.steps, self.scheduler, self.guidance_scale, self.eta, self.compose,
                self.fuser_windows, tuple(sorted(u.name for u in self.adapters)))


def _texts(name: str, value: Any) -> str | tuple[str, ...]:
    """A string, or a tuple of strings from any list of them (one per prompt)."""
    if isinstance(value, str):
        return value
    try:
        items = tuple(value)
    except TypeError:
        items = None
    if items is None or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{name} must be a string or a list of strings, got {value!r:.60}")
    return items


def _whole(value: Any) -> int:
    """A whole number of pixels (64 or 64.0; not 63.5, not True): silently truncating would change the size."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(value)
    if value != int(value):
        raise ValueError(value)
    return int(value)


def use_defaults() -> dict[str, Any]:
    """Field → default of `AdapterUse` (weight, window)."""
    return {f.name: f.default for f in fields(AdapterUse) if f.name not in ("name", "condition")}


def defaults() -> dict[str, Any]:
    """Field → default of every `GenerationRequest` field that has one (what the server tells the web page)."""
    return {f.name: f.default for f in fields(GenerationRequest) if f.name not in ("prompt", "adapters", "controlnets")}


__all__ = ["AdapterUse", "ControlNetUse", "GenerationRequest", "Window", "defaults", "use_defaults", "COMPOSE_MODES",
           "FUSER_WINDOW_MODES", "GUIDANCE_RANGE", "OUTPUT_TYPES", "SEED_RANGE", "STRENGTH_DEFAULTS"]
