"""Style adapter: CLIP-vision tokens of a reference image → extra text-context tokens (paper §3.3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from t2iadapter.errors import ConditionError, ConfigError
from t2iadapter.models.base import MAX_COUNT, MAX_TOKENS, MAX_WIDTH, AdapterModule, check_ints, register
from t2iadapter.models.transformer import LayerNorm, ResidualAttentionBlock


@dataclass(frozen=True)
class StyleAdapterConfig:
    """Original `StyleAdapter(width=1024, context_dim=768, num_head=8, n_layes=3, num_token=8)`."""

    width: int = 1024  # CLIP ViT-L/14 hidden size (its last_hidden_state is [N, 257, 1024])
    context_dim: int = 768  # text-encoder width of the UNet's cross-attention (768 for SD1.x)
    num_heads: int = 8
    num_layers: int = 3
    num_tokens: int = 8  # style tokens appended to the text context

    def __post_init__(self) -> None:
        check_ints("style", {"width": (self.width, MAX_WIDTH), "context_dim": (self.context_dim, MAX_WIDTH),
                             "num_heads": (self.num_heads, MAX_TOKENS), "num_layers": (self.num_layers, MAX_COUNT),
                             "num_tokens": (self.num_tokens, MAX_TOKENS)})
        if self.width % self.num_heads:
            raise ConfigError(f"width {self.width} is not divisible by num_heads {self.num_heads}")

    @property
    def kind(self) -> str:
        return "style"


class StyleAdapter(AdapterModule):
    """[N, L, width] CLIP-vision tokens ++ learned style tokens → transformer → [N, num_tokens, context_dim]."""

    config_class = StyleAdapterConfig

    def __init__(self, config: StyleAdapterConfig) -> None:
        super().__init__(config)
        w = config.width
        self.style_embedding = nn.Parameter(torch.empty(1, config.num_tokens, w))
        self.ln_pre = LayerNorm(w)
        self.transformer_layes = nn.Sequential(  # sic: the original's key name
            *[ResidualAttentionBlock(w, config.num_heads) for _ in range(config.num_layers)]
        )
        self.ln_post = LayerNorm(w)
        self.proj = nn.Parameter(torch.empty(w, config.context_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Original init: style tokens and projection ~ N(0, width^-1)."""
        scale = self.config.width**-0.5
        with torch.no_grad():
            self.style_embedding.normal_(0, scale)
            self.proj.normal_(0, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.config.width:
            raise ConditionError(
                f"style adapter takes CLIP-vision tokens [N, L, {self.config.width}], got shape {tuple(x.shape)}; "
                "use the `style` extractor on the reference image"
            )
        tokens = self.style_embedding.to(x.dtype).expand(x.shape[0], -1, -1)
        x = self.ln_pre(torch.cat([x, tokens], dim=1))
        x = self.transformer_layes(x)
        x = self.ln_post(x[:, -self.config.num_tokens :])
        return x @ self.proj.to(x.dtype)


register("style", StyleAdapterConfig, StyleAdapter)
