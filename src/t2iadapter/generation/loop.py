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
from t2iadapter.generation.schedulers import step_kwargs
from t2iadapter.generation.text import Prompts

Callback = Callable[[int, Any, torch.Tensor], None]


@dataclass
class Denoise:
    """One call's loop inputs: the base, a fresh scheduler, the noise's shape and generator, and the conditioning."""

    base: Any  # BaseModel
    scheduler: Any  # fresh, timesteps not set yet
    shape: tuple[int, int, int, int]  # latents [B, C, h, w]
    generator: torch.Generator
    prompts: Prompts
    composition: Composition
    steps: int  # N of the windows (schedulers such as Heun run more timesteps than steps)
    guidance_scale: float
    added: dict[str, torch.Tensor] | None  # SDXL's pooled text and time ids
    eta: float = 0.0
    callback: Callback | None = None
    progress: bool = True
    controlnets: Any = None  # ControlNets (issue 16): generation.controlnet.ControlNets, run every step
    source: Any = None  # img2img.Source: start from an image (and mask); None: text-to-image
    run_timesteps: Any = None  # the timesteps run (set by start(); img2img runs the schedule's tail)
    latents: torch.Tensor | None = None  # the caller's initial noise (diffusers' `latents=`), scaled like drawn noise

    def start(self, timestep_device: Any, dtype: torch.dtype) -> torch.Tensor:
        """Set the timesteps and draw the initial latents (as diffusers: CPU generator, scaled by init_noise_sigma)."""
        self.scheduler.set_timesteps(self.source.schedule_steps if self.source else self.steps, device=timestep_device)
        self.run_timesteps = self.scheduler.timesteps
        if self.source is not None:
            return self.source.start(self, dtype)
        g = self.generator
        if self.latents is not None:
            noise = self.latents.to(self.base.unet.device, dtype)
        else:
            noise = torch.randn(self.shape, generator=g, device=g.device, dtype=dtype).to(self.base.unet.device)
        return noise * self.scheduler.init_noise_sigma

    def timesteps(self):
        from tqdm.auto import tqdm

        return enumerate(tqdm(self.run_timesteps, desc="denoising", disable=not self.progress, leave=False))

    def guide(self, noise: torch.Tensor) -> torch.Tensor:
        if not self.prompts.cfg:
            return noise
        uncond, cond = noise.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def scaled_input(self, latents: torch.Tensor, t: Any) -> torch.Tensor:
        """The latents as a step's networks see them: doubled for CFG, scaled by the scheduler (ControlNets take this)."""
        x = torch.cat([latents] * 2) if self.prompts.cfg else latents
        return self.scheduler.scale_model_input(x, t)

    def unet_input(self, scaled: torch.Tensor) -> torch.Tensor:
        """What the UNet takes: the scaled latents, plus mask and masked-image latents for a 9-channel inpainting UNet."""
        return scaled if self.source is None else self.source.unet_input(scaled)

    def step(self, i: int, t: Any, noise: torch.Tensor, latents: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        latents = self.scheduler.step(self.guide(noise), t, latents, **kwargs).prev_sample
        if self.source is not None:
            latents = self.source.blend(i, latents, self.scheduler, self.run_timesteps)
        if self.callback is not None:
            self.callback(i, t, latents)
        return latents


def denoise_eager(d: Denoise) -> torch.Tensor:
    """The loop as diffusers writes it: features absent (not zero) outside every window."""
    unet = d.base.unet
    latents = d.start(unet.device, d.prompts.text.context.dtype)
    kwargs = step_kwargs(d.scheduler, d.generator, d.eta)
    for i, t in d.timesteps():
        maps, seq = d.composition.at(i, d.steps)
        scaled, context = d.scaled_input(latents, t), d.prompts.context(seq)
        control = d.controlnets.at(i, d.steps, scaled, t, context, d.added) if d.controlnets else None  # issue 16
        noise = unet_hook.unet_forward(unet, d.unet_input(scaled), t, context, maps, added_cond_kwargs=d.added,
                                       control=control)
        latents = d.step(i, t, noise, latents, kwargs)
    return latents


def denoise_fast(d: Denoise) -> torch.Tensor:
    """Fast mode: every step has the same UNet inputs (zeros where no adapter acts), no host sync per step.

    The scheduler works on host timesteps and float32 latents; the UNet gets device timesteps made before
    the loop and runs in its own (half) precision; its output is copied out of the CUDA-graph buffer
    before the next replay (schedulers keep outputs).
    """
    unet = d.base.unet
    latents = d.start("cpu", torch.float32)  # half-precision randn is a rounded float32 draw: same noise
    kwargs = step_kwargs(d.scheduler, d.generator, d.eta)
    clock = LoopClock(d.run_timesteps, latents.device)
    spatial = d.composition.spatial
    zeros = unet_hook.zero_features(unet, d.composition.of(spatial)[0]) if spatial else \
        unet_hook.no_features(unet, d.shape[0] * (2 if d.prompts.cfg else 1), d.shape[2:], dtype=unet.dtype,
                              device=unet.device)
    for i, t in d.timesteps():
        maps, seq = d.composition.at(i, d.steps)
        scaled, ut, context = d.scaled_input(latents, t).to(unet.dtype), clock.unet_timestep(i), d.prompts.context(seq)
        control = d.controlnets.at(i, d.steps, scaled, ut, context, d.added, static=True) if d.controlnets else None  # issue 16
        noise = unet_hook.unet_forward(unet, d.unet_input(scaled), ut, context, zeros if maps is None else maps,
                                       added_cond_kwargs=d.added, control=control)
        latents = d.step(i, t, noise.to(torch.float32, copy=True), latents, kwargs)
    return latents
