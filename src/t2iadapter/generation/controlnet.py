"""ControlNets beside the adapters (issue 16): loading, checks, and the per-step residuals.

A ControlNet (Zhang et al. 2023, arXiv 2302.05543) is a trainable copy of the UNet's encoder that runs
**every step** on the noisy latents, the timestep, the text context and its condition image, and returns
one residual per UNet skip connection plus one for the mid block. diffusers' UNet takes them as
`down_block_additional_residuals`/`mid_block_additional_residual`, beside the adapters'
`down_intrablock_additional_residuals`: the adapter's features are added inside the encoder (so the
skips carry them), the ControlNet's to the skips and the mid block afterwards; the two kinds add.

As diffusers' `StableDiffusion(XL)ControlNetPipeline` (guess_mode off): the ControlNet sees the same
scaled model input and context as the UNet (both CFG branches), SDXL's pooled text and time ids too, and
its residuals are scaled by `conditioning_scale` (our weight). Several ControlNets sum (MultiControlNet).
A ControlNet with `global_pool_conditions` (shuffle, for one) puts diffusers in guess mode: it runs on the
conditional CFG half only, and the unconditional half gets zero residuals; so it does here.
Outside its window (`Window.controlnet_active`: diffusers' control_guidance_start/end) a ControlNet does not
run, which equals diffusers' scale 0 (adding zeros). Fast mode keeps the UNet's inputs static instead: every ControlNet runs every
step, with scale 0 outside its window, so the compiled UNet always gets the same residual shapes; the
ControlNets themselves run eagerly in the base's dtype (not compiled).

Files: a diffusers folder, a single file diffusers' `from_single_file` reads (original/A1111 layouts), a hub
id, `demo/NAME` (the demo's shipped ControlNets), or our own single file: safetensors with diffusers' key
names and the ControlNet's config JSON in the metadata (what `t2iadapter train` writes, and how the demo
ships its ControlNet: one self-describing file, like the demo adapters).
"""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from t2iadapter import hub
from t2iadapter.errors import CheckpointError, ConfigError
from t2iadapter.formats import CONTROLNET_METADATA_KEY
from t2iadapter.formats import METADATA_KEY as ADAPTER_METADATA_KEY  # an adapter file's config
from t2iadapter.generation.img2img import INPAINT_UNET_CHANNELS
from t2iadapter.generation.request import Window

if TYPE_CHECKING:
    from diffusers import ControlNetModel, UNet2DConditionModel

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
METADATA_KEY = CONTROLNET_METADATA_KEY  # our single file: the ControlNet's diffusers config, as JSON
# The ControlNet paper's condition encoder: 4 convs to 16, 32, 96, 256 channels, three of them stride 2
# (512² image → 64² latent, the VAE's factor 8); bases with another VAE factor keep log2(factor) downsamples.
CONDITION_ENCODER_CHANNELS = (16, 32, 96, 256)
LATENT_CHANNELS = (INPAINT_UNET_CHANNELS - 1) // 2  # beside an inpainting UNet: its latents, not mask + masked image

Residuals = tuple[list[torch.Tensor], torch.Tensor]  # (one per UNet skip connection, mid block)


def is_controlnet(module: Any) -> bool:
    from diffusers import ControlNetModel

    return isinstance(module, ControlNetModel)


def load_controlnet(source: Any) -> ControlNetModel:
    """A `ControlNetModel` the pipeline may change: a copy of a module handed in, or loaded from a diffusers
    folder, our single file, a single file diffusers reads (`from_single_file`: original/A1111 layouts), a hub
    id (`org/repo[/file]`) or `demo/NAME` (a ControlNet shipped with the demo)."""
    from diffusers import ControlNetModel

    if isinstance(source, ControlNetModel):
        return copy.deepcopy(source)
    if isinstance(source, torch.nn.Module):
        raise ConfigError(f"a {type(source).__name__} is not a diffusers ControlNetModel")
    path = Path(os.fspath(source)).expanduser()
    text = str(source)
    if not path.exists():
        if text.startswith("demo/"):
            from t2iadapter import assets

            path = assets.demo_controlnet_path(text[len("demo/"):])
        elif not hub.is_id(text):
            raise CheckpointError(f"ControlNet {text}: no such file or folder")
        else:
            path = hub.adapter_path(text)
    if is_adapter(path):  # diffusers would read it as a ControlNet of default config, or look for its base online
        raise CheckpointError(f"{text} is a T2I-Adapter, not a ControlNet: give it as one (--adapter, adapters=)")
    try:
        if path.is_dir():
            return ControlNetModel.from_pretrained(path)
        if is_single_file(path):
            return read_single_file(path)
        return ControlNetModel.from_single_file(str(path))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"ControlNet {text}: diffusers cannot read it ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None


def is_adapter(path: Path) -> bool:
    """Whether `path` is an adapter: our single file (its config in the metadata) or a folder of a `T2IAdapter`."""
    import json

    if path.is_dir():
        try:
            return json.loads((path / "config.json").read_text()).get("_class_name") == "T2IAdapter"
        except (OSError, ValueError, AttributeError, RecursionError):
            return False
    return _metadata_has(path, ADAPTER_METADATA_KEY)


def is_single_file(path: str | os.PathLike) -> bool:
    """Whether `path` is our single ControlNet file (safetensors whose metadata holds the config)."""
    return _metadata_has(Path(path), METADATA_KEY)


def _metadata_has(path: Path, key: str) -> bool:
    """Whether `path` is a readable safetensors file whose metadata holds `key`."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return key in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - not a readable safetensors file: let diffusers' loader say why
        return False


def read_single_file(path: str | os.PathLike) -> ControlNetModel:
    """Our single ControlNet file → a `ControlNetModel` (config from the metadata, weights in the file's dtype)."""
    import json

    from diffusers import ControlNetModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    from t2iadapter.bases import move

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        raise CheckpointError(f"{path} is not a ControlNet file written by t2iadapter (no {METADATA_KEY} metadata)")
    tensors = load_file(str(path))
    module = ControlNetModel.from_config(json.loads(meta[METADATA_KEY]))
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1:
        move(module, dtype=dtypes.pop())
    module.load_state_dict(tensors)
    return module


def controlnet_from_unet(unet: UNet2DConditionModel, vae_scale_factor: int = 8, *,
                         conditioning_channels: int = 3) -> ControlNetModel:
    """A new ControlNet initialised from the base UNet's encoder (the ControlNet paper, §3.2; zero convs at 0)."""
    from diffusers import ControlNetModel

    if unet.config.in_channels == INPAINT_UNET_CHANNELS:
        raise ConfigError("a ControlNet is made from a 4-channel UNet, not an inpainting one (9 input channels): train "
                          "it on the inpainting model's ordinary base; it then works beside the inpainting UNet too")
    n = int(math.log2(vae_scale_factor))
    if 2**n != vae_scale_factor or n + 1 > len(CONDITION_ENCODER_CHANNELS):
        raise ConfigError(f"no ControlNet condition encoder for a VAE factor of {vae_scale_factor}")
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITION_ENCODER_CHANNELS[: n + 1],
                                     conditioning_channels=conditioning_channels)


def check_fits(unet: UNet2DConditionModel, controlnet: ControlNetModel, name: str) -> None:
    """A clear ConfigError unless the ControlNet's encoder matches the UNet's (channels, context width, SDXL-ness)."""
    u, c = unet.config, controlnet.config
    wanted = {"block_out_channels": tuple(u.block_out_channels), "cross_attention_dim": u.cross_attention_dim,
              "layers_per_block": u.layers_per_block, "addition_embed_type": u.get("addition_embed_type")}
    given = {"block_out_channels": tuple(c.block_out_channels), "cross_attention_dim": c.cross_attention_dim,
             "layers_per_block": c.layers_per_block, "addition_embed_type": c.get("addition_embed_type")}
    bad = [f"{k} {given[k]} (base: {wanted[k]})" for k in wanted if given[k] != wanted[k]]
    latent = LATENT_CHANNELS if u.in_channels == INPAINT_UNET_CHANNELS else u.in_channels
    if c.in_channels != latent:  # a ControlNet sees the latents alone, also beside an inpainting UNet (as diffusers')
        bad.append(f"in_channels {c.in_channels} (it must take the {latent} latent channels"
                   + (f"; an inpainting UNet's ControlNets are those of its {latent}-channel base)" if latent != u.in_channels else ")"))
    if bad:
        raise ConfigError(f"ControlNet {name!r} does not fit this base: " + "; ".join(bad))


def residuals(controlnet: ControlNetModel, sample: torch.Tensor, t: Any, context: torch.Tensor, condition: torch.Tensor,
              scale: float = 1.0, added: dict[str, torch.Tensor] | None = None) -> Residuals:
    """One ControlNet evaluation (guess mode off): (residual per UNet skip connection, mid-block residual)."""
    down, mid = controlnet(sample, t, encoder_hidden_states=context, controlnet_cond=condition, conditioning_scale=scale,
                           added_cond_kwargs=added, return_dict=False)
    return list(down), mid


class ControlNets:
    """The ControlNets of one call: condition images (batched for CFG), weights and windows (diffusers'
    `control_guidance_start/end` rule, `Window.controlnet_active`); `at()` gives the summed residuals for one step,
    or None when none is active."""

    def __init__(self, modules: Mapping[str, ControlNetModel], images: Mapping[str, torch.Tensor],
                 weights: Mapping[str, float], windows: Mapping[str, Window], cond_only: frozenset[str] = frozenset()) -> None:
        self.names = list(images)
        self.modules = {n: modules[n] for n in self.names}
        self.images, self.weights, self.windows = dict(images), dict(weights), dict(windows)
        self.cond_only = cond_only  # guess mode (global_pool_conditions under CFG): the conditional half alone

    def __bool__(self) -> bool:
        return bool(self.names)

    def at(self, step: int, total: int, sample: torch.Tensor, t: Any, context: torch.Tensor,
           added: dict[str, torch.Tensor] | None, *, static: bool = False) -> Residuals | None:
        """Σ over the active ControlNets of (down residuals, mid residual), each scaled by its weight; `static`
        (fast mode): every ControlNet runs, scale 0 outside its window, so a step always has residuals."""
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for n in self.names:
            active = self.windows[n].controlnet_active(step, total)
            if not (active or static):
                continue
            scale = self.weights[n] if active else 0.0
            if n in self.cond_only:  # diffusers' guess mode: [uncond, cond] → zeros for uncond, the cond half's own
                half = sample.shape[0] // 2
                cond_added = None if added is None else {k: v[half:] for k, v in added.items()}
                d, m = residuals(self.modules[n], sample[half:], t, context[half:], self.images[n], scale, cond_added)
                d, m = [torch.cat([torch.zeros_like(x), x]) for x in d], torch.cat([torch.zeros_like(m), m])
            else:
                d, m = residuals(self.modules[n], sample, t, context, self.images[n], scale, added)
            if down is None:
                down, mid = list(d), m
            else:  # diffusers' MultiControlNetModel: residuals sum
                down, mid = [a + b for a, b in zip(down, d)], mid + m
        return None if down is None else (down, mid)


def prepare(modules: Mapping[str, ControlNetModel], uses: Any, on_device: Callable[[Any, int], torch.Tensor],
            batch: int, cfg: bool) -> ControlNets:
    """`ControlNets` of a request's uses; `on_device(condition, channels)` gives [1, C, H, W] in [0, 1] (as
    diffusers' control image processor: no normalisation), repeated to the batch and doubled for CFG."""
    images = {}
    cond_only = frozenset(u.name for u in uses if cfg and modules[u.name].config.get("global_pool_conditions", False))
    for use in uses:
        x = on_device(use.condition, modules[use.name].config.conditioning_channels).repeat(batch, 1, 1, 1)
        images[use.name] = torch.cat([x] * 2) if cfg and use.name not in cond_only else x
    return ControlNets(modules, images, {u.name: u.weight for u in uses}, {u.name: u.window for u in uses}, cond_only)


__all__ = ["ControlNets", "METADATA_KEY", "residuals", "check_fits", "controlnet_from_unet", "is_adapter", "is_controlnet", "is_single_file",
           "load_controlnet", "prepare", "read_single_file"]
