"""Adapter networks: parameter counts (DESIGN.md §2) and features equal to diffusers' T2IAdapter."""
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import T2IAdapter

from t2iadapter.errors import ConditionError, ConfigError
from t2iadapter.formats import ours_to_diffusers
from t2iadapter.models import (
    CoAdapterFuser,
    FullAdapterConfig,
    FuserConfig,
    LightAdapterConfig,
    StyleAdapter,
    StyleAdapterConfig,
    build_adapter,
)


def meta_count(config):
    with torch.device("meta"):
        return build_adapter(config).num_parameters


@pytest.mark.parametrize(
    "config, millions",
    [
        (FullAdapterConfig.sd(1), 77.00),
        (FullAdapterConfig.sd(3), 77.37),
        (LightAdapterConfig(), 18.69),
        (FullAdapterConfig.sdxl(1), 77.55),
        (FullAdapterConfig.sdxl(3), 79.03),
        (StyleAdapterConfig(), 38.59),
        (FuserConfig(), 27.29),
    ],
)
def test_parameter_counts_match_design(config, millions):
    assert round(meta_count(config) / 1e6, 2) == millions


def diffusers_twin(ours):
    """A diffusers T2IAdapter holding our weights (through our key map)."""
    cfg = ours.config
    if cfg.kind == "light":
        d = T2IAdapter(in_channels=cfg.in_channels, channels=list(cfg.channels[:-1]), num_res_blocks=cfg.num_res_blocks,
                       downscale_factor=cfg.downscale_factor, adapter_type="light_adapter")
    else:
        d = T2IAdapter(in_channels=cfg.in_channels, channels=list(cfg.channels), num_res_blocks=cfg.num_res_blocks,
                       downscale_factor=cfg.downscale_factor,
                       adapter_type="full_adapter_xl" if cfg.kind == "full_xl" else "full_adapter")
    d.load_state_dict(ours_to_diffusers(ours.state_dict(), cfg), strict=True)
    return d.eval()


def max_diff(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
    return max((x - y).abs().max().item() for x, y in zip(a, b))


TINY = dict(channels=(8, 16, 32, 32))


@pytest.mark.parametrize(
    "config",
    [
        FullAdapterConfig.sd(1, **TINY),
        FullAdapterConfig.sd(3, **TINY),
        LightAdapterConfig(channels=(8, 16, 32, 32), num_res_blocks=2),
        FullAdapterConfig.sdxl(3, **TINY),
    ],
    ids=["full1", "full3", "light", "xl"],
)
@pytest.mark.parametrize("hw", [(512, 512), (520, 776), (72, 136)])
def test_tiny_features_equal_diffusers(config, hw):
    if config.downscale_factor == 16 and (hw[0] % 16 or hw[1] % 16):
        hw = (hw[0] // 16 * 16 + 16, hw[1] // 16 * 16 + 16)  # SDXL input must be a multiple of 16
    ours = build_adapter(config).eval()
    theirs = diffusers_twin(ours)
    x = torch.rand(2, config.in_channels, *hw)
    with torch.no_grad():
        assert max_diff(ours(x), theirs(x)) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, hw",
    [(FullAdapterConfig.sd(3), (512, 512)), (FullAdapterConfig.sd(1), (520, 584)), (LightAdapterConfig(), (512, 512)),
     (FullAdapterConfig.sdxl(3), (512, 512))],
    ids=["full3", "full1-odd", "light", "xl"],
)
def test_full_size_features_equal_diffusers(config, hw):
    ours = build_adapter(config).eval()
    theirs = diffusers_twin(ours)
    x = torch.rand(1, config.in_channels, *hw)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert max_diff(a, b) <= 1e-5
    if config.kind == "full":
        h, w = hw[0] // 8, hw[1] // 8
        assert [tuple(f.shape[-2:]) for f in a] == [(h, w), (math.ceil(h / 2), math.ceil(w / 2)),
                                                    (math.ceil(h / 4), math.ceil(w / 4)), (math.ceil(h / 8), math.ceil(w / 8))]


def test_sdxl_feature_shapes_at_1024():
    ours = build_adapter(FullAdapterConfig.sdxl(3, channels=(8, 16, 32, 32)))
    shapes = [tuple(f.shape[1:]) for f in ours(torch.rand(1, 3, 1024, 1024))]
    assert shapes == [(8, 64, 64), (16, 64, 64), (32, 32, 32), (32, 32, 32)]


def test_bad_inputs_give_clear_errors():
    ad = build_adapter(FullAdapterConfig.sd(1, **TINY))
    with pytest.raises(ConditionError, match="1-channel"):
        ad(torch.rand(1, 3, 64, 64))
    with pytest.raises(ConditionError, match="multiple of 8"):
        ad(torch.rand(1, 1, 60, 64))
    with pytest.raises(ConfigError, match="ksize"):
        FullAdapterConfig(ksize=2)
    with pytest.raises(ConditionError, match="CLIP-vision"):
        build_adapter(StyleAdapterConfig(width=32, context_dim=16, num_heads=4, num_layers=1))(torch.rand(1, 5, 8))


def reference_block(x, sd, prefix, heads):
    """Original ResidualAttentionBlock written out by hand: LND layout, explicit softmax attention."""
    def ln(t, p):
        return F.layer_norm(t.float(), t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])
    n, l, d = x.shape
    h = ln(x, f"{prefix}.ln_1")
    qkv = h @ sd[f"{prefix}.attn.in_proj_weight"].T + sd[f"{prefix}.attn.in_proj_bias"]
    q, k, v = (t.reshape(n, l, heads, d // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
    att = att.transpose(1, 2).reshape(n, l, d) @ sd[f"{prefix}.attn.out_proj.weight"].T + sd[f"{prefix}.attn.out_proj.bias"]
    x = x + att
    h = ln(x, f"{prefix}.ln_2") @ sd[f"{prefix}.mlp.c_fc.weight"].T + sd[f"{prefix}.mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    return x + h @ sd[f"{prefix}.mlp.c_proj.weight"].T + sd[f"{prefix}.mlp.c_proj.bias"]


def test_style_adapter_matches_hand_written_reference():
    cfg = StyleAdapterConfig(width=32, context_dim=16, num_heads=4, num_layers=2, num_tokens=3)
    ad = StyleAdapter(cfg).eval()
    sd = ad.state_dict()
    x = torch.randn(2, 9, 32)
    h = torch.cat([x, sd["style_embedding"].expand(2, -1, -1)], dim=1)
    h = F.layer_norm(h, (32,), sd["ln_pre.weight"], sd["ln_pre.bias"])
    for i in range(2):
        h = reference_block(h, sd, f"transformer_layes.{i}", 4)
    ref = F.layer_norm(h[:, -3:], (32,), sd["ln_post.weight"], sd["ln_post.bias"]) @ sd["proj"]
    with torch.no_grad():
        out = ad(x)
    assert out.shape == (2, 3, 16)
    assert (out - ref).abs().max() < 1e-5


def test_fresh_fuser_is_the_plain_sum_and_trained_fuser_modulates():
    cfg = FuserConfig(unet_channels=(8, 16, 32, 32), width=32, num_heads=4, num_layers=1)
    fuser = CoAdapterFuser(cfg).eval()
    a = [torch.randn(1, c, 8 // 2**i + 1, 8 // 2**i + 1) for i, c in enumerate(cfg.unet_channels)]
    b = [torch.randn_like(t) for t in a]
    style = torch.randn(1, 4, 32)
    with torch.no_grad():
        maps, seq = fuser({"sketch": a, "color": b, "style": style})
    assert max_diff(maps, [x + y for x, y in zip(a, b)]) < 1e-6
    assert torch.allclose(seq, style)
    # With non-zero projections each map is scaled by (1 + proj(token)) per channel.
    with torch.no_grad():
        for p in fuser.spatial_ch_projs:
            p.bias.fill_(0.5)
        maps, _ = fuser({"sketch": a})
    assert max_diff(maps, [x * 1.5 for x in a]) < 1e-5
    assert fuser({}) == (None, None)
    with pytest.raises(ConditionError, match="knows conditions"):
        fuser({"nonsense": a})


def test_build_adapter_takes_a_config_or_its_dict():
    """A dict in config_to_dict's form builds the same network as its dataclass; anything else is one ConfigError."""
    from t2iadapter.models.base import config_to_dict

    config = LightAdapterConfig(channels=(16, 32, 32, 32), num_res_blocks=1)
    torch.manual_seed(0)
    from_config = build_adapter(config)
    torch.manual_seed(0)
    from_dict = build_adapter(config_to_dict(config))
    assert from_dict.config == config
    assert all(torch.equal(a, b) for a, b in zip(from_config.state_dict().values(), from_dict.state_dict().values()))
    for bad, words in [({"kind": "nope"}, "unknown adapter kind 'nope'"), ({"channels": [8]}, "kind None"),
                       ("full", "build_adapter takes an adapter config"), ({"kind": "light", "size": 3}, "unknown light config fields")]:
        with pytest.raises(ConfigError, match=words):
            build_adapter(bad)
