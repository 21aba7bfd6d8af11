"""The VAE's latent space, for every family: encoding and scaling into it (trainer), out of it (pipeline).

diffusers' VAEs describe their latent normalisation in the config: SD1/SD2/SDXL multiply by
`scaling_factor`; SD3/FLUX-style VAEs subtract `shift_factor` first; some SDXL-family VAEs
(e.g. Playground) give per-channel `latents_mean`/`latents_std`. One pair of functions reads them all,
so the trainer's targets and the pipeline's decode always agree.
"""
from __future__ import annotations

from typing import Any

import torch

from t2iadapter.bases import placement


def posterior(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE encoder's diagonal Gaussian posterior parameters [B, 2C, h, w] (mean, log-variance) of images in [-1, 1]."""
    return vae.encode(pixels).latent_dist.parameters


def sample_posterior(moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A draw from the posterior given its [B, 2C, h, w] parameters (mean, log-variance), in float32."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device)
    return mean + std * noise


def _stats(config: Any, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(mean, std) of the raw latents, per channel [1, C, 1, 1] or scalars (shift_factor, 1)."""
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        return (torch.tensor(mean).view(1, -1, 1, 1).to(like), torch.tensor(std).view(1, -1, 1, 1).to(like))
    return getattr(config, "shift_factor", None) or 0.0, 1.0


def to_scaled(vae_config: Any, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents → the normalised latents the UNet is trained on: (z - mean) · scaling_factor / std."""
    mean, std = _stats(vae_config, latents)
    return (latents - mean) * vae_config.scaling_factor / std


def from_scaled(vae_config: Any, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_scaled`: z · std / scaling_factor + mean."""
    mean, std = _stats(vae_config, latents)
    return latents * std / vae_config.scaling_factor + mean


def decode(vae: Any, latents: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """Normalised latents → images in [0, 1]; `upcast` decodes an fp16 VAE in fp32 (SDXL's `force_upcast`)."""
    upcast = upcast and placement(vae)[1] == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        latents = from_scaled(vae.config, latents.to(placement(vae)[1]))
        image = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    return (image / 2 + 0.5).clamp(0, 1)


def encode(vae: Any, pixels: torch.Tensor, generator: torch.Generator, *, upcast: bool = False) -> torch.Tensor:
    """Images in [-1, 1] → normalised latents, one draw from the posterior (diffusers' img2img/inpaint `retrieve_latents`).

    The draw uses `generator` as diffusers does (same order, same numbers); `upcast` encodes an fp16 VAE in
    fp32 (SDXL's `force_upcast`).
    """
    upcast = upcast and placement(vae)[1] == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        raw = vae.encode(pixels.to(*placement(vae))).latent_dist.sample(generator)
    finally:
        if upcast:
            vae.to(torch.float16)
    return to_scaled(vae.config, raw)
