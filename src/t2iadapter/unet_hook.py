"""The one module that knows how adapter outputs enter diffusers' UNet2DConditionModel.

Spatial features (DESIGN.md §3) go in through `down_intrablock_additional_residuals`: diffusers
adds the k-th map after the k-th encoder level (after its last res/attn pair; for SDXL after
DownBlock2D 0's downsampler, and the 4th after the mid block), so skip connections carry it.
The UNet consumes that list with `pop(0)`, so every call gets a fresh list and the caller's
tensors are never touched. Style tokens (paper §3.3) extend the cross-attention context.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

from t2iadapter.errors import ConfigError


def is_sdxl(unet: UNet2DConditionModel) -> bool:
    """SDXL UNets take pooled text embeddings and size/crop ids (`addition_embed_type="text_time"`)."""
    return unet.config.get("addition_embed_type") == "text_time"


def feature_channels(unet: UNet2DConditionModel) -> list[int]:
    """Channel count of each adapter feature a new adapter for this UNet gives (released layouts: one per down
    block, SDXL one more after the mid block)."""
    channels = list(unet.config.block_out_channels)
    if is_sdxl(unet):
        channels.append(channels[-1])  # the 4th SDXL feature enters after the mid block
    return channels


@dataclass(frozen=True)
class FeatureSlot:
    """Where one adapter feature enters the UNet: its channels and its scale (image pixels per feature pixel)."""

    channels: int
    scale: int
    mid_block: bool = False  # after the mid block: diffusers adds it only if its shape fits, so it is optional


def feature_slots(unet: UNet2DConditionModel, vae_scale_factor: int) -> list[FeatureSlot]:
    """Every place diffusers' UNet adds an adapter feature, in order, read from the UNet and VAE configs.

    A cross-attention down block takes its feature before its downsampler, a plain down block after it
    (diffusers' `UNet2DConditionModel.forward`); one more may follow the mid block, at the lowest scale.
    """
    slots, scale = [], vae_scale_factor
    for block, c in zip(unet.down_blocks, unet.config.block_out_channels):
        cross = getattr(block, "has_cross_attention", False)
        if cross:
            slots.append(FeatureSlot(c, scale))
        if getattr(block, "downsamplers", None) is not None:
            scale *= 2
        if not cross:
            slots.append(FeatureSlot(c, scale))
    if unet.mid_block is not None:
        slots.append(FeatureSlot(unet.config.block_out_channels[-1], scale, mid_block=True))
    return slots


def adapter_layout(unet: UNet2DConditionModel, vae_scale_factor: int) -> dict:
    """`channels`, `downscale_factor` and `downsample` of a full adapter that fits this base (the slots that
    `feature_channels` counts)."""
    slots = feature_slots(unet, vae_scale_factor)[: len(feature_channels(unet))]
    downs = tuple(i > 0 and s.scale != slots[i - 1].scale for i, s in enumerate(slots))
    return dict(channels=tuple(s.channels for s in slots), downscale_factor=slots[0].scale, downsample=downs)


def _describe(pairs) -> str:
    return "[" + ", ".join(f"{c}ch@1/{s}" for c, s in pairs) + "]"


def check_adapter_fits(unet: UNet2DConditionModel, config, name: str, *, vae_scale_factor: int) -> None:
    """Raise a clear ConfigError unless a spatial adapter's features have the channels and scales the UNet takes.

    The adapter must fill every down-block slot in order; the mid-block slot is optional (as in diffusers).
    """
    slots = feature_slots(unet, vae_scale_factor)
    given = list(zip(config.channels, config.feature_scales))
    wanted = [(s.channels, s.scale) for s in slots]
    required = sum(not s.mid_block for s in slots)
    if len(given) < required or len(given) > len(slots) or given != wanted[: len(given)]:
        optional = " (the last one, after the mid block, optional)" if len(slots) > required else ""
        raise ConfigError(
            f"adapter {name!r} gives features {_describe(given)} (channels@scale of the input); this base "
            f"takes {_describe(wanted)}{optional}"
        )


def check_style_fits(unet: UNet2DConditionModel, config, name: str) -> None:
    if config.context_dim != unet.config.cross_attention_dim:
        raise ConfigError(f"style adapter {name!r} makes {config.context_dim}-wide tokens; this UNet's context is "
                          f"{unet.config.cross_attention_dim} wide")


def extend_context(context: torch.Tensor, style_tokens: torch.Tensor | None, *, unconditional: bool) -> torch.Tensor:
    """Append style tokens to the text context; the unconditional branch repeats its own last tokens."""
    if style_tokens is None:
        return context
    n = style_tokens.shape[1]
    extra = context[:, -n:] if unconditional else style_tokens.to(context.dtype).expand(context.shape[0], -1, -1)
    return torch.cat([context, extra], dim=1)


def unet_forward(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    context: torch.Tensor,
    features: Sequence[torch.Tensor] | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    timestep_cond: torch.Tensor | None = None,
    control: tuple[Sequence[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One UNet evaluation with adapter features added to the encoder; returns the model output.

    `control`: ControlNet residuals (one per skip connection, one for the mid block); diffusers adds them to
    the skips after the encoder ran (with the adapter features inside it) and to the mid block's output.
    """
    kwargs = {}
    if features is not None:
        kwargs["down_intrablock_additional_residuals"] = list(features)  # fresh list: the UNet pops from it
    if control is not None:
        kwargs["down_block_additional_residuals"] = tuple(control[0])
        kwargs["mid_block_additional_residual"] = control[1]
    return unet(
        sample,
        timestep,
        encoder_hidden_states=context,
        added_cond_kwargs=added_cond_kwargs,
        timestep_cond=timestep_cond,
        return_dict=False,
        **kwargs,
    )[0]


def use_sdpa(unet: UNet2DConditionModel, *, fused_qkv: bool = False) -> None:
    """Route every attention layer through PyTorch's fused scaled-dot-product attention (flash/mem-efficient).

    `fused_qkv` also concatenates each layer's q/k/v (cross-attention: k/v) projections into one matmul
    (diffusers' `fuse_qkv_projections`; the fused weights are copies, made from the current weights).
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    if fused_qkv:
        try:
            unet.fuse_qkv_projections()
        except Exception as exc:  # noqa: BLE001 - e.g. added-KV attention; separate projections still work
            import logging

            logging.getLogger(__name__).warning("cannot fuse q/k/v projections (%s); keeping them separate", exc)
            unet.set_attn_processor(AttnProcessor2_0())


def zero_features(unet: UNet2DConditionModel, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """All-zero features shaped like `like`: adding them is a no-op, but keeps one compiled graph for every step."""
    return [torch.zeros_like(f) for f in like]


def feature_shapes(unet: UNet2DConditionModel, latent_size: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(C, H, W) of each feature this UNet adds at a latent size (h, w), in injection order (DESIGN.md §3).

    A cross-attention down block takes its feature before its downsampler; a plain down block after
    it (SDXL's first level); SDXL's 4th feature enters after the mid block, at the lowest resolution.
    """
    h, w = latent_size
    channels = feature_channels(unet)
    shapes = []
    for block, c in zip(unet.down_blocks, unet.config.block_out_channels):
        down = getattr(block, "downsamplers", None) is not None
        if getattr(block, "has_cross_attention", False):
            shapes.append((c, h, w))
        if down:
            h, w = (h + 1) // 2, (w + 1) // 2  # 3x3 conv, stride 2, padding 1
        if not getattr(block, "has_cross_attention", False):
            shapes.append((c, h, w))
    if is_sdxl(unet):
        shapes.append((channels[-1], h, w))
    return shapes[: len(channels)]


def no_features(unet: UNet2DConditionModel, batch: int, latent_size: tuple[int, int], *, dtype: torch.dtype,
                device: torch.device | str) -> list[torch.Tensor]:
    """All-zero channels-last features for a call without spatial adapters: the same compiled graph as one with them."""
    return [torch.zeros(batch, *shape, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
            for shape in feature_shapes(unet, latent_size)]


def transformer_linears(unet: UNet2DConditionModel) -> list[str]:
    """Qualified names of the Linear layers inside the UNet's transformer blocks that a call uses: attention
    projections (the fused q/k/v where `use_sdpa(fused_qkv=True)` made them, not the separate ones they replace),
    feed-forwards, and SDXL's linear proj_in/proj_out. Time, class and size embeddings are not among them.
    """
    names = []
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear) or not (".transformer_blocks." in name or
                                                          name.endswith((".proj_in", ".proj_out"))):
            continue
        parent, _, leaf = name.rpartition(".")
        attn = unet.get_submodule(parent)
        if getattr(attn, "fused_projections", False):
            fused = ("to_k", "to_v") if getattr(attn, "is_cross_attention", False) else ("to_q", "to_k", "to_v")
            if leaf in fused:
                continue  # replaced by to_qkv / to_kv in the call
        names.append(name)
    return names
