"""The generation wing: one request type in, images out (see docs/architecture.md for who calls whom).

request      GenerationRequest / AdapterUse / Window: the one set of defaults and checks (no torch)
pipeline     AdapterPipeline: load, move, optimize, generate(request), generate_batch(requests)
conditions   condition inputs → adapter input tensors (and fast mode's byte path)
composition  weighted sum, CoAdapter fuser, step windows (shared with the trainer)
controlnet   ControlNets beside the adapters: loading, checks, per-step residuals (issue 16)
text         prompt conditioning for classifier-free guidance
loop         the denoising loop: denoise_eager, denoise_fast, denoise_batch (many requests, one UNet call a step)
schedulers   schedulers by name
latents      VAE latent scaling for every family, decode
fast         fast mode: half precision, channels-last, fused attention, torch.compile
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from t2iadapter.generation.request import AdapterUse, ControlNetUse, GenerationRequest, Window, defaults

__all__ = ["AdapterPipeline", "AdapterUse", "ControlNetUse", "GenerationRequest", "GenerationResult", "Window", "defaults"]

if TYPE_CHECKING:
    from t2iadapter.generation.pipeline import AdapterPipeline, GenerationResult


def __getattr__(name: str) -> Any:
    # Lazy: the request type (and the server's schema built on it) imports no torch.
    if name in ("AdapterPipeline", "GenerationResult"):
        from t2iadapter.generation import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 't2iadapter.generation' has no attribute {name!r}")
