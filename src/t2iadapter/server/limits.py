"""What the server accepts and what it loads: frozen dataclasses filled from `t2iadapter serve` options."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from t2iadapter.errors import ConfigError


@dataclass(frozen=True)
class Limits:
    """Bounds on one request and on the queue; a request beyond them is refused, never truncated."""

    max_upload_mb: float = 10.0  # request body size; larger bodies get 413 before they are parsed
    max_steps: int = 50  # denoising steps per request; a CPU step of SD1.5 at 512px takes seconds
    max_side: int = 1024  # output width/height in pixels (SD1.5 was trained at 512, SDXL at 1024)
    max_input_side: int = 4096  # width/height of an uploaded image (a phone photo fits)
    max_images: int = 4  # images per generation request
    # The work of one request in megapixel-steps, width x height x steps x images / 1e6: what its time grows
    # with. 64 admits 512² x 50 steps x 4 images (52) or 1024² x 50 steps (52), not 1024² x 20 steps x 4 (84).
    max_work: float = 64.0
    queue_size: int = 8  # generations waiting behind the running one; one more gets 429
    timeout: float = 300.0  # seconds from arrival to result (queue wait included); later gets 504
    # Dynamic batching: compatible requests (same size, steps, scheduler, guidance, adapter set) share UNet calls.
    # A GPU runs a batch of 16 at ~10x the images/s of one at a time; a CPU gains little, loses nothing.
    max_batch: int = 4  # images per batch (a request of more images runs alone); 1 turns batching off
    batch_wait_ms: float = 10.0  # how long a worker holding one request waits for company before it starts

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "timeout", "max_work"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not math.isfinite(self.max_upload_mb):  # a byte count: inf is no number of bytes (OverflowError)
            raise ConfigError(f"max_upload_mb must be a finite number of MB, got {self.max_upload_mb}")
        # a worker holding a lone request waits this long for company: inf killed the worker thread (OverflowError)
        if not 0 <= self.batch_wait_ms < math.inf:
            raise ConfigError(f"batch_wait_ms must be a finite number >= 0, got {self.batch_wait_ms}")
        for name in ("max_steps", "max_side", "max_input_side", "max_images", "queue_size", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def check_work(self, width: int, height: int, steps: int, images: int) -> None:
        """ConfigError (→ 422) when a request's megapixel-steps pass `max_work`, naming the option that raises it."""
        work = width * height * steps * images / 1e6
        if work > self.max_work:
            raise ConfigError(
                f"this request is {work:.3g} megapixel-steps ({width}x{height} x {steps} steps x {images} images), "
                f"above this server's limit of {self.max_work:g}; ask for fewer pixels, steps or images "
                "(the operator can raise it with `t2iadapter serve --max-work`)"
            )


BIG_OUTPUT = 1024 * 1024  # output pixels x images from which the worker hands memory back after a job


@dataclass(frozen=True)
class ServerSettings:
    """What to load: a base and adapters registered under names (the only names clients may use)."""

    base: str = "demo"  # preset (demo, tiny, sd15...), diffusers folder, single file or hub id
    adapters: dict[str, str] = field(default_factory=dict)  # registered name → checkpoint path/demo name/hub id
    fuser: str | None = None  # CoAdapter fuser checkpoint: enables compose="fuser"
    device: str | None = None  # default: cuda if available
    dtype: str | None = None  # fp32/fp16/bf16; default fp16 on GPU, fp32 on CPU
    controlnets: dict[str, str] = field(default_factory=dict)  # registered name → diffusers ControlNet (issue 16)
    devices: tuple[str, ...] = ()  # one model worker per entry (cuda:0, cuda:1; cpu twice for tests); () = (device,)
    fast: bool | str = False  # AdapterPipeline.optimize() on each worker: True/"auto" or a precision (bf16, fp8, ...)
    warmup: tuple[tuple[int, int], ...] = ()  # (width, height)s each worker runs once at start-up (compiles, in fast mode)
    cache_dir: str | None = None  # fast mode's compiled-graph files (None: compile_cache.cache_dir())
    aot: bool | None = None  # fast mode's UNet through AOTInductor (None: $T2IADAPTER_AOT)

    def __post_init__(self) -> None:
        from t2iadapter.generation.request import SIDE_RANGE

        lo, hi = SIDE_RANGE
        for w, h in self.warmup:  # a bad size fails here, not in a worker after the models have loaded
            if not (lo <= w <= hi and lo <= h <= hi):
                raise ConfigError(f"warmup size {w}x{h} is out of range ({lo}..{hi} pixels a side)")

    def load_pipeline(self, device: str | None = None):
        """The AdapterPipeline these settings describe (loads weights; seconds to minutes)."""
        from t2iadapter.generation.pipeline import AdapterPipeline, resolve_device

        device, dtype = resolve_device(device or self.device, self.dtype)
        pipe = AdapterPipeline.from_pretrained(self.base, dict(self.adapters), fuser=self.fuser, device=device, dtype=dtype,
                                               controlnets=dict(self.controlnets))
        if not self.fast:
            return pipe
        precision = None if self.fast is True or self.fast == "auto" else str(self.fast)
        return pipe.optimize(precision=precision, cache_dir=self.cache_dir, aot=self.aot)

    def load_pipelines(self) -> list[tuple[str, object]]:
        """(worker name, pipeline) per device: a copy of the models on each; names are unique (cpu, cpu#1)."""
        out: list[tuple[str, object]] = []
        for device in self.devices or (self.device,):
            pipe = self.load_pipeline(device)
            name = str(pipe.device)
            taken = sum(1 for n, _ in out if n.split("#")[0] == name)
            out.append((f"{name}#{taken}" if taken else name, pipe))
        return out
