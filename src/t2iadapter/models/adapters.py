"""Spatial adapters: the full adapter (SD1.x/SD2.x and SDXL) and the light (colour) adapter.

Module names follow the original TencentARC code (`ldm/modules/encoders/adapter.py`), so an
original checkpoint loads 1:1: `conv_in`, `body.{k}.{in_conv,block1,block2,skep,down_opt.op}`
for the full adapter and `body.{i}.{in_conv,body.{j}.block{1,2},out_conv}` for the light one.
diffusers' key names are mapped in `t2iadapter.formats`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from t2iadapter.errors import ConditionError, ConfigError
from t2iadapter.models.base import MAX_COUNT, MAX_WIDTH, AdapterModule, check_ints, register


@dataclass(frozen=True)
class FullAdapterConfig:
    """Full adapter (paper §3.2, original `Adapter`); defaults are the released SD1.x models."""

    in_channels: int = 3  # raw condition channels: 1 (sketch, canny) or 3 (depth, seg, pose)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # one feature map per UNet encoder scale
    num_res_blocks: int = 2  # residual blocks per stage (original `nums_rb`)
    downscale_factor: int = 8  # PixelUnshuffle: 8 = SD latent grid, 16 = SDXL (whose 1st level is not downsampled)
    downsample: tuple[bool, ...] = (False, True, True, True)  # 2x down at the start of each stage
    ksize: int = 1  # kernel of in_conv/block2/skep (original `ksize`); released models: 1
    skip_conv: bool = False  # learned skip conv `skep` and an in_conv in every block (original `sk=False`)
    conv_downsample: bool = False  # strided 3x3 conv `down_opt.op` instead of 2x2 avg-pool (original `use_conv`)
    pool_ceil_mode: bool = True  # avg-pool rounds odd sizes up like the UNet (diffusers); the original floors

    def __post_init__(self) -> None:
        check_ints("full", {"in_channels": (self.in_channels, MAX_COUNT), "channels": (self.channels, MAX_WIDTH),
                            "num_res_blocks": (self.num_res_blocks, MAX_COUNT), "downscale_factor": (self.downscale_factor, 64)})
        if not isinstance(self.downsample, tuple) or len(self.downsample) != len(self.channels):
            raise ConfigError(f"downsample must have one entry per stage ({len(self.channels)}), got {self.downsample!r}"[:300])
        if isinstance(self.ksize, bool) or self.ksize not in (1, 3):  # (True == 1)
            raise ConfigError(f"ksize must be 1 or 3 (as in the original), got {self.ksize}")
        if not all(isinstance(d, bool) for d in self.downsample) or not isinstance(self.skip_conv, bool) \
                or not isinstance(self.conv_downsample, bool) or not isinstance(self.pool_ceil_mode, bool):
            raise ConfigError("full adapter config: downsample, skip_conv, conv_downsample and pool_ceil_mode are booleans")

    @property
    def kind(self) -> str:
        """`full_xl` for diffusers' SDXL layout (only the 3rd stage downsamples), else `full` (what the layout is,
        not which base it is for: `unet_hook.check_adapter_fits` compares scales and channels with the base)."""
        n = len(self.channels)
        xl, sd = tuple(i == 2 for i in range(n)), tuple(i > 0 for i in range(n))
        if self.downsample == xl and (xl != sd or self.downscale_factor == 16):
            return "full_xl"
        return "full"

    @classmethod
    def sd(cls, in_channels: int = 3, **overrides) -> "FullAdapterConfig":
        """The released SD1.x/SD2.x layout (77.00M params for 1 channel, 77.37M for 3)."""
        return cls(in_channels=in_channels, **overrides)

    @classmethod
    def sdxl(cls, in_channels: int = 3, **overrides) -> "FullAdapterConfig":
        """The released SDXL layout (diffusers' `full_adapter_xl`): unshuffle 16, only the 3rd stage downsampled."""
        kw = dict(downscale_factor=16)
        kw.update(overrides)
        kw.setdefault("downsample", tuple(i == 2 for i in range(len(kw.get("channels", cls.channels)))))
        return cls(in_channels=in_channels, **kw)

    @property
    def total_downscale(self) -> int:
        """Input side lengths must be multiples of this for every stage to halve exactly."""
        return self.downscale_factor * 2 ** sum(self.downsample)

    @property
    def feature_scales(self) -> tuple[int, ...]:
        """Input pixels per feature pixel of each output (unshuffle x 2 per downsample so far)."""
        return _scales(self.downscale_factor, self.downsample)


def _scales(unshuffle: int, downsample: tuple[bool, ...]) -> tuple[int, ...]:
    scales, s = [], unshuffle
    for down in downsample:
        s *= 2 if down else 1
        scales.append(s)
    return tuple(scales)


class Downsample(nn.Module):
    """2x down: avg-pool, or a strided 3x3 conv (`op`, as the original's key `down_opt.op`)."""

    def __init__(self, channels: int, use_conv: bool, ceil_mode: bool) -> None:
        super().__init__()
        if use_conv:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResnetBlock(nn.Module):
    """Original `ResnetBlock`: (down) → (in_conv) → 3x3 conv → ReLU → ksize conv, plus skip."""

    def __init__(self, in_c: int, out_c: int, down: bool, config: FullAdapterConfig) -> None:
        super().__init__()
        pad = config.ksize // 2
        self.down_opt = Downsample(in_c, config.conv_downsample, config.pool_ceil_mode) if down else None
        self.in_conv = nn.Conv2d(in_c, out_c, config.ksize, 1, pad) if (in_c != out_c or config.skip_conv) else None
        self.block1 = nn.Conv2d(out_c, out_c, 3, 1, 1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(out_c, out_c, config.ksize, 1, pad)
        # The original's current SD branch: `skep` acts on in_conv's output, so it is out_c -> out_c.
        self.skep = nn.Conv2d(out_c, out_c, config.ksize, 1, pad) if config.skip_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        h = self.block2(self.act(self.block1(x)))
        return h + (self.skep(x) if self.skep is not None else x)


class _SpatialAdapter(AdapterModule):
    """Shared input checks and helpers of the spatial adapters."""

    def check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != 4:
            raise ConditionError(f"condition must be a [N, C, H, W] tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_channels:
            raise ConditionError(
                f"this {self.kind} adapter takes {cfg.in_channels}-channel conditions, got {x.shape[1]} channels"
            )
        h, w = x.shape[-2:]
        if h % cfg.downscale_factor or w % cfg.downscale_factor:
            raise ConditionError(
                f"condition size {w}x{h} must be a multiple of {cfg.downscale_factor} (the adapter's pixel-unshuffle); "
                "the pipeline resizes for you"
            )


class FullAdapter(_SpatialAdapter):
    """Full adapter: PixelUnshuffle → conv_in → stages of residual blocks → one feature per stage."""

    config_class = FullAdapterConfig

    def __init__(self, config: FullAdapterConfig) -> None:
        super().__init__(config)
        ch = config.channels
        self.unshuffle = nn.PixelUnshuffle(config.downscale_factor)
        self.conv_in = nn.Conv2d(config.in_channels * config.downscale_factor**2, ch[0], 3, 1, 1)
        blocks = []
        for i, out_c in enumerate(ch):
            for j in range(config.num_res_blocks):
                in_c = ch[i - 1] if (i > 0 and j == 0) else out_c
                blocks.append(ResnetBlock(in_c, out_c, down=config.downsample[i] and j == 0, config=config))
        self.body = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[N, C, H, W] in [0, 1] → one [N, ch_i, H/s_i, W/s_i] map per stage."""
        self.check_input(x)
        x = self.conv_in(self.unshuffle(x))
        features = []
        n = self.config.num_res_blocks
        for i in range(len(self.config.channels)):
            for block in self.body[i * n : (i + 1) * n]:
                x = block(x)
            features.append(x)
        return features


@dataclass(frozen=True)
class LightAdapterConfig:
    """Light adapter (original `Adapter_light`, the colour adapter); defaults are the released model."""

    in_channels: int = 3  # raw condition channels
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # one feature map per UNet encoder scale
    num_res_blocks: int = 4  # light residual blocks per stage (original `nums_rb`)
    downscale_factor: int = 8  # PixelUnshuffle factor
    pool_ceil_mode: bool = True  # avg-pool rounds odd sizes up like the UNet (diffusers); the original floors

    def __post_init__(self) -> None:
        check_ints("light", {"in_channels": (self.in_channels, MAX_COUNT), "channels": (self.channels, MAX_WIDTH),
                             "num_res_blocks": (self.num_res_blocks, MAX_COUNT), "downscale_factor": (self.downscale_factor, 64)})
        if any(c % 4 for c in self.channels):
            raise ConfigError(f"light adapter channels must be multiples of 4, got {self.channels}")
        if not isinstance(self.pool_ceil_mode, bool):
            raise ConfigError(f"light adapter config: pool_ceil_mode is a boolean, got {self.pool_ceil_mode!r}")

    @property
    def kind(self) -> str:
        return "light"

    @property
    def downsample(self) -> tuple[bool, ...]:
        return (False,) + (True,) * (len(self.channels) - 1)

    @property
    def total_downscale(self) -> int:
        return self.downscale_factor * 2 ** (len(self.channels) - 1)

    @property
    def feature_scales(self) -> tuple[int, ...]:
        return _scales(self.downscale_factor, self.downsample)


class LightResnetBlock(nn.Module):
    """Original `ResnetBlock_light`: 3x3 conv → ReLU → 3x3 conv, plus input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(self.act(self.block1(x)))


class LightStage(nn.Module):
    """Original `extractor`: (avg-pool down) → 1x1 to ch/4 → light blocks → 1x1 to ch."""

    def __init__(self, in_c: int, out_c: int, num_res_blocks: int, down: bool, ceil_mode: bool) -> None:
        super().__init__()
        mid = out_c // 4
        self.down_opt = Downsample(in_c, use_conv=False, ceil_mode=ceil_mode) if down else None
        self.in_conv = nn.Conv2d(in_c, mid, 1)
        self.body = nn.Sequential(*[LightResnetBlock(mid) for _ in range(num_res_blocks)])
        self.out_conv = nn.Conv2d(mid, out_c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        return self.out_conv(self.body(self.in_conv(x)))


class LightAdapter(_SpatialAdapter):
    """Light adapter: PixelUnshuffle → one light stage per scale (≈18.7M params released)."""

    config_class = LightAdapterConfig

    def __init__(self, config: LightAdapterConfig) -> None:
        super().__init__(config)
        ch = config.channels
        self.unshuffle = nn.PixelUnshuffle(config.downscale_factor)
        cin = config.in_channels * config.downscale_factor**2
        self.body = nn.ModuleList(
            LightStage(cin if i == 0 else ch[i - 1], c, config.num_res_blocks, i > 0, config.pool_ceil_mode)
            for i, c in enumerate(ch)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[N, C, H, W] in [0, 1] → one map per stage."""
        self.check_input(x)
        x = self.unshuffle(x)
        features = []
        for stage in self.body:
            x = stage(x)
            features.append(x)
        return features


register("full", FullAdapterConfig, FullAdapter)
register("full_xl", FullAdapterConfig, FullAdapter)
register("light", LightAdapterConfig, LightAdapter)
