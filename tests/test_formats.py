"""Checkpoint formats: detection, every load path, lossless round trips, refusal of unsafe files."""
import json
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers import T2IAdapter
from safetensors.torch import save_file

from t2iadapter import load_adapter
from t2iadapter.cli import main as cli
from t2iadapter.errors import CheckpointError, ConfigError, UnsafeCheckpointError
from t2iadapter.formats import convert, detect_config, ours_to_diffusers
from t2iadapter.models import FullAdapterConfig, FuserConfig, LightAdapterConfig, StyleAdapterConfig, build_adapter

TINY = (8, 16, 32, 32)


def diffusers_random(adapter_type="full_adapter", in_channels=3, channels=TINY, **kw):
    torch.manual_seed(1)
    return T2IAdapter(in_channels=in_channels, channels=list(channels), adapter_type=adapter_type, **kw).eval()


def diffusers_to_original_keys(sd, n, light=False):
    """Invert diffusers' conversion (as its conversion script reads the original keys), independently of our code."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("adapter.")
        p = k.split(".")
        if p[0] == "body" and p[2] == "resnets":
            i, j = int(p[1]), int(p[3])
            k = f"body.{i}.body.{j}." + ".".join(p[4:]) if light else f"body.{i * n + j}." + ".".join(p[4:])
        elif p[0] == "body" and p[2] in ("in_conv", "out_conv") and not light:
            k = f"body.{int(p[1]) * n}.{p[2]}." + ".".join(p[3:])
        out[k] = v
    return out


def feats_equal(a, b, tol=1e-5):
    assert len(a) == len(b)
    return all(x.shape == y.shape and (x - y).abs().max() <= tol for x, y in zip(a, b))


@pytest.mark.parametrize(
    "adapter_type, in_channels, kw, light",
    [("full_adapter", 1, {}, False), ("full_adapter", 3, {}, False), ("full_adapter_xl", 3, {"downscale_factor": 16}, False),
     ("full_adapter_xl", 1, {"downscale_factor": 16}, False), ("light_adapter", 3, {"num_res_blocks": 4}, True)],
)
@pytest.mark.parametrize("prefix", ["", "adapter."])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_original_files_load_and_match_diffusers(tmp_path, adapter_type, in_channels, kw, light, prefix, suffix):
    channels = TINY[:-1] if light else TINY
    ref = diffusers_random(adapter_type, in_channels, channels, **kw)
    sd = {prefix + k: v.clone() for k, v in diffusers_to_original_keys(ref.state_dict(), ref.config.num_res_blocks, light).items()}
    path = tmp_path / f"t2iadapter_x{suffix}"
    torch.save(sd, path) if suffix == ".pth" else save_file(sd, str(path))
    ours = load_adapter(path)
    expected_kind = {"full_adapter": "full", "full_adapter_xl": "full_xl", "light_adapter": "light"}[adapter_type]
    assert ours.kind == expected_kind and ours.config.in_channels == in_channels
    x = torch.rand(1, in_channels, 128, 192)
    with torch.no_grad():
        assert feats_equal(ours(x), ref(x))


@pytest.mark.parametrize("adapter_type, kw", [("full_adapter", {}), ("full_adapter_xl", {"downscale_factor": 16}),
                                              ("light_adapter", {"num_res_blocks": 2})])
@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_diffusers_folder_loads_and_matches(tmp_path, adapter_type, kw, weights):
    ref = diffusers_random(adapter_type, 3, TINY[:-1] if adapter_type == "light_adapter" else TINY, **kw)
    ref.save_pretrained(tmp_path / "d", safe_serialization=weights == "safetensors")
    ours = load_adapter(tmp_path / "d")
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        assert feats_equal(ours(x), ref(x))


def original_reference(sd, x, n, ksize, sk, use_conv, downs):
    """The original `Adapter.forward` written out with F.conv2d on original keys (independent oracle)."""
    pad = ksize // 2
    x = F.conv2d(F.pixel_unshuffle(x, 8), sd["conv_in.weight"], sd["conv_in.bias"], padding=1)
    feats = []
    for i in range(4):
        for j in range(n):
            b = f"body.{i * n + j}."
            if i > 0 and j == 0 and downs[i]:
                x = F.conv2d(x, sd[b + "down_opt.op.weight"], sd[b + "down_opt.op.bias"], stride=2, padding=1) if use_conv \
                    else F.avg_pool2d(x, 2, 2)
            if b + "in_conv.weight" in sd:
                x = F.conv2d(x, sd[b + "in_conv.weight"], sd[b + "in_conv.bias"], padding=pad)
            h = F.conv2d(F.relu(F.conv2d(x, sd[b + "block1.weight"], sd[b + "block1.bias"], padding=1)),
                         sd[b + "block2.weight"], sd[b + "block2.bias"], padding=pad)
            x = h + (F.conv2d(x, sd[b + "skep.weight"], sd[b + "skep.bias"], padding=pad) if not sk else x)
        feats.append(x)
    return feats


def original_state_dict(cin, channels, n, ksize, sk, use_conv):
    """Random tensors in the original key layout for the general `Adapter(ksize, sk, use_conv)`."""
    g = torch.Generator().manual_seed(3)
    sd = {"conv_in.weight": torch.randn(channels[0], cin, 3, 3, generator=g) * 0.05, "conv_in.bias": torch.randn(channels[0], generator=g) * 0.05}
    def conv(name, o, i, k):
        sd[name + ".weight"] = torch.randn(o, i, k, k, generator=g) * 0.05
        sd[name + ".bias"] = torch.randn(o, generator=g) * 0.05
    for i in range(4):
        for j in range(n):
            in_c = channels[i - 1] if (i and not j) else channels[i]
            out_c = channels[i]
            b = f"body.{i * n + j}"
            if in_c != out_c or not sk:
                conv(b + ".in_conv", out_c, in_c, ksize)
            conv(b + ".block1", out_c, out_c, 3)
            conv(b + ".block2", out_c, out_c, ksize)
            if not sk:
                conv(b + ".skep", out_c, out_c, ksize)  # the original SD branch: skep acts on in_conv's output
            if i and not j and use_conv:
                conv(b + ".down_opt.op", in_c, in_c, 3)
    return sd


@pytest.mark.parametrize("ksize, sk, use_conv, channels", [
    (3, True, False, TINY), (1, True, True, TINY), (3, True, True, TINY), (3, False, True, (16, 16, 16, 16)),
    (1, False, False, (16, 16, 16, 16)),
])
def test_original_general_options(tmp_path, ksize, sk, use_conv, channels):
    sd = original_state_dict(64, channels, 2, ksize, sk, use_conv)
    torch.save(sd, tmp_path / "general.pth")
    ours = load_adapter(tmp_path / "general.pth")
    assert (ours.config.ksize, ours.config.skip_conv, ours.config.conv_downsample) == (ksize, not sk, use_conv)
    x = torch.rand(1, 1, 128, 128)
    with torch.no_grad():
        assert feats_equal(ours(x), original_reference(sd, x, 2, ksize, sk, use_conv, (False, True, True, True)))


def test_original_default_adapter_layout(tmp_path):
    """The original's default `Adapter()` (ksize=3, sk=False, use_conv=True, nums_rb=3) with changing channels."""
    sd = original_state_dict(64, TINY, 3, 3, False, True)
    torch.save(sd, tmp_path / "default.pth")
    ours = load_adapter(tmp_path / "default.pth")
    cfg = ours.config
    assert (cfg.channels, cfg.num_res_blocks, cfg.ksize, cfg.skip_conv, cfg.conv_downsample) == (TINY, 3, 3, True, True)
    x = torch.rand(1, 1, 128, 192)
    with torch.no_grad():
        assert feats_equal(ours(x), original_reference(sd, x, 3, 3, False, True, (False, True, True, True)))


def all_kinds():
    return [
        build_adapter(FullAdapterConfig.sd(1, channels=TINY)),
        build_adapter(FullAdapterConfig.sdxl(3, channels=TINY)),
        build_adapter(LightAdapterConfig(channels=TINY, num_res_blocks=2)).half(),
        build_adapter(FullAdapterConfig.sd(1, channels=(16,) * 4, ksize=3, skip_conv=True, conv_downsample=True)),
        build_adapter(StyleAdapterConfig(width=32, context_dim=16, num_heads=8, num_layers=1, num_tokens=2)),  # original files carry no head count: 8 as released
        build_adapter(FuserConfig(unet_channels=TINY, width=32, num_heads=8, num_layers=1)),
    ]


def assert_bitwise(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("module", all_kinds(), ids=lambda m: f"{m.kind}-{m.dtype}")
def test_round_trips_through_every_format_are_bitwise(tmp_path, module):
    module.save_file(tmp_path / "single.safetensors")
    assert_bitwise(module, back := load_adapter(tmp_path / "single.safetensors"))
    assert back.config == module.config
    module.save_pretrained(tmp_path / "folder") if module.kind != "full" or module.config.ksize == 1 else None
    if (tmp_path / "folder").exists():
        assert_bitwise(module, load_adapter(tmp_path / "folder"))
    for name in ("orig.pth", "orig.safetensors"):
        convert(tmp_path / "single.safetensors", tmp_path / name, "original")
        back = load_adapter(tmp_path / name)
        assert_bitwise(module, back)
        assert back.config == module.config
    # original → diffusers/ours → single → compare again: a chain through every writer
    convert(tmp_path / "orig.pth", tmp_path / "chain.safetensors", "single")
    assert_bitwise(module, load_adapter(tmp_path / "chain.safetensors"))


def test_diffusers_loads_what_we_save(tmp_path):
    for module in all_kinds()[:3]:
        module = module.float()
        out = tmp_path / module.kind
        module.save_pretrained(out)
        theirs = T2IAdapter.from_pretrained(out)
        x = torch.rand(1, module.config.in_channels, 128, 64)
        with torch.no_grad():
            assert feats_equal(module(x), theirs(x))


def test_diffusers_cannot_express_general_options(tmp_path):
    module = all_kinds()[3]
    with pytest.raises(ConfigError, match="released layout"):
        module.save_pretrained(tmp_path / "x")
    with pytest.raises(ConfigError, match="diffusers has no style"):
        convert_style = all_kinds()[4]
        convert_style.save_file(tmp_path / "s.safetensors")
        convert(tmp_path / "s.safetensors", tmp_path / "s_dir", "diffusers")


def test_detects_sd1_vs_sdxl_and_channels():
    cases = {
        (1, 8): FullAdapterConfig.sd(1, channels=TINY),
        (3, 8): FullAdapterConfig.sd(3, channels=TINY),
        (1, 16): FullAdapterConfig.sdxl(1, channels=TINY),
        (3, 16): FullAdapterConfig.sdxl(3, channels=TINY),
    }
    for (cin, factor), cfg in cases.items():
        with torch.device("meta"):
            sd = build_adapter(cfg).state_dict()
        for layout in (sd, ours_to_diffusers(sd, cfg)):
            got = detect_config(layout)
            assert (got.in_channels, got.downscale_factor, got.kind) == (cin, factor, cfg.kind)
            assert got == cfg


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    payload = {"conv_in.weight": torch.zeros(1), "x": Evil(str(marker))}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_adapter(path)
    assert not marker.exists()
    # and the CLI: one line, exit 2, no traceback, nothing ran
    proc = subprocess.run([sys.executable, "-m", "t2iadapter.cli", "convert", str(path), str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "refused" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()


def test_corrupt_and_wrong_files_give_clear_errors(tmp_path):
    good = build_adapter(FullAdapterConfig.sd(1, channels=TINY))
    good.save_file(tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_adapter(tmp_path / "trunc.safetensors")
    torch.save(good.state_dict(), tmp_path / "good.pth")
    pth = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(pth[: len(pth) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_adapter(tmp_path / "trunc.pth")
    (tmp_path / "noise.pth").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError):
        load_adapter(tmp_path / "noise.pth")
    # a state dict of something else (a small conv net)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 4))
    save_file(net.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="does not look like a T2I-Adapter"):
        load_adapter(tmp_path / "other.safetensors")
    # wrong key sets
    sd = dict(good.state_dict())
    sd.pop("body.3.block2.bias")
    save_file(sd, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1"):
        load_adapter(tmp_path / "missing.safetensors")
    sd = dict(good.state_dict(), **{"body.3.extra.weight": torch.zeros(2)})
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected 1"):
        load_adapter(tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_adapter(tmp_path / "nope.pth")
    (tmp_path / "w.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        load_adapter(tmp_path / "w.txt")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_adapter(tmp_path / "emptydir")
    with pytest.raises(CheckpointError, match="hub"):
        load_adapter("someone/not-a-real-adapter")  # offline in tests



def test_a_file_that_is_no_adapter_is_named_in_its_error(tmp_path):
    """With several --adapter files the one line must say which file is not an adapter (it named none)."""
    files = {"other.safetensors": {"foo": torch.zeros(2)},  # no adapter keys at all
             "width.safetensors": {"conv_in.weight": torch.zeros(4, 4, 3, 3)},  # a UNet's conv_in: input width 4
             "stages.safetensors": {"conv_in.weight": torch.zeros(4, 64, 3, 3), "body.0.block1.weight": torch.zeros(2)}}
    for name, sd in files.items():
        save_file(sd, str(tmp_path / name))
        with pytest.raises(CheckpointError) as raised:
            load_adapter(tmp_path / name)
        assert str(raised.value).startswith(f"{tmp_path / name}: "), raised.value

def test_writers_never_overwrite_silently(tmp_path):
    m = build_adapter(FullAdapterConfig.sd(1, channels=TINY))
    m.save_file(tmp_path / "a.safetensors")
    before = (tmp_path / "a.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        m.save_file(tmp_path / "a.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == before
    m.save_pretrained(tmp_path / "d")
    with pytest.raises(CheckpointError, match="not empty"):
        m.save_pretrained(tmp_path / "d")
    assert cli(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors")]) == 2
    assert cli(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"), "--force"]) == 0



@pytest.mark.parametrize("name", ["x.safetensors", "x.pth"])
def test_a_file_format_never_replaces_a_folder(tmp_path, capsys, name):
    """A folder at a single-file target, even with --force: one line naming it, not os.replace's temp-file error."""
    (tmp_path / name / "kept").mkdir(parents=True)
    for force in ([], ["--force"]):
        assert cli(["convert", "demo/sketch", str(tmp_path / name), *force]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{tmp_path / name} is a folder" in err[0] and ".tmp" not in err[0], err
    assert (tmp_path / name / "kept").is_dir() and [p.name for p in tmp_path.iterdir()] == [name]


def test_a_light_adapter_diffusers_cannot_hold_says_which_format_can(tmp_path, capsys):
    """The demo colour adapter's last two channel counts differ: diffusers' light layout cannot hold it, so say what can."""
    assert cli(["convert", "demo/color", str(tmp_path / "color")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "repeats its last channel count" in err[0] and "--to single" in err[0], err
    assert not (tmp_path / "color").exists()

def test_cli_convert_round_trip(tmp_path, capsys):
    m = build_adapter(LightAdapterConfig(channels=TINY, num_res_blocks=2))
    m.save_file(tmp_path / "c.safetensors")
    assert cli(["convert", str(tmp_path / "c.safetensors"), str(tmp_path / "diff")]) == 0
    assert "light adapter" in capsys.readouterr().out
    assert json.loads((tmp_path / "diff" / "config.json").read_text())["adapter_type"] == "light_adapter"
    assert cli(["convert", str(tmp_path / "diff"), str(tmp_path / "orig.pth")]) == 0
    assert cli(["convert", str(tmp_path / "orig.pth"), str(tmp_path / "back.safetensors"), "--to", "single"]) == 0
    assert_bitwise(m, load_adapter(tmp_path / "back.safetensors"))
    assert cli(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "x.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    # the suffix's case names no other format: Sketch.SAFETENSORS is a single file (it became a diffusers folder)
    assert cli(["convert", str(tmp_path / "orig.pth"), str(tmp_path / "Sketch.SAFETENSORS")]) == 0
    assert (tmp_path / "Sketch.SAFETENSORS").is_file()
    assert_bitwise(m, load_adapter(tmp_path / "Sketch.SAFETENSORS"))
    (tmp_path / "orig.pth").rename(tmp_path / "ORIG.PTH")
    assert_bitwise(m, load_adapter(tmp_path / "ORIG.PTH"))


def test_written_files_get_normal_permissions(tmp_path):
    import os
    import stat

    m = build_adapter(FullAdapterConfig.sd(1, channels=TINY))
    path = m.save_file(tmp_path / "p.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def _crafted(tmp_path, module, **changes):
    """`module`'s single file with its stored config edited (the tensors untouched)."""
    path = module.save_file(tmp_path / "crafted.safetensors", overwrite=True)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta["t2iadapter_config"] = json.dumps({**json.loads(meta["t2iadapter_config"]), **changes})
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("kind, changes, message", [
    ("full", {"num_res_blocks": 1_000_000_000}, "num_res_blocks must be an integer between 1 and 64"),
    ("full", {"channels": [1_000_000_000, 16, 32, 32]}, "channels must be a list"),
    ("full", {"channels": 5}, "channels must be a list"),
    ("full", {"num_res_blocks": "1e9"}, "num_res_blocks must be an integer"),
    ("full", {"downsample": "yes"}, "downsample must have one entry per stage"),
    ("full", {"num_res_blocks": 3}, "describes 12 residual blocks, its tensors hold 8"),
    ("light", {"num_res_blocks": 1_000_000_000}, "num_res_blocks must be an integer"),
    ("light", {"num_res_blocks": 7}, "describes 7 blocks in stage 0, its tensors hold 2"),
    ("style", {"num_layers": 1_000_000_000}, "num_layers must be an integer"),
    ("style", {"num_layers": 40}, "describes 40 transformer layers, its tensors hold 1"),
    ("fuser", {"num_layers": 10**12}, "num_layers must be an integer"),
    ("fuser", {"num_tasks": 2**40}, "num_tasks must be an integer"),
    ("full", {"kind": ["full"]}, "unknown adapter kind"),  # unhashable: a TypeError traceback
    ("full", {"ksize": True}, "ksize must be 1 or 3"),  # True == 1: accepted, written back as true
    ("light", {"pool_ceil_mode": "no"}, "pool_ceil_mode is a boolean"),  # failed at the first forward
])
def test_crafted_stored_config_is_refused_at_once(tmp_path, capsys, kind, changes, message):
    """A file whose stored config is absurd or disagrees with its tensors: one clear line, within a second (issue 14.6)."""
    import time

    module = {m.kind: m for m in all_kinds()}[kind]
    path = _crafted(tmp_path, module, **changes)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        load_adapter(path)
    assert cli(["info", str(path)]) == 2
    assert time.perf_counter() - start < 1.0
    err = capsys.readouterr().err.strip()
    assert message.split()[0] in err and len(err.splitlines()) == 1


def test_crafted_diffusers_config_is_refused_at_once(tmp_path):
    import time

    folder = tmp_path / "d"
    diffusers_random("full_adapter", 3, TINY).save_pretrained(folder)
    for changes, message in (({"num_res_blocks": 1_000_000_000}, "num_res_blocks must be an integer"),
                             ({"channels": 10**9}, "channels must be a list"),
                             ({"downscale_factor": "x"}, "downscale_factor must be an integer"),
                             ({"num_res_blocks": 4}, "describes 16 residual blocks, its tensors hold 8")):
        data = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**data, **changes}))
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match=message):
            load_adapter(folder)
        assert time.perf_counter() - start < 1.0
        (folder / "config.json").write_text(json.dumps(data))


def test_original_format_refuses_what_its_tensors_cannot_carry(tmp_path):
    """A style adapter with 4 heads went out as .pth and came back with 8 (the original format has no config): its
    outputs changed, silently. Ours and a standard adapter still round-trip."""
    from t2iadapter.errors import ConfigError
    from t2iadapter.models import StyleAdapterConfig, build_adapter

    style = build_adapter(StyleAdapterConfig(width=32, context_dim=16, num_heads=4, num_layers=1, num_tokens=2))
    style.save_file(tmp_path / "style.safetensors")
    with pytest.raises(ConfigError, match=r"num_heads 4 \(read back as 8\).*--to single"):
        convert(tmp_path / "style.safetensors", tmp_path / "style.pth")
    assert not (tmp_path / "style.pth").exists()
    eight = build_adapter(StyleAdapterConfig(width=32, context_dim=16, num_heads=8, num_layers=1, num_tokens=2))
    eight.save_file(tmp_path / "eight.safetensors")
    convert(tmp_path / "eight.safetensors", tmp_path / "eight.pth")
    assert load_adapter(tmp_path / "eight.pth").config == eight.config


def test_malformed_tensor_files_are_one_line(tmp_path, capsys):
    """Files a loader can meet that are no adapter: each was a traceback (IndexError, KeyError, RuntimeError,
    AttributeError, RecursionError) or, for complex weights, accepted."""
    full = build_adapter(FullAdapterConfig.sd(1, channels=TINY))
    sd = {k: v.clone() for k, v in full.state_dict().items()}
    cases = {
        "int.safetensors": ({k: v.to(torch.int32) for k, v in sd.items()}, None, "floating point"),
        "conv_in_1d.safetensors": ({**sd, "conv_in.weight": sd["conv_in.weight"].flatten()}, None, "malformed"),
        "no_block.safetensors": ({"conv_in.weight": sd["conv_in.weight"]}, None, "malformed"),
        "deep.safetensors": (sd, {"t2iadapter_config": "[" * 100_000}, "config stored in this file is invalid"),
        "int_key.pth": ({1: sd["conv_in.weight"]}, None, "keys are names"),
        "complex.pth": ({k: v.to(torch.complex64) for k, v in sd.items()}, None, "floating point"),
    }
    for name, (tensors, meta, message) in cases.items():
        path = tmp_path / name
        if name.endswith(".pth"):
            torch.save(tensors, path)
        else:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
        with pytest.raises(CheckpointError, match=message):
            load_adapter(path)
        assert cli(["info", str(path)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (name, err)
    (tmp_path / "deep").mkdir()  # a folder's config.json nested past the recursion limit
    (tmp_path / "deep" / "config.json").write_text("[" * 100_000)
    assert cli(["info", str(tmp_path / "deep")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid JSON" in err[0], err
