"""The training loop: frozen base, trainable adapter(s), ε/v-prediction MSE, accelerate for devices and DDP.

Recipe of the paper (arXiv 2302.08453 §3.4/§4) and the original train scripts: the base is frozen
(`requires_grad_(False)`, eval, bf16/fp16 on GPU, fp32 on CPU), the adapter's master weights are
fp32, timesteps are drawn with the cubic schedule t = (1 − u³)·T, AdamW; CoAdapter joint training
drops conditions and text as DESIGN.md §6. Every random draw of a step comes from one generator
whose state is checkpointed, and the data position is the step, so `--resume` continues exactly.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from t2iadapter.bases import move, placement
from t2iadapter.errors import CheckpointError, ConfigError
from t2iadapter.generation.latents import posterior, sample_posterior, to_scaled
from t2iadapter.train import checkpoint as ckpt
from t2iadapter.train.throughput import (
    SUMMARY_FILE,
    Meter,
    Throughput,
    device_name,
    loss_curve,
    peak_memory_gib,
    reset_peak_memory,
)
from t2iadapter.train.config import AdapterSpec, TrainConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# the pieces of a step, each testable on its own


def sample_timesteps(kind: str, n: int, num_train_timesteps: int, generator: torch.Generator,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Training timesteps: cubic t=(1−u³)·T (paper §3.4), uniform, or cosine t=sin(πu/2)·T; clamped to [0, T−1]."""
    T = num_train_timesteps
    if kind == "uniform":
        return torch.randint(0, T, (n,), generator=generator, device=generator.device).to(device)
    u = torch.rand(n, generator=generator, device=generator.device)
    if kind == "cubic":
        t = (1 - u**3) * T
    elif kind == "cosine":
        t = torch.sin(u * (math.pi / 2)) * T
    else:
        raise ConfigError(f"unknown timestep sampler {kind!r}")
    return t.long().clamp_(0, T - 1).to(device)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts: ε (epsilon), v = α·ε − σ·x₀ (v_prediction, via `get_velocity`), or x₀ (sample)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ConfigError(f"the base's scheduler has prediction_type {kind!r}; expected epsilon, v_prediction or sample")


def condition_keep(names: list[str], recipe, generator: torch.Generator) -> list[str]:
    """CoAdapter condition dropout (DESIGN.md §6): all with p_all, none with p_none, else each with p_keep."""
    r = torch.rand(1 + len(names), generator=generator, device=generator.device).tolist()
    if r[0] < recipe.keep_all_prob:
        return list(names)
    if r[0] < recipe.keep_all_prob + recipe.drop_all_prob:
        return []
    return [n for n, x in zip(names, r[1:]) if x < recipe.keep_prob]


class AdapterSet(nn.Module):
    """The trainable part: one adapter, or several + a CoAdapter fuser; conditions in, (maps, style tokens) out."""

    def __init__(self, adapters: dict[str, nn.Module], fuser: nn.Module | None) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict(adapters)
        self.fuser = fuser

    def forward(self, conditions: dict[str, torch.Tensor], keep: list[str] | None = None, unet_inputs: tuple = ()):
        names = list(self.adapters) if keep is None else keep
        if self.fuser is None:
            (name,) = names
            if self.adapters[name].kind == "controlnet":  # issue 16: (down, mid) residuals from the UNet's inputs
                return self.adapters[name](conditions[name], *unet_inputs), None
            out = self.adapters[name](conditions[name])
            return (None, out) if self.adapters[name].kind == "style" else (out, None)
        from t2iadapter.generation.composition import fuse

        return fuse(self.fuser, {n: self.adapters[n](conditions[n]) for n in names})

    def anchor(self) -> torch.Tensor:
        """0·Σ one element of each parameter: keeps every parameter in the graph when no condition was kept."""
        return sum(p.reshape(-1)[0] for p in self.parameters()) * 0.0


# ---------------------------------------------------------------------------------------------
# building the models


def _adapter_config(spec: AdapterSpec, unet, vae_scale_factor: int) -> Any:
    from t2iadapter.models import FullAdapterConfig, LightAdapterConfig, StyleAdapterConfig
    from t2iadapter.unet_hook import adapter_layout, is_sdxl

    sdxl = is_sdxl(unet)
    extra = dict(spec.options)
    if spec.num_res_blocks is not None:
        extra["num_res_blocks"] = spec.num_res_blocks
    layout = adapter_layout(unet, vae_scale_factor)  # read off the UNet and VAE configs
    channels = tuple(spec.channels) if spec.channels else layout["channels"]
    try:
        if spec.kind == "style":
            extra.setdefault("context_dim", unet.config.cross_attention_dim)
            return StyleAdapterConfig(**extra)
        extra.setdefault("downscale_factor", layout["downscale_factor"])
        if len(channels) == len(layout["channels"]):
            extra.setdefault("downsample", layout["downsample"])
        if spec.kind == "full":
            if sdxl:
                raise ConfigError("adapter kind 'full' is the SD1.x/SD2.x layout; for an SDXL base use 'full_xl'")
            return FullAdapterConfig.sd(spec.in_channels, channels=channels, **extra)
        if spec.kind == "full_xl":
            if not sdxl:
                raise ConfigError("adapter kind 'full_xl' is the SDXL layout; for an SD1.x/SD2.x base use 'full'")
            return FullAdapterConfig.sdxl(spec.in_channels, channels=channels, **extra)
        if sdxl:
            raise ConfigError("the light (colour) adapter exists for SD1.x/SD2.x bases only")
        extra.pop("downsample", None)  # the light adapter downsamples every stage after the first
        return LightAdapterConfig(in_channels=spec.in_channels, channels=channels, **extra)
    except TypeError as exc:
        raise ConfigError(f"adapter {spec.condition!r}: bad option in `options`: {exc}") from None


def build_adapters(config: TrainConfig, unet, vae_scale_factor: int) -> tuple[dict[str, nn.Module], nn.Module | None]:
    """Fresh (seeded) or loaded adapters and the optional fuser, in fp32, checked against the UNet."""
    from t2iadapter.formats import load_adapter
    from t2iadapter.models import FuserConfig, build_adapter
    from t2iadapter.unet_hook import check_adapter_fits, check_style_fits, feature_channels

    torch.manual_seed(config.recipe.seed)
    adapters: dict[str, nn.Module] = {}
    for spec in config.adapters:
        if spec.kind == "controlnet":  # issue 16
            from t2iadapter.train import controlnet

            adapters[spec.condition] = controlnet.build(spec, unet, vae_scale_factor)
            continue
        if spec.init_from:
            module = load_adapter(spec.init_from).float()
            if module.kind != spec.kind:
                raise ConfigError(f"{spec.init_from} is a {module.kind} adapter, the config says kind {spec.kind!r}")
        else:
            module = build_adapter(_adapter_config(spec, unet, vae_scale_factor))
        if module.kind == "style":
            check_style_fits(unet, module.config, spec.condition)
        else:
            check_adapter_fits(unet, module.config, spec.condition, vae_scale_factor=vae_scale_factor)
            if config.is_coadapter and list(module.config.channels) != list(feature_channels(unet)):
                raise ConfigError("CoAdapter adapters must give the UNet's feature channels")
        adapters[spec.condition] = module
    fuser = None
    if config.fuser is not None:
        from t2iadapter.models import TASKS

        unknown = [n for n in adapters if n not in TASKS]
        if unknown:
            raise ConfigError(f"the CoAdapter fuser knows the conditions {sorted(TASKS)}; not {unknown}")
        spec = config.fuser
        if spec.init_from:
            fuser = load_adapter(spec.init_from).float()
            if fuser.kind != "fuser":
                raise ConfigError(f"{spec.init_from} is a {fuser.kind} checkpoint, not a CoAdapter fuser")
        else:
            width = spec.width or unet.config.cross_attention_dim
            fuser = build_adapter(FuserConfig(unet_channels=tuple(feature_channels(unet)), width=width,
                                              num_heads=spec.num_heads, num_layers=spec.num_layers))
    return adapters, fuser


def module_files(adapters: dict[str, nn.Module], fuser: nn.Module | None) -> dict[str, nn.Module]:
    """File stem → module: `adapter` for one adapter; `adapter-<condition>` each + `fuser` for a CoAdapter."""
    if fuser is None:
        (module,) = adapters.values()
        return {"controlnet" if module.kind == "controlnet" else "adapter": module}
    return {**{f"adapter-{name}": m for name, m in adapters.items()}, "fuser": fuser}


def _load_trained(file: Path, kind: str) -> nn.Module:
    """A module file of a checkpoint: our adapter format, or (issue 16) our ControlNet file."""
    if kind == "controlnet":
        from t2iadapter.train.controlnet import load_file

        return load_file(file)
    from t2iadapter.formats import load_adapter

    return load_adapter(file)


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


# ---------------------------------------------------------------------------------------------
# the trainer


@dataclass
class TrainResult:
    """What a run did."""

    step: int  # optimiser steps done (including those before a resume)
    losses: list[float] = field(default_factory=list)  # per step, this run only, mean over the processes
    skipped: int = 0  # unreadable samples skipped (this run)
    outputs: list[Path] = field(default_factory=list)  # final adapter files/folders
    seconds: float = 0.0
    resumed_from: Path | None = None
    throughput: Throughput | None = None  # samples/s of this run (main process's view)
    peak_memory_gib: float | None = None  # accelerator memory peak of this process (None off CUDA)


# settings a resumed run may change: where and how often it writes, how long it runs, how fast (not what it computes)
RESUMABLE_CHANGES = ("output_dir", "log_every", "checkpoint.", "validation.", "data.path", "data.num_workers",
                     "recipe.max_steps", "recipe.max_minutes", "recipe.compile", "recipe.channels_last",
                     "recipe.gradient_checkpointing", "recipe.cache_latents", "recipe.cache_text", "recipe.fused_adamw")


def changed_settings(stored: str | None, current: str) -> list[str]:
    """`key old → new` for each setting of a checkpoint's stored config (JSON) that this run changes and a resume
    cannot take (the seed, the learning rate, the data, the adapters, …); none for a checkpoint without one."""
    if not stored:
        return []

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    old, new = flat(json.loads(stored)), flat(json.loads(current))
    return [f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)]


class Trainer:
    """One training run of `config`; `base`/`stream` may be given (tests, benchmarks), else built from the config.

    A given `base` is used in place, not copied (an SDXL base is ~7 GB): it is frozen and moved to the training
    device and dtype, and gets channels-last or gradient checkpointing when the recipe asks; pass a copy to keep
    the original as it was.
    """

    def __init__(self, config: TrainConfig, *, base=None, stream=None, accelerator=None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.config = config
        recipe = config.recipe
        if accelerator is None:
            handlers = [DistributedDataParallelKwargs(find_unused_parameters=config.is_coadapter)]
            accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available(), kwargs_handlers=handlers)
        self.accelerator = accelerator
        self.device = accelerator.device
        on_gpu = self.device.type == "cuda"
        precision = recipe.mixed_precision if on_gpu else "no"
        if recipe.mixed_precision != "no" and not on_gpu:
            log.info("mixed precision %s needs a GPU; training in fp32 on %s", recipe.mixed_precision, self.device)
        self.amp_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.base_dtype = self.amp_dtype or torch.float32
        self.output_dir = Path(config.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        if recipe.cache_latents and config.data.random_flip:
            raise ConfigError("recipe.cache_latents keeps one latent per image, so it cannot be combined with data.random_flip")

        if base is None:
            from t2iadapter.bases import load_base

            base = load_base(config.base)
        if config.data.resolution is None:  # the base's own size; the resolved config is what the run records
            height = base.default_size[1]  # square training: the height of a (h, w) sample size
            self.config = config = dataclasses.replace(config, data=dataclasses.replace(config.data, resolution=height))
        self.base = base.freeze()
        self._place_base()
        self.is_sdxl = base.is_sdxl

        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
        self.T = self.noise_scheduler.config.num_train_timesteps

        adapters, fuser = build_adapters(config, base.unet, base.vae_scale_factor)
        self.names = list(adapters)
        self.style_names = [n for n, m in adapters.items() if m.kind == "style"]
        self.model = AdapterSet(adapters, fuser).to(self.device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        fused = bool(recipe.fused_adamw and on_gpu)
        self.optimizer = torch.optim.AdamW(self.params, lr=recipe.lr, betas=tuple(recipe.betas),
                                           weight_decay=recipe.weight_decay, **({"fused": True} if fused else {}))
        from diffusers.optimization import get_scheduler

        name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[recipe.schedule]
        self.lr_scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=recipe.warmup_steps,
                                          num_training_steps=recipe.max_steps)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.ddp_model = accelerator.prepare(self.model)
        self.ema = [p.detach().clone().float() for p in self.params] if recipe.ema_decay else None

        rank = accelerator.process_index
        self.generator = torch.Generator(self.device).manual_seed(recipe.seed * 7919 + rank + 1)
        self.step = 0
        self.skipped = 0
        self.samples_at_start = 0  # stream samples read (by all processes) before `start_step`: the data position
        self.start_step = 0
        self.latent_cache: dict[int, torch.Tensor] = {}
        self.text_cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._encoders_offloaded = False
        self._stream = stream
        self._empty_text = None
        self._unet = base.unet
        if recipe.channels_last:
            base.unet.to(memory_format=torch.channels_last)
        if recipe.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
            for module in adapters.values():  # issue 16: a ControlNet recomputes its activations too
                if module.kind == "controlnet":
                    module.controlnet.enable_gradient_checkpointing()
        self._compile_unverified = False
        if recipe.compile:
            try:
                self._unet = torch.compile(base.unet)
                self._compile_unverified = True
            except Exception as exc:  # no compiler available: eager is always correct
                log.warning("torch.compile failed (%s); training the eager UNet", exc)

    # -- setup helpers --------------------------------------------------------------------------

    def _place_base(self) -> None:
        """Frozen base on the device in the training dtype; an SDXL VAE stays fp32 in fp16 runs (it overflows)."""
        base = self.base
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # training shapes are static: let cuDNN pick its fastest kernels
        for name, module in base.modules.items():
            dtype = self.base_dtype
            if name == "vae" and base.is_sdxl and dtype == torch.float16:
                dtype = torch.float32
            move(module, device=self.device, dtype=dtype)

    @property
    def stream(self):
        if self._stream is None:
            from t2iadapter.train.data import SampleStream, build_source

            source = build_source(self.config.data, self.config.adapters)
            self._stream = SampleStream(source, self.config.data, self.config.adapters, self.config.recipe.seed)
        return self._stream

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _mean_over_processes(self, losses: list[torch.Tensor]) -> list[float]:
        """Each step's loss averaged over every process's batch (the loss of the whole global batch, which the
        gradients follow), not the main process's share alone: one collective per log interval."""
        return self.accelerator.reduce(torch.stack(losses).float(), reduction="mean").cpu().tolist()

    # -- encoders (cached when asked) ----------------------------------------------------------

    @torch.no_grad()
    def encode_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Scaled latents [B, 4, h, w] (fp32) of the batch's images; the posterior is cached per sample if asked."""
        vae = self.base.vae
        idx = batch["index"].tolist()
        moments = None
        if self.config.recipe.cache_latents and all(i in self.latent_cache for i in idx):
            moments = torch.stack([self.latent_cache[i] for i in idx]).to(self.device, non_blocking=True)
        if moments is None:
            pixels = batch["pixels"].to(self.device, placement(vae)[1], non_blocking=True)
            moments = posterior(vae, pixels)
            if self.config.recipe.cache_latents:
                for i, m in zip(idx, moments.cpu()):
                    self.latent_cache[i] = m
        return to_scaled(vae.config, sample_posterior(moments, self.generator))

    @torch.no_grad()
    def encode_prompts(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text context [B, 77, D] (and SDXL pooled [B, D2]), cached per sample if asked."""
        from t2iadapter.bases import encode_text

        idx = batch["index"].tolist()
        cache = self.text_cache if self.config.recipe.cache_text else None
        if cache is not None and all(i in cache for i in idx):
            ctx = torch.stack([cache[i][0] for i in idx]).to(self.device, non_blocking=True)
            pooled = None if cache[idx[0]][1] is None else torch.stack([cache[i][1] for i in idx]).to(self.device)
            return ctx, pooled
        text = encode_text(self.base, list(batch["captions"]))
        if cache is not None:
            for j, i in enumerate(idx):
                cache[i] = (text.context[j].cpu(), None if text.pooled is None else text.pooled[j].cpu())
        return text.context, text.pooled

    @torch.no_grad()
    def empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text-dropout replacement: the empty prompt's context (SDXL: zeros, as its pipeline's unconditional)."""
        if self._empty_text is None:
            from t2iadapter.bases import encode_text

            text = encode_text(self.base, [""], zeros=self.is_sdxl)
            self._empty_text = (text.context, text.pooled)
        return self._empty_text

    def _maybe_offload_encoders(self) -> None:
        """Once every sample's latents and text are cached, the VAE and text encoders leave the GPU."""
        if self._encoders_offloaded or self.device.type != "cuda":
            return
        r = self.config.recipe
        n = len(self.stream)
        if r.cache_latents and r.cache_text and len(self.latent_cache) >= n and len(self.text_cache) >= n:
            if self.config.text_dropout > 0:
                self.empty_prompt()
            for name in ("vae", "text_encoder", "text_encoder_2"):
                module = getattr(self.base, name)
                if module is not None:
                    module.to("cpu")
            torch.cuda.empty_cache()
            self._encoders_offloaded = True
            log.info("all %d samples cached: VAE and text encoders moved to the CPU", n)

    # -- one optimiser step ---------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _unet_call(self, noisy, t, context, maps, added, control=None):
        """The frozen UNet through the adapter hook; a compiled UNet that fails on first use falls back to eager."""
        from t2iadapter.unet_hook import unet_forward

        if not self._compile_unverified:
            return unet_forward(self._unet, noisy, t, context, features=maps, added_cond_kwargs=added, control=control)
        try:
            out = unet_forward(self._unet, noisy, t, context, features=maps, added_cond_kwargs=added, control=control)
            self._compile_unverified = False  # compiled and ran: nothing left to check
            return out
        except Exception as exc:  # a compiler/toolchain problem must not stop training: eager is always correct
            log.warning("the compiled UNet failed (%s: %s); training the eager UNet", type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
            self._unet = self.base.unet
            self._compile_unverified = False
            return unet_forward(self._unet, noisy, t, context, features=maps, added_cond_kwargs=added, control=control)

    def micro_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The loss of one micro-batch: noise the latents, run adapter(s) + frozen UNet, MSE to the target."""
        recipe = self.config.recipe
        latents = self.encode_latents(batch)
        context, pooled = self.encode_prompts(batch)
        B = latents.shape[0]
        g = self.generator
        drop_p = self.config.text_dropout
        if drop_p > 0:
            drop = (torch.rand(B, generator=g, device=g.device) < drop_p).to(self.device)
            empty_ctx, empty_pooled = self.empty_prompt()
            context = torch.where(drop[:, None, None], empty_ctx.to(context.dtype), context)
            if pooled is not None:
                pooled = torch.where(drop[:, None], empty_pooled.to(pooled.dtype), pooled)
        keep = condition_keep(self.names, recipe, g) if self.model.fuser is not None else None
        t = sample_timesteps(recipe.timesteps, B, self.T, g, self.device)
        noise = torch.randn(latents.shape, generator=g, device=g.device).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = training_target(self.noise_scheduler, latents, noise, t)
        unet_dtype = placement(self.base.unet)[1]
        noisy = noisy.to(unet_dtype)
        if recipe.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        conds = {n: c.to(self.device, non_blocking=True) for n, c in batch["conditions"].items()}
        added = None
        if self.is_sdxl:
            from t2iadapter.bases import sdxl_time_ids

            res = self.config.data.resolution if "pixels" not in batch else batch["pixels"].shape[-1]
            added = {"text_embeds": pooled.to(unet_dtype),
                     "time_ids": sdxl_time_ids(res, res, B, unet_dtype, self.device)}
        from t2iadapter.unet_hook import extend_context

        with self._autocast():
            if self.names and self.model.adapters[self.names[0]].kind == "controlnet":  # issue 16: every step
                context = context.to(unet_dtype)
                control, _ = self.ddp_model(conds, keep, (noisy, t, context, added))
                pred = self._unet_call(noisy, t, context, None, added, control=control)
            else:
                maps, tokens = self.ddp_model(conds, keep)
                context = extend_context(context.to(unet_dtype), tokens, unconditional=False)
                pred = self._unet_call(noisy, t, context, maps, added)
        loss = F.mse_loss(pred.float(), target.float())
        if keep is not None and not keep:
            loss = loss + self.model.anchor()
        return loss

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, torch.Tensor | float]:
        """One optimiser step over `grad_accumulation` micro-batches; returns loss/grad-norm tensors and the lr."""
        recipe = self.config.recipe
        n = len(batches)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            sync = i == n - 1
            ctx = contextlib.nullcontext() if sync else self.accelerator.no_sync(self.ddp_model)
            with ctx:
                loss = self.micro_loss(batch) / n
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            total += loss.detach()
            self.skipped += int(batch.get("skipped", 0))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if recipe.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, recipe.grad_clip)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads \
                else torch.zeros((), device=self.device)
        lr = self.lr_scheduler.get_last_lr()[0]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], 1.0 - recipe.ema_decay)
        self.step += 1
        self._maybe_offload_encoders()
        return {"loss": total, "grad_norm": grad_norm.detach(), "lr": lr}

    # -- checkpoints ----------------------------------------------------------------------------

    def samples_read(self) -> int:
        """Stream samples read by all processes up to `self.step`: where the data continues after a resume."""
        r = self.config.recipe
        return self.samples_at_start + (self.step - self.start_step) * r.grad_accumulation * r.batch_size * \
            self.accelerator.num_processes

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "samples": self.samples_read(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": [e.cpu() for e in self.ema] if self.ema is not None else None,
            "skipped": self.skipped,
            "world_size": self.accelerator.num_processes,
            "config": self.config.to_json(),
        }

    def save_checkpoint(self) -> Path | None:
        """Write checkpoint `self.step` atomically (all processes call this)."""
        acc = self.accelerator
        tmp = ckpt.temp_dir(self.ckpt_dir, self.step)
        if self.is_main:
            ckpt.begin(self.ckpt_dir, self.step)
        acc.wait_for_everyone()
        ckpt.write_rng(tmp, acc.process_index, ckpt.rng_state(self.generator))
        acc.wait_for_everyone()
        path = None
        if self.is_main:
            modules = module_files(dict(self.model.adapters), self.model.fuser)
            path = ckpt.finish(self.ckpt_dir, self.step, modules, self._trainer_state(), self.config.checkpoint.keep)
            log.info("checkpoint %s", path)
        acc.wait_for_everyone()
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimiser, LR schedule, EMA, step and this process's RNG from checkpoint `path`; the
        config it was written with must agree with this run's (`changed_settings`)."""
        state, rng = ckpt.load(path, self.accelerator.process_index)
        changed = changed_settings(state.get("config"), self.config.to_json())
        if changed:
            raise ConfigError(f"{path} was written with another config: {'; '.join(changed)} (a resumed run continues "
                              "the same training); put the old values back, or start a new run (another "
                              "--output-dir, or --force here)")
        modules = module_files(dict(self.model.adapters), self.model.fuser)
        for stem, module in modules.items():
            file = path / f"{stem}.safetensors"
            if not file.is_file():
                raise CheckpointError(f"{path} has no {file.name}; it was written for another adapter setup")
            loaded = _load_trained(file, module.kind)
            if loaded.config != module.config:
                raise CheckpointError(f"{file} holds a different {module.kind} config than this run's")
            with torch.no_grad():
                module.load_state_dict(loaded.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is None:
                log.warning("%s has no EMA weights; the EMA restarts from the current weights", path)
                self.ema = [p.detach().clone().float() for p in self.params]
            else:
                self.ema = [e.to(self.device) for e in state["ema"]]
        self.step = self.start_step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        world = state.get("world_size") or self.accelerator.num_processes
        recipe = self.config.recipe  # a checkpoint without the count: every step read GA · B samples per process
        self.samples_at_start = int(state.get("samples", self.step * recipe.grad_accumulation * recipe.batch_size * world))
        if state.get("world_size") != self.accelerator.num_processes:
            log.warning("resuming a %s-process run on %d processes: data continues, random draws differ",
                        state.get("world_size"), self.accelerator.num_processes)
        if rng is not None:
            ckpt.set_rng_state(rng, self.generator)
        else:
            log.warning("%s has no RNG state for process %d; random draws will differ", path, self.accelerator.process_index)

    # -- EMA, validation, output ----------------------------------------------------------------

    def export_modules(self) -> dict[str, nn.Module]:
        """The modules to validate and save: copies with the EMA weights if EMA is on, else the live ones."""
        modules = module_files(dict(self.model.adapters), self.model.fuser)
        if self.ema is None:
            return modules
        copies = {k: copy.deepcopy(m) for k, m in modules.items()}
        lookup = {id(p): e for p, e in zip(self.params, self.ema)}
        for stem, module in modules.items():
            for (name, p), q in zip(module.named_parameters(), copies[stem].parameters()):
                if id(p) in lookup:
                    q.data.copy_(lookup[id(p)].to(q.dtype))
        return copies

    def validate(self) -> Path | None:
        """Render the grid condition | base | with adapter at fixed seeds into output_dir/validation (main process)."""
        from t2iadapter.train.validation import render_grid

        val = self.config.validation
        if not (val.prompts or val.world_seeds):
            return None
        was_offloaded = self._encoders_offloaded
        if was_offloaded:
            self._place_base()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                path = render_grid(self, self.output_dir / "validation" / f"{ckpt.step_name(self.step)}.png")
        except Exception as exc:  # a broken validation never stops training, but it is an error in the log
            log.error("validation at step %d failed: %s: %s", self.step, type(exc).__name__, exc)
            path = None
        finally:
            if was_offloaded:
                for name in ("vae", "text_encoder", "text_encoder_2"):
                    module = getattr(self.base, name)
                    if module is not None:
                        module.to("cpu")
                torch.cuda.empty_cache()
        return path

    def save_outputs(self) -> list[Path]:
        """Final adapter(s): our single file (config inside) + a diffusers folder where diffusers knows the kind."""
        from t2iadapter.formats import DIFFUSERS_TYPES

        out = []
        for stem, module in self.export_modules().items():
            module = module.to("cpu")
            out.append(module.save_file(self.output_dir / f"{stem}.safetensors", overwrite=True))
            if module.kind in DIFFUSERS_TYPES or module.kind == "controlnet":
                try:
                    out.append(module.save_pretrained(self.output_dir / f"{stem}-diffusers", overwrite=True))
                except ConfigError as exc:  # e.g. a light adapter whose channels diffusers cannot express
                    log.info("no diffusers folder for %s: %s", stem, exc)
                    stale = self.output_dir / f"{stem}-diffusers"  # an earlier run's (--force), another adapter
                    if stale.is_dir():
                        shutil.rmtree(stale)
            module.to(self.device)
        return out

    # -- the loop -------------------------------------------------------------------------------

    def run(self, resume: str | None = None, stop_at: int | None = None, *, start_over: bool = False) -> TrainResult:
        """Train to `recipe.max_steps` (or stop early at `stop_at`, as a preempted job would), checkpointing,
        logging and validating; `resume`: 'latest' (newest in output_dir) or a checkpoint folder."""
        from tqdm.auto import tqdm

        from t2iadapter.train.data import make_loader, next_batch

        cfg, recipe, acc = self.config, self.config.recipe, self.accelerator
        t0 = time.time()
        reset_peak_memory(self.device)
        resumed_from = None
        if start_over and not resume and self.is_main:
            self._clear_earlier_run()
        if resume:
            path = ckpt.resolve(resume, self.ckpt_dir)
            if path is None:
                log.warning("no checkpoint in %s; starting from step 0", self.ckpt_dir)
            else:
                self.load_checkpoint(path)
                resumed_from = path
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_temp(self.ckpt_dir)
            (self.output_dir / "train_config.json").write_text(cfg.to_json())
        acc.wait_for_everyone()
        writer = self._tensorboard() if self.is_main else None
        result = TrainResult(step=self.step, resumed_from=resumed_from)
        skipped_before = self.skipped
        loader = make_loader(self.stream, recipe.batch_size, acc.process_index, acc.num_processes, 0,
                             cfg.data.num_workers, offset=self.samples_read())
        batches = iter(loader)
        bar = tqdm(total=recipe.max_steps, initial=self.step, disable=not self.is_main, unit="step",
                   dynamic_ncols=True, desc="train")
        pending: list[torch.Tensor] = []
        log_every = max(1, cfg.log_every)
        end = min(recipe.max_steps, stop_at) if stop_at is not None else recipe.max_steps
        saved_at = None
        meter = Meter(self.step, recipe.batch_size * recipe.grad_accumulation * acc.num_processes,
                                 time.perf_counter())
        try:
            while self.step < end:
                micro = [next_batch(batches) for _ in range(recipe.grad_accumulation)]
                for b in micro:
                    for err in b.get("errors", ())[:3]:
                        log.debug("skipped: %s", err)
                metrics = self.train_step(micro)
                pending.append(metrics["loss"])
                if self.step % log_every == 0 or self.step == recipe.max_steps:
                    losses = self._mean_over_processes(pending)  # waits for the device: a time mark
                    meter.mark(self.step, time.perf_counter())
                    result.losses += losses
                    pending.clear()
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{metrics['lr']:.2e}", skipped=self.skipped)
                    if writer is not None:
                        writer.add_scalar("train/loss", losses[-1], self.step)
                        writer.add_scalar("train/lr", metrics["lr"], self.step)
                        writer.add_scalar("train/grad_norm", float(metrics["grad_norm"]), self.step)
                        writer.add_scalar("train/skipped", self.skipped, self.step)
                bar.update(1)
                if recipe.max_minutes is not None and self.step % log_every == 0 and self._out_of_time(t0):
                    log.info("stopping at step %d: the %.1f-minute budget is spent", self.step, recipe.max_minutes)
                    end = self.step
                every = cfg.checkpoint.every
                if every and self.step % every == 0:
                    self.save_checkpoint()
                    saved_at = self.step
                if cfg.validation.every and self.step % cfg.validation.every == 0:
                    if self.is_main:
                        self.validate()
                    acc.wait_for_everyone()
        finally:
            bar.close()
            if writer is not None:
                writer.flush()
                writer.close()
        if pending:
            result.losses += self._mean_over_processes(pending)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        result.throughput = meter.result(self.step, time.perf_counter())
        result.peak_memory_gib = peak_memory_gib(self.device)
        if saved_at != self.step and (result.step != self.step or not ckpt.checkpoints(self.ckpt_dir)):
            self.save_checkpoint()
        if self.is_main:
            result.outputs = self.save_outputs()
        acc.wait_for_everyone()
        result.step = self.step
        result.skipped = self.skipped - skipped_before
        result.seconds = time.time() - t0
        if result.skipped:
            log.warning("%d unreadable samples were skipped", result.skipped)
        if self.is_main:
            self._write_summary(result)
        return result

    def _clear_earlier_run(self) -> None:
        """--force: delete what an earlier run wrote here — its checkpoints (they would count as newer than this
        run's, and a later --resume would continue that run), its TensorBoard events (the curves would mix), its
        validation grids, its summary and the final files its summary lists (a CoAdapter run's adapter files
        stayed beside a later single adapter's). Nothing else in the folder is touched."""
        import json

        out = self.output_dir
        summary = out / SUMMARY_FILE
        earlier: list[str] = []
        if summary.is_file():
            try:
                earlier = [str(name) for name in json.loads(summary.read_text()).get("outputs", [])]
            except (ValueError, AttributeError, TypeError):
                log.warning("%s is unreadable; the earlier run's final files stay", summary)
        for name in earlier:
            path = out / Path(name).name  # names inside this folder only, whatever the file says
            if path.is_dir():
                shutil.rmtree(path)
            elif path.is_file():
                path.unlink()
        for folder in (self.ckpt_dir, out / "logs", out / "validation"):
            if folder.is_dir():
                shutil.rmtree(folder)
        summary.unlink(missing_ok=True)

    def _write_summary(self, result: TrainResult) -> Path:
        """`train_summary.json` in the output dir: samples/s, peak memory, the card, the batch, the last loss."""
        import json

        cfg, recipe, speed = self.config, self.config.recipe, result.throughput
        summary = {
            "kinds": {a.condition: a.kind for a in cfg.adapters},
            "step": result.step,
            "steps": speed.steps,  # this run's (a resumed run counts from its checkpoint)
            "samples": speed.samples,
            "loop_seconds": speed.seconds,
            "samples_per_second": speed.samples_per_second,
            "steady_samples_per_second": speed.steady_samples_per_second,
            "peak_memory_gib": result.peak_memory_gib,
            "device": device_name(self.device),
            "processes": self.accelerator.num_processes,
            "batch_size": recipe.batch_size,
            "grad_accumulation": recipe.grad_accumulation,
            "resolution": cfg.data.resolution,
            "mixed_precision": recipe.mixed_precision if self.amp_dtype is not None else "no",
            "trainable_parameters": sum(p.numel() for p in self.params),
            "last_loss": result.losses[-1] if result.losses else None,
            "loss_curve": loss_curve(result.losses, result.step),  # 20 means over equal step ranges: the plateau
            "run_seconds": result.seconds,
            "outputs": [path.name for path in result.outputs],  # what --force deletes when it starts over here
        }
        path = self.output_dir / SUMMARY_FILE
        path.write_text(json.dumps(summary, indent=2) + "\n")
        peak = "" if result.peak_memory_gib is None else f", peak {result.peak_memory_gib:.2f} GiB"
        log.info("%d steps, %d samples in %.1f s: %s samples/s (steady %s)%s", speed.steps, speed.samples, speed.seconds,
                 _rate(speed.samples_per_second), _rate(speed.steady_samples_per_second), peak)
        return path

    def _out_of_time(self, t0: float) -> bool:
        """Whether the wall-clock budget is spent, decided the same on every process (DDP stays in step)."""
        over = torch.tensor(float(time.time() - t0 > 60 * self.config.recipe.max_minutes), device=self.accelerator.device)
        return bool(self.accelerator.reduce(over, reduction="max").item() > 0)

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as exc:  # tensorboard is in the `train` extra
            log.warning("TensorBoard logging is off (%s); pip install 't2iadapter[train]'", exc)
            return None
        return SummaryWriter(str(self.output_dir / "logs"))
