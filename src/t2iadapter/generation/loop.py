"""The denoising loop, eager and fast: the same steps as diffusers' adapter pipelines (noise, scheduler calls, CFG).

Adapter features were computed once before the loop (paper §3.2); each step only picks the composed
features of the adapters whose window holds it and adds them to both CFG branches.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from t2iadapter import unet_hook
from t2iadapter.generation.composition import Composition
from t2iadapter.generation.fast import LoopClock
from t2iadapter.generation.text import Prompts

Callback = Callable[[int, Any, torch.Tensor], None]


@dataclass
class Denoise:
    """One call's loop inputs: the UNet, a fresh scheduler with its timesteps set, noise and conditioning."""

    unet: Any
    scheduler: Any
    latents: torch.Tensor  # initial noise, already scaled by the scheduler's init_noise_sigma
    prompts: Prompts
    composition: Composition
    steps: int  # N of the windows (schedulers such as Heun run more timesteps than steps)
    guidance_scale: float
    added: dict[str, torch.Tensor] | None  # SDXL's pooled text and time ids
    step_kwargs: dict[str, Any]
    callback: Callback | None = None
    progress: bool = True

    def timesteps(self):
        from tqdm.auto import tqdm

        return enumerate(tqdm(self.scheduler.timesteps, desc="denoising", disable=not self.progress, leave=False))

    def guide(self, noise: torch.Tensor) -> torch.Tensor:
        if not self.prompts.cfg:
            return noise
        uncond, cond = noise.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def model_input(self, latents: torch.Tensor, t: Any) -> torch.Tensor:
        x = torch.cat([latents] * 2) if self.prompts.cfg else latents
        return self.scheduler.scale_model_input(x, t)


def denoise_eager(d: Denoise) -> torch.Tensor:
    """The loop as diffusers writes it: features absent (not zero) outside every window."""
    latents = d.latents
    for i, t in d.timesteps():
        maps, seq = d.composition.at(i, d.steps)
        noise = unet_hook.unet_forward(d.unet, d.model_input(latents, t), t, d.prompts.context(seq), maps,
                                       added_cond_kwargs=d.added)
        latents = d.scheduler.step(d.guide(noise), t, latents, **d.step_kwargs).prev_sample
        if d.callback is not None:
            d.callback(i, t, latents)
    return latents


def denoise_fast(d: Denoise, zeros: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Fast mode: every step has the same UNet inputs (zeros where no adapter acts), no host sync per step.

    The scheduler works on host timesteps and float32 latents; the UNet gets device timesteps made before
    the loop and runs in `dtype`; its output is copied out of the CUDA-graph buffer before the next replay.
    """
    clock = LoopClock(d.scheduler.timesteps, d.latents.device)
    latents = d.latents
    for i, t in d.timesteps():
        maps, seq = d.composition.at(i, d.steps)
        noise = unet_hook.unet_forward(d.unet, d.model_input(latents, t).to(dtype), clock.unet_timestep(i),
                                       d.prompts.context(seq), zeros if maps is None else maps, added_cond_kwargs=d.added)
        noise = noise.to(torch.float32, copy=True)
        latents = d.scheduler.step(d.guide(noise), t, latents, **d.step_kwargs).prev_sample
        if d.callback is not None:
            d.callback(i, t, latents)
    return latents
