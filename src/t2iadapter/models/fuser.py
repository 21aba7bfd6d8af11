"""CoAdapter fuser: composes several adapters' features through a small transformer (original `CoAdapterFuser`)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from t2iadapter.errors import ConditionError, ConfigError
from t2iadapter.models.base import MAX_COUNT, MAX_TOKENS, MAX_WIDTH, AdapterModule, check_ints, register
from t2iadapter.models.transformer import LayerNorm, ResidualAttentionBlock

#: task-embedding rows, as the original's `ExtraCondition` enum. `pose` is our name for openpose.
TASKS: dict[str, int] = {
    "sketch": 0,
    "keypose": 1,
    "seg": 2,
    "depth": 3,
    "canny": 4,
    "style": 5,
    "color": 6,
    "openpose": 7,
    "pose": 7,
}


@dataclass(frozen=True)
class FuserConfig:
    """Original `CoAdapterFuser(unet_channels=[320, 640, 1280, 1280], width=768, num_head=8, n_layes=3)`."""

    unet_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels of the spatial adapters' maps
    width: int = 768  # token width; also the width of style tokens it modulates
    num_heads: int = 8
    num_layers: int = 3
    num_tasks: int = 16  # rows of the task embedding ("16, maybe large enough")

    def __post_init__(self) -> None:
        check_ints("fuser", {"unet_channels": (self.unet_channels, MAX_WIDTH), "width": (self.width, MAX_WIDTH),
                             "num_heads": (self.num_heads, MAX_TOKENS), "num_layers": (self.num_layers, MAX_COUNT),
                             "num_tasks": (self.num_tasks, MAX_TOKENS)})
        if self.width % self.num_heads:
            raise ConfigError(f"width {self.width} is not divisible by num_heads {self.num_heads}")

    @property
    def kind(self) -> str:
        return "fuser"


class CoAdapterFuser(AdapterModule):
    """Spatial maps → 4 tokens each (+task, +position); style tokens (+task); transformer; modulate each input."""

    config_class = FuserConfig

    def __init__(self, config: FuserConfig) -> None:
        super().__init__(config)
        w = config.width
        self.task_embedding = nn.Parameter(torch.empty(config.num_tasks, w))
        self.positional_embedding = nn.Parameter(torch.empty(len(config.unet_channels), w))
        self.spatial_feat_mapping = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(ch, w)) for ch in config.unet_channels)
        self.transformer_layes = nn.Sequential(  # sic: the original's key name
            *[ResidualAttentionBlock(w, config.num_heads) for _ in range(config.num_layers)]
        )
        self.ln_post = LayerNorm(w)
        self.ln_pre = LayerNorm(w)
        self.spatial_ch_projs = nn.ModuleList(nn.Linear(w, ch) for ch in config.unet_channels)
        self.seq_proj = nn.Parameter(torch.empty(w, w))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Original init: embeddings ~ N(0, width), output projections zero so a new fuser is the plain sum."""
        scale = self.config.width**0.5
        with torch.no_grad():
            self.task_embedding.normal_(0, scale)
            self.positional_embedding.normal_(0, scale)
            for proj in self.spatial_ch_projs:
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)
            self.seq_proj.zero_()

    def parts(self, features: Mapping[str, list[torch.Tensor] | torch.Tensor]) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        """{condition: 4 maps, or style tokens [N, T, width]} → each condition's modulated maps or tokens.

        The transformer sees every condition at once; `forward` sums the maps and concatenates the tokens.
        """
        tokens = []
        for name, feat in features.items():
            if name not in TASKS:
                raise ConditionError(f"the fuser knows conditions {sorted(TASKS)}, not {name!r}")
            task = self.task_embedding[TASKS[name]]
            if isinstance(feat, torch.Tensor):
                tokens.append(feat + task)
                continue
            if len(feat) != len(self.spatial_feat_mapping):
                raise ConditionError(f"{name}: expected {len(self.spatial_feat_mapping)} feature maps, got {len(feat)}")
            seq = torch.stack([m(f.mean(dim=(2, 3))) for m, f in zip(self.spatial_feat_mapping, feat)], dim=1)
            tokens.append(seq + task + self.positional_embedding)
        x = self.ln_post(self.transformer_layes(self.ln_pre(torch.cat(tokens, dim=1))))

        out: dict[str, list[torch.Tensor] | torch.Tensor] = {}
        pos = 0
        for name, feat in features.items():
            if isinstance(feat, torch.Tensor):
                n = feat.shape[1]
                out[name] = feat * (x[:, pos : pos + n] @ self.seq_proj + 1)
                pos += n
                continue
            out[name] = [f * (proj(x[:, pos + i]) + 1)[:, :, None, None]
                         for i, (f, proj) in enumerate(zip(feat, self.spatial_ch_projs))]
            pos += len(feat)
        return out

    def forward(
        self, features: Mapping[str, list[torch.Tensor] | torch.Tensor]
    ) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        """{condition name: 4 maps, or style tokens [N, T, width]} → (summed modulated maps, modulated style tokens)."""
        if not features:
            return None, None
        return combine(list(self.parts(features).values()))


def combine(parts: list[list[torch.Tensor] | torch.Tensor]) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """Spatial parts summed in order, style tokens concatenated in order: (maps, tokens), either may be None."""
    maps: list[torch.Tensor] | None = None
    seqs = []
    for part in parts:
        if isinstance(part, torch.Tensor):
            seqs.append(part)
        else:
            maps = list(part) if maps is None else [a + b for a, b in zip(maps, part)]
    return maps, (torch.cat(seqs, dim=1) if seqs else None)


register("fuser", FuserConfig, CoAdapterFuser)
