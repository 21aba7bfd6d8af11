"""The denoising loop, eager and fast: the same steps as diffusers' adapter pipelines (noise, scheduler calls, CFG).

Adapter features were computed once before the loop (paper §3.2); each step only picks the composed
features of the adapters whose window holds it and adds them to both CFG branches.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from t2iadapter import unet_hook
from t2iadapter.bases import placement
from t2iadapter.errors import ConfigError
from t2iadapter.generation.composition import Composition
from t2iadapter.generation.fast import LoopClock
from t2iadapter.generation.schedulers import step_kwargs
from t2iadapter.generation.text import Prompts

logger = logging.getLogger(__name__)

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
    steps: int  # the steps asked for (`evaluations` counts the UNet calls: Heun runs more)
    guidance_scale: float
    added: dict[str, torch.Tensor] | None  # SDXL's pooled text and time ids
    eta: float = 0.0
    callback: Callback | None = None
    progress: bool = True
    controlnets: Any = None  # ControlNets (issue 16): generation.controlnet.ControlNets, run every step
    source: Any = None  # img2img.Source: start from an image (and mask); None: text-to-image
    run_timesteps: Any = None  # the timesteps run (set by start(); img2img runs the schedule's tail)
    latents: torch.Tensor | None = None  # the caller's initial noise (diffusers' `latents=`), scaled like drawn noise
    guidance_cond: torch.Tensor | None = None  # [B, dim]: a guidance-distilled UNet's scale input (`guidance_embedding`)

    def start(self, timestep_device: Any, dtype: torch.dtype) -> torch.Tensor:
        """Set the timesteps and draw the initial latents (as diffusers: CPU generator, scaled by init_noise_sigma)."""
        name = type(self.scheduler).__name__
        steps = self.source.schedule_steps if self.source else self.steps  # img2img: the whole schedule's, as asked
        try:
            self.scheduler.set_timesteps(steps, device=timestep_device)
        except ValueError as exc:  # LCM/TCD: at most their original_inference_steps (50)
            raise ConfigError(f"{steps} steps: {name} refuses them ({str(exc).strip().splitlines()[0]}); "
                              f"use fewer steps") from None
        trained = self.scheduler.config.num_train_timesteps
        timesteps = self.scheduler.timesteps
        if float(timesteps.max()) >= trained:  # DDIM's "leading" spacing + steps_offset at 1000 steps
            raise ConfigError(f"{steps} steps are more than this scheduler can take here (its timesteps would pass "
                              f"{trained - 1}, the last it was trained on); use fewer steps or another scheduler")
        repeats = len(timesteps) - len(torch.unique(timesteps))
        if repeats > 1 and self.scheduler.order == 1 and not self.scheduler.config.get("use_karras_sigmas", False):
            # "leading" spacing of more steps than it can space (DPM++ 2M, UniPC at 1000: 1000 // 1001 = 0): one
            # timestep repeated, and multistep solvers divide by the zero step between them — an all-NaN image.
            # (PNDM repeats one timestep by design, second-order schedulers each one, and Karras sigmas round to
            # repeated timesteps from ~70 steps on, harmlessly.)
            raise ConfigError(f"{steps} steps are more than {name} can space over its {trained} trained "
                              f"timesteps (some repeat); use fewer steps")
        self.run_timesteps = timesteps
        latents = self.source.start(self, dtype) if self.source is not None else self._noise(dtype)  # (cuts img2img's)
        self._warn_idle_windows()
        return latents

    def _warn_idle_windows(self) -> None:
        """A weighted adapter or ControlNet whose window keeps none of this run's evaluations does nothing: say so.
        (Windows count steps as the original's `cond_tau` does, in floating point: 0:0.9 of 10 steps keeps all 10,
        since 1 − 0.9 is 0.0999… there, and so 0.9:1 keeps none.)"""
        total = self.evaluations
        idle = [(n, w) for n, w in self.composition.windows.items() if not w.steps(total)]
        if self.controlnets:  # (diffusers' control_guidance rule)
            idle += [(n, w) for n, w in self.controlnets.windows.items()
                     if not any(w.controlnet_active(i, total) for i in range(total))]
        for name, window in idle:
            logger.warning("the window %s of %r keeps none of this run's %d steps: it does nothing here",
                           window, name, total)

    def _noise(self, dtype: torch.dtype) -> torch.Tensor:
        g = self.generator
        if self.latents is not None:
            noise = self.latents.to(placement(self.base.unet)[0], dtype)
        else:
            noise = torch.randn(self.shape, generator=g, device=g.device, dtype=dtype).to(placement(self.base.unet)[0])
        return noise * self.scheduler.init_noise_sigma

    @property
    def evaluations(self) -> int:
        """What windows are measured against: the UNet evaluations this run makes (the timesteps after `start`).
        That is `steps` for first-order schedulers; Heun evaluates 2N − 1 times and PNDM N + 1, and the default
        window (0, 1) must keep every one of them, as diffusers' SD1 adapter pipeline and its ControlNet
        pipelines (`controlnet_keep` over all timesteps) do. (Its SDXL adapter pipeline cuts at
        `i < int(N · adapter_conditioning_factor)` over the evaluations, so there Heun loses the adapter after N.)"""
        return len(self.run_timesteps)

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


def guidance_embedding(guidance_scale: float, dim: int, rows: int) -> torch.Tensor:
    """The sinusoidal embedding [rows, dim] of w = scale − 1 that a guidance-distilled UNet (LCM, `time_cond_proj_dim`)
    takes as `timestep_cond` instead of running CFG (LCM paper §4.2; diffusers' `get_guidance_scale_embedding`)."""
    w = torch.tensor(guidance_scale - 1).repeat(rows) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def denoise_eager(d: Denoise) -> torch.Tensor:
    """The loop as diffusers writes it: features absent (not zero) outside every window."""
    unet = d.base.unet
    latents = d.start(placement(unet)[0], d.prompts.text.context.dtype)
    kwargs = step_kwargs(d.scheduler, d.generator, d.eta)
    for i, t in d.timesteps():
        maps, seq = d.composition.at(i, d.evaluations)
        scaled, context = d.scaled_input(latents, t), d.prompts.context(seq)
        control = d.controlnets.at(i, d.evaluations, scaled, t, context, d.added) if d.controlnets else None  # issue 16
        noise = unet_hook.unet_forward(unet, d.unet_input(scaled), t, context, maps, added_cond_kwargs=d.added,
                                       timestep_cond=d.guidance_cond, control=control)
        latents = d.step(i, t, noise, latents, kwargs)
    return latents


def denoise_fast(d: Denoise) -> torch.Tensor:
    """Fast mode: every step has the same UNet inputs (zeros where no adapter acts), no host sync per step.

    The scheduler works on host timesteps and float32 latents; the UNet gets device timesteps made before
    the loop and runs in its own (half) precision; its output is copied out of the CUDA-graph buffer
    before the next replay (schedulers keep outputs).
    """
    unet = d.base.unet
    device, dtype = placement(unet)
    latents = d.start("cpu", torch.float32)  # half-precision randn is a rounded float32 draw: same noise
    kwargs = step_kwargs(d.scheduler, d.generator, d.eta)
    clock = LoopClock(d.run_timesteps, latents.device)
    spatial = d.composition.spatial
    zeros = unet_hook.zero_features(unet, d.composition.of(spatial)[0]) if spatial else \
        unet_hook.no_features(unet, d.shape[0] * (2 if d.prompts.cfg else 1), d.shape[2:], dtype=dtype,
                              device=device)
    for i, t in d.timesteps():
        maps, seq = d.composition.at(i, d.evaluations)
        scaled, ut, context = d.scaled_input(latents, t).to(dtype), clock.unet_timestep(i), d.prompts.context(seq)
        control = d.controlnets.at(i, d.evaluations, scaled, ut, context, d.added, static=True) if d.controlnets else None  # issue 16
        noise = unet_hook.unet_forward(unet, d.unet_input(scaled), ut, context, zeros if maps is None else maps,
                                       added_cond_kwargs=d.added, timestep_cond=d.guidance_cond, control=control)
        latents = d.step(i, t, noise.to(torch.float32, copy=True), latents, kwargs)
    return latents


# CPU BLAS (MKL/oneDNN) computes a matrix product of fewer than 4 rows, and a convolution of one sample, with
# other kernels than larger ones, which round differently (~1e-7); from 4 rows on, each row's result is the
# same whatever the row count. The batched UNet call therefore always takes at least this many rows, so a
# request's image is bitwise the same alone (`generate_batch([r])`) or batched with any others.
MIN_ROWS = 4
# From 16 rows on, oneDNN takes yet another kernel for 1x1 convolutions (proj_in/proj_out; measured on one thread:
# a 320->320 1x1 convolution of 16 samples rounds its first rows differently than one of 4..15, and a 64² tiny-model
# image lost 2 pixel values). An eager CPU call therefore runs in pieces of at most this many rows.
CPU_MAX_ROWS = 8


def fast_rows(rows: int) -> int:
    """The padded row count of a fast-mode UNet call: the next power of two (at least MIN_ROWS)."""
    return max(MIN_ROWS, 1 << (rows - 1).bit_length())


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """`t` padded to `n` rows by repeating its last row (the padding's outputs are thrown away)."""
    return t if t.shape[0] >= n else torch.cat([t, t[-1:].expand(n - t.shape[0], *t.shape[1:])])


Row = tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None, dict | None, torch.Tensor | None]


def batched_unet(unet: Any, inputs: list[Row], timestep: Any, *, fast: bool = False) -> list[torch.Tensor]:
    """One UNet call per context length over many requests' (sample, context, features, added, guidance_cond) → each
    one's output.

    A request without active features next to one with them adds zeros (a no-op, bitwise). Requests whose
    context lengths differ (style tokens in or out of their window) go in separate calls. In fast mode the rows
    are padded to a power of two, so a compiled UNet meets few batch shapes (`fast_rows`).
    """
    outs: list[torch.Tensor | None] = [None] * len(inputs)
    device, dtype = placement(unet)
    groups: dict[int, list[int]] = {}
    for k, (_x, ctx, _maps, _added, _cond) in enumerate(inputs):
        groups.setdefault(ctx.shape[1], []).append(k)
    for members in groups.values():
        sizes = [inputs[k][0].shape[0] for k in members]
        total = fast_rows(sum(sizes)) if fast else max(sum(sizes), MIN_ROWS)
        x = _rows(torch.cat([inputs[k][0] for k in members]), total)
        ctx = _rows(torch.cat([inputs[k][1] for k in members]), total)
        like = next((inputs[k][2] for k in members if inputs[k][2] is not None), None)
        if like is None and fast:
            like = unet_hook.no_features(unet, 1, x.shape[2:], dtype=dtype, device=device)
        maps = None
        if like is not None:
            per = [inputs[k][2] or [torch.zeros((n, *f.shape[1:]), dtype=f.dtype, device=f.device) for f in like]
                   for k, n in zip(members, sizes)]
            maps = [_rows(torch.cat(level), total) for level in zip(*per)]
            if fast:
                maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
        added = inputs[members[0]][3]
        if added is not None:
            added = {key: _rows(torch.cat([inputs[k][3][key] for k in members]), total) for key in added}
        cond = inputs[members[0]][4]
        if cond is not None:
            cond = _rows(torch.cat([inputs[k][4] for k in members]), total)
        if fast:
            out = unet_hook.unet_forward(unet, x.to(dtype), timestep, ctx, maps, added_cond_kwargs=added,
                                         timestep_cond=cond)
        else:
            out = _pieces(unet, x, timestep, ctx, maps, added, cond, CPU_MAX_ROWS if device.type == "cpu" else total)
        if fast:
            out = out.to(torch.float32, copy=True)  # out of the CUDA-graph buffer before the next replay
        for k, part in zip(members, out[: sum(sizes)].split(sizes)):
            outs[k] = part
    return outs  # type: ignore[return-value]


def _pieces(unet: Any, x: torch.Tensor, timestep: Any, ctx: torch.Tensor, maps: list[torch.Tensor] | None,
            added: dict | None, cond: torch.Tensor | None, rows: int) -> torch.Tensor:
    """The UNet's output for all of `x`'s rows, from calls of at most `rows` rows (each at least MIN_ROWS)."""
    if x.shape[0] <= rows:
        return unet_hook.unet_forward(unet, x, timestep, ctx, maps, added_cond_kwargs=added, timestep_cond=cond)
    outs = []
    for start in range(0, x.shape[0], rows):
        n = min(rows, x.shape[0] - start)

        def piece(t: torch.Tensor) -> torch.Tensor:
            return _rows(t[start:start + n], MIN_ROWS)

        out = unet_hook.unet_forward(unet, piece(x), timestep, piece(ctx), maps and [piece(m) for m in maps],
                                     added_cond_kwargs=added and {key: piece(v) for key, v in added.items()},
                                     timestep_cond=None if cond is None else piece(cond))
        outs.append(out[:n])
    return torch.cat(outs)


def denoise_batch(runs: list[Denoise], *, fast: bool = False,
                  callback: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
    """Several requests' loops in lockstep, one UNet call per step (see `batched_unet`); each keeps its own
    scheduler, generator (noise), prompts, features, weights and windows. `callback(step, total)` after each step.
    """
    unet = runs[0].base.unet
    latents = [d.start("cpu", torch.float32) if fast else d.start(placement(unet)[0], d.prompts.text.context.dtype)
               for d in runs]
    kwargs = [step_kwargs(d.scheduler, d.generator, d.eta) for d in runs]
    lead = runs[0]
    clock = LoopClock(lead.scheduler.timesteps, latents[0].device) if fast else None
    total = len(lead.scheduler.timesteps)
    for i, t in lead.timesteps():
        inputs = []
        for d, x in zip(runs, latents):
            maps, seq = d.composition.at(i, d.evaluations)
            inputs.append((d.unet_input(d.scaled_input(x, d.scheduler.timesteps[i])), d.prompts.context(seq), maps,
                           d.added, d.guidance_cond))
        noise = batched_unet(unet, inputs, clock.unet_timestep(i) if clock else t, fast=fast)
        latents = [d.step(i, d.scheduler.timesteps[i], n, x, kw) for d, n, x, kw in zip(runs, noise, latents, kwargs)]
        if callback is not None:
            callback(i, total)
    return latents
