"""Prompt conditioning for classifier-free guidance, as diffusers' SD/SDXL pipelines compute it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from t2iadapter import unet_hook
from t2iadapter.bases import BaseModel, TextContext, encode_text, sdxl_time_ids


@dataclass
class Prompts:
    """Text context for the UNet: conditional, and unconditional (negative, first) when guidance is on."""

    text: TextContext
    negative: TextContext | None  # None: no classifier-free guidance

    @property
    def cfg(self) -> bool:
        return self.negative is not None

    def context(self, style_tokens: torch.Tensor | None) -> torch.Tensor:
        """[B(·2), 77(+T), D]: style tokens appended; the unconditional branch repeats its own last tokens."""
        cond = unet_hook.extend_context(self.text.context, style_tokens, unconditional=False)
        if self.negative is None:
            return cond
        return torch.cat([unet_hook.extend_context(self.negative.context, style_tokens, unconditional=True), cond])

    def added(self, base: BaseModel, canvas: tuple[int, int], device: torch.device) -> dict[str, torch.Tensor] | None:
        """SDXL's pooled text embeddings and size/crop ids; None for SD1.x/SD2.x."""
        if not base.is_sdxl:
            return None
        cw, ch = canvas
        batch = self.text.context.shape[0]
        time_ids = sdxl_time_ids(ch, cw, batch, self.text.context.dtype, device)
        if self.negative is None:
            return {"text_embeds": self.text.pooled.to(device), "time_ids": time_ids}
        pooled = torch.cat([self.negative.pooled, self.text.pooled])
        return {"text_embeds": pooled.to(device), "time_ids": torch.cat([time_ids] * 2)}


def _negatives(negative: str | tuple[str, ...] | None, prompts: tuple[str, ...]) -> list[str]:
    return [negative or ""] * len(prompts) if negative is None or isinstance(negative, str) else list(negative)


def encode_prompts(base: BaseModel, prompts: tuple[str, ...], negative: str | tuple[str, ...] | None, repeat: int,
                   cfg: bool) -> Prompts:
    """Positive and negative prompts through the text encoder(s) separately, exactly as diffusers does."""
    text = encode_text(base, list(prompts)).repeat(repeat)
    if not cfg:
        return Prompts(text, None)
    if negative is None and base.is_sdxl:  # SDXL's force_zeros_for_empty_prompt
        return Prompts(text, encode_text(base, list(prompts), zeros=True).repeat(repeat))
    return Prompts(text, encode_text(base, _negatives(negative, prompts)).repeat(repeat))


def encode_prompts_batched(base: BaseModel, prompts: tuple[str, ...], negative: str | tuple[str, ...] | None,
                           repeat: int, cfg: bool) -> Prompts:
    """Fast mode: negative and positive prompts as one batch (and SDXL's zero negative without running the encoders)."""
    if not cfg or (negative is None and base.is_sdxl):
        text = encode_text(base, list(prompts)).repeat(repeat)
        if not cfg:
            return Prompts(text, None)
        return Prompts(text, TextContext(torch.zeros_like(text.context), torch.zeros_like(text.pooled)))
    negs = _negatives(negative, prompts)
    both, k = encode_text(base, negs + list(prompts)), len(negs)
    pooled = both.pooled
    neg = TextContext(both.context[:k], None if pooled is None else pooled[:k]).repeat(repeat)
    text = TextContext(both.context[k:], None if pooled is None else pooled[k:]).repeat(repeat)
    return Prompts(text, neg)
