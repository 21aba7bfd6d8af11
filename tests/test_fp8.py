"""fp8 fast mode (issue 18): refused where it cannot run; on a GPU-capable path, which layers convert, nothing handed in
changes, and the image stays within fp8 rounding of bf16. The CPU stands in for the GPU: the capability check is
mocked and torchao's own hardware check bypassed (its float8 matmul runs on the CPU too)."""
import pytest
import torch
import torchao.quantization.quant_api as quant_api

from t2iadapter import unet_hook
from t2iadapter.bases import load_base
from t2iadapter.errors import ConfigError
from t2iadapter.generation import fast, fp8
from t2iadapter.pipeline import AdapterPipeline
from tiny_models import PROMPT, condition, random_adapter



@pytest.fixture
def gpu_like(monkeypatch):
    """An Hopper-class capability for our check; torchao's own check (CUDA only) bypassed."""
    monkeypatch.setattr(fp8, "device_capability", lambda device: (9, 0))
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)


def test_refused_on_the_cpu_with_one_line():
    pipe = AdapterPipeline(load_base("tiny"))
    with pytest.raises(ConfigError, match="compute capability 8.9") as err:
        pipe.optimize(precision="fp8")
    assert "\n" not in str(err.value) and "cpu" in str(err.value)
    assert not pipe.fast and pipe.dtype == torch.float32  # refused before anything changed


def test_refused_on_gpus_older_than_ada(monkeypatch):
    monkeypatch.setattr(fp8, "device_capability", lambda device: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"A100-SXM4-80GB has 8\.0"):
        fp8.check_supported("cuda")
    monkeypatch.setattr(fp8, "device_capability", lambda device: (8, 9))
    fp8.check_supported("cuda")  # Ada: fine


def test_precision_options_are_checked():
    dev = torch.device("cpu")
    assert fast.resolve_precision(None, None, dev) == ("fp32", torch.float32)
    assert fast.resolve_precision("bf16", torch.bfloat16, dev) == ("bf16", torch.bfloat16)
    for precision, dtype, message in [("fp9", None, "unknown precision"), ("bf16", torch.float16, "contradicts")]:
        with pytest.raises(ConfigError, match=message):
            fast.resolve_precision(precision, dtype, dev)


def test_transformer_linears_are_the_attention_and_feed_forward_layers():
    xl = load_base("tiny-xl").unet
    names = unet_hook.transformer_linears(xl)
    assert any(n.endswith(".proj_in") for n in names) and any(n.endswith(".ff.net.2") for n in names)  # SDXL: linear
    assert not any(n.startswith(("time_embedding", "add_embedding")) or "time_emb_proj" in n for n in names)
    unet_hook.use_sdpa(xl, fused_qkv=True)
    fused = unet_hook.transformer_linears(xl)
    assert any(n.endswith("attn1.to_qkv") for n in fused) and any(n.endswith("attn2.to_kv") for n in fused)
    assert any(n.endswith("attn2.to_q") for n in fused)  # cross-attention keeps its own query projection
    assert not any(n.endswith(("attn1.to_q", "attn1.to_k", "attn2.to_v")) for n in fused)  # replaced by the fused ones


def test_fp8_converts_the_transformer_matmuls_and_leaves_what_was_handed_in(gpu_like):
    base, reference = load_base("tiny"), load_base("tiny")  # the same seeded weights twice
    adapter = random_adapter(base, 3, 1)
    cond = condition(64, "RGB", 2)
    pipe = AdapterPipeline(base, [adapter], dtype=torch.bfloat16)
    handed_in = base.unet
    before = {name: (p, p.detach().clone()) for name, p in handed_in.named_parameters()}
    pipe.optimize(precision="fp8", compile=False)
    bf16 = AdapterPipeline(reference, [adapter]).optimize(precision="bf16", compile=False)

    unet = pipe.base.unet
    assert unet is not handed_in and pipe.dtype == torch.bfloat16 and fast.status(pipe)["settings"]["precision"] == "fp8"
    converted = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and fp8.is_fp8(m.weight)}
    assert converted == set(unet_hook.transformer_linears(unet)) and len(converted) > 50
    assert not fp8.is_fp8(unet.time_embedding.linear_1.weight)
    # the UNet handed in: every parameter the same object with the same values, none in float8
    for name, p in handed_in.named_parameters():
        if name in before:
            obj, value = before[name]
            assert p is obj and torch.equal(p.detach().float(), value.float()), name
        assert not fp8.is_fp8(p), name
    # one UNet step and the whole image: fp8 rounding of bf16 (e4m3: 3 mantissa bits), no more
    got = pipe(PROMPT, [cond], steps=3, seed=0, size=(64, 64), output_type="pt", progress=False).images[0].float()
    want = bf16(PROMPT, [cond], steps=3, seed=0, size=(64, 64), output_type="pt", progress=False).images[0].float()
    rel = float((got - want).norm() / want.norm())
    assert torch.isfinite(got).all() and 0 < rel < 0.05, rel
    with pytest.raises(ConfigError, match="load the base again"):
        pipe.optimize(precision="bf16", compile=False)
    pipe.optimize(precision="fp8", compile=False)  # the same precision again: kept as it is
    assert pipe.base.unet is unet


def test_quantize_unet_wants_bf16(gpu_like):
    with pytest.raises(ConfigError, match="bf16 UNet"):
        fp8.quantize_unet(load_base("tiny").unet)
