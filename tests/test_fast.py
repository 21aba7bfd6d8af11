"""Fast mode (issue 7) on the CPU: same images as eager, one compiled graph per size, eager fallback, benchmark smoke."""
import logging

import numpy as np
import pytest
import torch
import torch._dynamo.testing
from PIL import Image

from t2iadapter import unet_hook
from t2iadapter.generation import conditions, fast
from t2iadapter.bases import load_base, tiny_adapter_config
from t2iadapter.models import build_adapter
from t2iadapter.pipeline import AdapterPipeline, prepare_condition
from script_modules import load_script
from tiny_models import PROMPT



@pytest.fixture(autouse=True)
def _fresh_dynamo_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and steadiest on a shared machine
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def adapter(base, ch, seed):
    torch.manual_seed(seed)
    m = build_adapter(tiny_adapter_config(base, ch))
    with torch.no_grad():  # larger than default init, so the adapters visibly act
        for p in m.parameters():
            p.mul_(3.0)
    return m


def img(size, mode, seed):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def gen(pipe, conds, **kw):
    kw.setdefault("steps", 3)
    kw.setdefault("seed", 0)
    return pipe(PROMPT, conds, size=(64, 64), output_type="np", progress=False, **kw).images[0]


CALLS = [  # (weights, windows): the second and third change both, the third leaves steps with no adapter at all
    ([1.0, 0.5], None),
    ([0.3, 1.2], ["0:0.5", "0.5:1"]),
    ([0.8, 0.8], ["0:0.34", "0.67:1"]),
]


@pytest.mark.parametrize("arch", ["tiny", "tiny-xl"])
def test_feature_shapes_match_adapter_outputs(arch):
    base = load_base(arch)
    side = 128
    feats = adapter(base, 3, 0)(torch.rand(1, 3, side, side))
    latent = side // base.vae_scale_factor
    assert unet_hook.feature_shapes(base.unet, (latent, latent)) == [tuple(f.shape[1:]) for f in feats]
    zeros = unet_hook.no_features(base.unet, 2, (latent, latent), dtype=torch.float32, device="cpu")
    assert [z.shape[0] for z in zeros] == [2] * len(feats) and all(z.abs().sum() == 0 for z in zeros)


def test_fast_condition_equals_prepare_condition():
    for cond, ch, size, canvas in [(img((50, 30), "L", 0), 1, (72, 40), (128, 64)), (img((64, 64), "RGB", 1), 3, (64, 64), (64, 64)),
                                   (img((40, 40), "RGB", 2).convert("RGBA"), 3, (64, 48), (64, 64)), (img((64, 64), "RGB", 3), 1, (64, 64), (64, 64))]:
        want = prepare_condition(cond, ch, size, canvas)
        got = conditions.bytes_to_condition(conditions.condition_bytes(cond, ch, size), canvas, torch.device("cpu"), torch.float32)
        assert got.shape == want.shape and torch.equal(got, want)
    assert conditions.condition_bytes(torch.rand(3, 8, 8), 3, (8, 8)) is None  # tensors take the eager route


def test_fast_loop_equals_eager_for_every_scheduler_kind():
    """Host-side scheduler, batched prompts, zero features, device timesteps: same numbers as the eager loop."""
    base = load_base("tiny")
    a, b = adapter(base, 1, 1), adapter(base, 3, 2)
    conds = [img((64, 64), "L", 4), img((64, 64), "RGB", 5)]
    pipe, plain = AdapterPipeline(base, [a, b]), AdapterPipeline(base)
    schedulers = ["euler", "ddim", "dpm++2m"]  # sigma-indexed, alpha-indexed by timestep, multistep with history
    eager = {s: gen(pipe, conds, scheduler=s, weights=[1.0, 0.7], windows=["0:0.34", "0.67:1"], negative_prompt="blurry")
             for s in schedulers}
    eager_plain = gen(plain, [])
    pipe.optimize(compile=False, dtype=torch.float32)
    plain.optimize(compile=False, dtype=torch.float32)
    for s in schedulers:
        out = gen(pipe, conds, scheduler=s, weights=[1.0, 0.7], windows=["0:0.34", "0.67:1"], negative_prompt="blurry")
        assert np.abs(out - eager[s]).max() < 1e-4, s
    assert np.abs(gen(plain, []) - eager_plain).max() < 1e-4


def test_compiled_equals_eager_and_weights_windows_never_recompile():
    base = load_base("tiny")
    a, b = adapter(base, 1, 1), adapter(base, 3, 2)
    conds = [img((64, 64), "L", 6), img((64, 64), "RGB", 7)]
    pipe, plain = AdapterPipeline(base, [a, b]), AdapterPipeline(base)
    eager = [gen(pipe, conds, steps=2, weights=w, windows=win) for w, win in CALLS]
    eager_plain = gen(plain, [], steps=2)

    counter = torch._dynamo.testing.CompileCounter()
    pipe.optimize(dtype=torch.float32, backend=counter)
    plain.optimize(dtype=torch.float32, backend=counter)
    first = gen(pipe, conds, steps=2, weights=CALLS[0][0], windows=CALLS[0][1])
    graphs = counter.frame_count
    assert graphs == 4  # UNet, VAE decoder, two adapters: one graph each, no graph breaks
    for (w, win), want in zip(CALLS[1:], eager[1:]):
        assert np.abs(gen(pipe, conds, steps=2, weights=w, windows=win) - want).max() < 1e-4
    assert np.abs(gen(plain, [], steps=2) - eager_plain).max() < 1e-4  # no adapters: zero features, the same graph
    assert counter.frame_count == graphs, "changing weights/windows/adapters recompiled"
    assert np.abs(first - eager[0]).max() < 1e-4
    assert all(v == "ok" for v in fast.status(pipe)["compiled"].values())


def test_bf16_fast_mode_is_within_half_precision_of_fp32_eager():
    base = load_base("tiny")
    a = adapter(base, 3, 3)
    cond = [img((64, 64), "RGB", 8)]
    pipe = AdapterPipeline(base, [a])
    ref = pipe(PROMPT, cond, steps=3, seed=1, size=(64, 64), output_type="pt", progress=False).images[0]
    pipe.optimize(compile=False, dtype=torch.bfloat16)
    out = pipe(PROMPT, cond, steps=3, seed=1, size=(64, 64), output_type="pt", progress=False).images[0].float()
    assert pipe.dtype == torch.bfloat16
    rel = float((out - ref).norm() / ref.norm())
    assert torch.isfinite(out).all() and rel < 3e-2, rel
    assert 0 < float((out - ref).abs().max()) < 0.15


def test_compile_failure_falls_back_to_eager(caplog):
    def broken(gm, example_inputs):
        raise RuntimeError("compiler exploded")

    base = load_base("tiny")
    module = adapter(base, 3, 4).eval()
    x = torch.rand(1, 3, 64, 64)
    want = module(x)
    settings = fast.FastSettings(dtype=torch.float32, backend=broken)
    wrapper = fast.compile_module(module, "adapter:x", settings, cudagraphs=False)
    with caplog.at_level(logging.WARNING, logger="t2iadapter.generation.fast"):
        for _ in range(2):
            got = module(x)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert "compiler exploded" in wrapper.error
    assert sum("runs eagerly" in r.message for r in caplog.records) == 1
    assert fast.eager_forward(module) == wrapper.eager


def test_inference_benchmark_cpu_mode(tmp_path, monkeypatch):
    import json

    bench = load_script("benchmarks/bench_inference.py", monkeypatch)
    rows = "diffusers,diffusers-plain,ours-eager,ours-eager-plain,ours-fast,ours-fast-plain"
    bench.main(["--device", "cpu", "--no-compile", "--steps", "2", "--repeats", "1", "--rows", rows, "--no-profile",
                "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_inference.json").read_text())
    tiny = data["rows"]["tiny"]
    assert set(tiny) == set(rows.split(","))
    assert tiny["ours-eager"]["max_pixel_diff"] < 0.5 and tiny["ours-fast"]["max_pixel_diff"] < 0.5  # same images (0-255)
    assert tiny["ours-fast"]["adapter_overhead_pct"] is not None and tiny["diffusers"]["ms_step"] > 0
    assert "| tiny | ours-fast |" in (tmp_path / "bench_inference.md").read_text()


def test_optimizing_again_with_other_settings_says_what_changed(caplog):
    # a second optimize() with another precision re-prepares (and, compiling, recompiles) the shared base: one
    # warning naming what changed; the same settings again are a no-op without a word
    pipe = AdapterPipeline(load_base("tiny"))
    pipe.optimize(compile=False, dtype=torch.float32)

    def ours():
        return [r for r in caplog.records if r.name == "t2iadapter.generation.fast"]

    with caplog.at_level(logging.INFO, logger="t2iadapter.generation.fast"):
        pipe.optimize(compile=False, dtype=torch.float32)
        assert not ours()
        pipe.optimize(compile=False, dtype=torch.bfloat16)
    assert [r.levelno for r in ours()] == [logging.WARNING]
    text = ours()[0].getMessage()
    assert "dtype torch.float32 → torch.bfloat16" in text and "precision fp32 → bf16" in text, text
    assert pipe.dtype == torch.bfloat16


def test_optimize_without_compile_after_compiling_runs_eagerly_again():
    """optimize(compile=False) after optimize() left the compiled forwards on (and a new size compiled again); the
    modules' own forwards are back, for the UNet, the VAE decoder and the adapters, and so is the eager image."""
    from t2iadapter.generation.aot import AotUnet

    base = load_base("tiny")
    a = adapter(base, 3, 5)
    cond = [img((64, 64), "RGB", 9)]
    pipe = AdapterPipeline(base, [a])
    a = next(iter(pipe.adapters.values()))  # the pipeline's (it does not change modules handed in)
    modules = [base.unet, base.vae.decoder, a]
    pipe.optimize(compile=False, dtype=torch.float32)
    eager = gen(pipe, cond, steps=2)
    counter = torch._dynamo.testing.CompileCounter()
    pipe.optimize(dtype=torch.float32, backend=counter)
    gen(pipe, cond, steps=2)
    assert counter.frame_count == 3 and all(isinstance(m.forward, fast.CompiledForward) for m in modules)
    pipe.optimize(compile=False, dtype=torch.float32)
    assert all("forward" not in vars(m) for m in modules) and fast.status(pipe)["compiled"] == {}
    assert np.array_equal(gen(pipe, cond, steps=2), eager)
    pipe(PROMPT, cond, steps=1, size=(96, 96), output_type="latent", progress=False)
    assert counter.frame_count == 3, "the uncompiled pipeline compiled a new size"
    pipe.optimize(dtype=torch.float32, backend=counter)  # compiled again, then AOTInductor: decoder and adapter eager
    pipe.optimize(dtype=torch.float32, aot=True, cache_dir=False)
    assert isinstance(base.unet.forward, AotUnet) and "forward" not in vars(base.vae.decoder) and "forward" not in vars(a)
    pipe.optimize(compile=False, dtype=torch.float32)
    assert all("forward" not in vars(m) for m in modules)
