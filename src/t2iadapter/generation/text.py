"""Prompt conditioning for classifier-free guidance, as diffusers' SD/SDXL pipelines compute it."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from t2iadapter import unet_hook
from t2iadapter.bases import BaseModel, TextContext, encode_text, sdxl_time_ids


@dataclass
class Prompts:
    """Text context for the UNet: conditional, and unconditional (negative, first) when guidance is on."""

    text: TextContext
    negative: TextContext | None  # None: no classifier-free guidance
    _made: dict[int, tuple] = field(default_factory=dict, repr=False, compare=False)

    @property
    def cfg(self) -> bool:
        return self.negative is not None

    def context(self, style_tokens: torch.Tensor | None) -> torch.Tensor:
        """[B(·2), 77(+T), D]: style tokens appended; the unconditional branch repeats its own last tokens.

        Made once per set of style tokens and kept (the loop asks every step; diffusers concatenates once too).
        """
        key = id(style_tokens)
        made = self._made.get(key)
        if made is not None and made[0] is style_tokens:
            return made[1]
        cond = unet_hook.extend_context(self.text.context, style_tokens, unconditional=False)
        if self.negative is not None:
            cond = torch.cat([unet_hook.extend_context(self.negative.context, style_tokens, unconditional=True), cond])
        self._made[key] = (style_tokens, cond)  # the tokens are held too, so their id stays theirs
        return cond

    def added(self, base: BaseModel, canvas: tuple[int, int], device: torch.device,
              original_size: tuple[int, int] | None = None) -> dict[str, torch.Tensor] | None:
        """SDXL's pooled text embeddings and size/crop ids (`original_size` (w, h): default the canvas); None for SD1/2."""
        if not base.is_sdxl:
            return None
        cw, ch = canvas
        batch = self.text.context.shape[0]
        time_ids = sdxl_time_ids(ch, cw, batch, self.text.context.dtype, device)
        if original_size is not None:
            time_ids[:, 0], time_ids[:, 1] = original_size[1], original_size[0]  # diffusers' order: (height, width)
        if self.negative is None:
            return {"text_embeds": self.text.pooled.to(device), "time_ids": time_ids}
        pooled = torch.cat([self.negative.pooled, self.text.pooled])
        return {"text_embeds": pooled.to(device), "time_ids": torch.cat([time_ids] * 2)}


def _negatives(negative: str | tuple[str, ...] | None, prompts: tuple[str, ...]) -> list[str]:
    return [negative or ""] * len(prompts) if negative is None or isinstance(negative, str) else list(negative)


def encode_prompts(base: BaseModel, prompts: tuple[str, ...], negative: str | tuple[str, ...] | None, repeat: int,
                   cfg: bool, *, clip_skip: int | None = None, prompts_2: tuple[str, ...] | None = None,
                   negative_2: str | tuple[str, ...] | None = None, given: "GivenEmbeds | None" = None) -> Prompts:
    """Positive and negative prompts through the text encoder(s) separately, exactly as diffusers does.

    As diffusers' `encode_prompt`: `clip_skip` applies to the prompts only, SDXL's second encoder reads
    `prompts_2` (default: the prompts) and `negative_2` (default: the negative prompt), and embeddings the
    caller gives (`given`) replace the encoder's output.
    """
    if given is not None and given.text is not None:
        text = given.text.repeat(repeat)
    else:
        text = encode_text(base, list(prompts), clip_skip=clip_skip,
                           prompts_2=list(prompts_2) if prompts_2 is not None else None).repeat(repeat)
    if not cfg:
        return Prompts(text, None)
    if given is not None and given.negative is not None:
        return Prompts(text, given.negative.repeat(repeat))
    if negative is None and base.is_sdxl:  # SDXL's force_zeros_for_empty_prompt
        return Prompts(text, TextContext(torch.zeros_like(text.context), torch.zeros_like(text.pooled)))
    negs = _negatives(negative, prompts)
    negs_2 = None
    if base.is_sdxl and negative_2 is not None:
        negs_2 = _negatives(negative_2, prompts)
    return Prompts(text, encode_text(base, negs, prompts_2=negs_2).repeat(repeat))


@dataclass
class GivenEmbeds:
    """Prompt embeddings a caller computed (diffusers' `prompt_embeds`, `negative_prompt_embeds`, pooled for SDXL)."""

    text: TextContext | None
    negative: TextContext | None


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


_WORD_LIST_TOKENIZER = 10_000  # fewer tokens than this: a tokenizer built from a word list (demo, tiny), not CLIP's


def unknown_words(base: BaseModel, prompts: tuple[str, ...]) -> list[str]:
    """Words of `prompts` a word-list tokenizer (the demo and tiny bases) does not know; [] for real CLIP tokenizers."""
    tokenizer = base.tokenizer
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return []
    if len(vocab) >= _WORD_LIST_TOKENIZER:
        return []
    words = dict.fromkeys(w for p in prompts for w in re.findall(r"[^\W\d_]+", p.lower()))
    return [w for w in words if f"{w}</w>" not in vocab]
