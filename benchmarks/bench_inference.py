"""Inference speed (issue 7): diffusers' adapter pipeline vs ours (eager, fast) vs diffusers' ControlNet pipeline.

Random weights at the real sizes (speed does not depend on weight values; configs as
/work/shared/tools/anchor_bench.py): SD1.5 architecture at 512² (batch 1 and 4) and SDXL at 1024²
(batch 1), 30 Euler steps, classifier-free guidance 7.5, real-size CLIP text encoders and VAE,
3-channel full adapters (diffusers gets the same adapter weights through `ours_to_diffusers`).

rows  diffusers          StableDiffusion(XL)AdapterPipeline, fp16 eager, as a user runs it
      diffusers-plain    the same without adapter (StableDiffusion(XL)Pipeline): its overhead baseline
      ours-eager(-3)     AdapterPipeline fp16 eager, one adapter (three composed); ours-eager-plain: none
      controlnet         StableDiffusion(XL)ControlNetPipeline, fp16 eager (reference; ControlNetModel.from_unet)
      ours-fast(-3)      AdapterPipeline.optimize(): bf16, channels-last, SDPA + fused qkv, torch.compile
                         (reduce-overhead = CUDA graphs), sync-free loop; ours-fast-plain: no adapter
columns  ms/image (median of --repeats after warm-up, wall clock with a device sync), ms/step (device
         events at the end of steps 1..N, so text encoding, adapter and VAE are excluded), adapter
         overhead % (ms/image vs the same mode's plain row), speed-up vs diffusers, peak memory, max/mean
         pixel difference (0-255) vs diffusers with the same seed, MFU = UNet FLOPs per step
         (FlopCounterMode, CFG batch) / ms/step / the card's measured bf16 matmul rate (8192³),
         first-call seconds and compile ≈ first call − median, host syncs inside the loop (fast rows).

GPU:  python benchmarks/bench_inference.py [--only sd15,sdxl,sd15x4] [--repeats 3] [--budget-s 480]
CPU:  python benchmarks/bench_inference.py --device cpu      (tiny base, regressions only)
Writes $OUT/bench_inference.json, $OUT/bench_inference.md and $OUT/bench_inference_profiles.txt
(OUT defaults to ./out) after every row, and prints the markdown table last. Any compile failure
falls back to eager (logged, and the row says so) rather than stopping the run.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

log = logging.getLogger("bench_inference")

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)  # fmt: skip
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
)  # fmt: skip  (force_upcast stays at diffusers' default True, as the released SD1.5/SDXL VAE configs load)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768, vocab_size=49408, max_position_embeddings=77)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280, vocab_size=49408, max_position_embeddings=77)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")  # SDXL's Euler config


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration."""

    name: str
    arch: str  # sd15 | sdxl | tiny | tiny-xl
    size: int
    batch: int
    guess_s: float  # seconds the whole case takes on an H100 (estimate), for the time budget


GPU_CASES = {
    "sd15": Case("sd15", "sd15", 512, 1, 150),
    "sdxl": Case("sdxl", "sdxl", 1024, 1, 230),
    "sd15x4": Case("sd15x4", "sd15", 512, 4, 130),
}
CPU_CASES = {
    "tiny": Case("tiny", "tiny", 64, 1, 60),
    "tiny-xl": Case("tiny-xl", "tiny-xl", 128, 1, 60),
}
COMPILE_SHARE = 0.6  # part of a case's time that is the fast rows' compilation (guess)
PROMPT = "a large red star left of a small blue circle above a green tree"
GUIDANCE = 7.5


# ---------------------------------------------------------------------------------------------- timing helpers


class Clock:
    """Marks the end of each denoising step (device events on GPU, host time on CPU); any callback signature."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[Any] = []
        self.on_mark: Callable[[int], None] | None = None

    def mark(self) -> None:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())
        if self.on_mark is not None:
            self.on_mark(len(self.marks) - 1)

    def legacy(self, step, t, latents) -> None:  # diffusers' `callback(step, t, latents)` and ours
        self.mark()

    def on_step_end(self, pipe, step, t, kwargs) -> dict:  # diffusers' `callback_on_step_end`
        self.mark()
        return kwargs

    def ms_per_step(self) -> float:
        if len(self.marks) < 2:
            return float("nan")
        if self.device.type == "cuda":
            return self.marks[0].elapsed_time(self.marks[-1]) / (len(self.marks) - 1)
        return (self.marks[-1] - self.marks[0]) * 1e3 / (len(self.marks) - 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device) -> tuple[float, str]:
    """Measured dense matmul rate in FLOP/s: bf16 8192³ on GPU, fp32 1024³ on CPU (median of repeats)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    g = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
    times = []
    for i in range(13):
        sync(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            e.synchronize()
            dt = s.elapsed_time(e) / 1e3
        else:
            a @ b
            dt = time.perf_counter() - t0
        if i >= 3:
            times.append(dt)
    del a, b
    return 2 * n**3 / statistics.median(times), f"{str(dtype).replace('torch.', '')} {n}^3"


# ---------------------------------------------------------------------------------------------- models


def build_base(arch: str, device: torch.device, dtype: torch.dtype):
    """Real-size random SD1.5/SDXL components (or the tiny presets) as a t2iadapter BaseModel."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from t2iadapter.bases import TINY_WORDS, BaseModel, load_base
    from t2iadapter.tokenizer import build_clip_tokenizer

    if arch in ("tiny", "tiny-xl"):
        base = load_base(arch)
        base.scheduler = EulerDiscreteScheduler(**SCHEDULER)
        return base.to(device=device, dtype=dtype)
    sdxl = arch == "sdxl"
    tok = build_clip_tokenizer(TINY_WORDS)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(SDXL_UNET if sdxl else SD15_UNET))
        vae = AutoencoderKL(**VAE, sample_size=1024 if sdxl else 512, scaling_factor=0.13025 if sdxl else 0.18215)
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG, **ids)) if sdxl else None
    base = BaseModel(unet=unet, vae=vae, text_encoder=te, tokenizer=tok, scheduler=EulerDiscreteScheduler(**SCHEDULER),
                     text_encoder_2=te2, tokenizer_2=build_clip_tokenizer(TINY_WORDS) if sdxl else None, source=arch)
    return base.to(dtype=dtype).freeze()


def build_adapters(base, device: torch.device, dtype: torch.dtype, n: int = 3):
    """n random full adapters fitting the base (ours), and the first one as a diffusers T2IAdapter."""
    from diffusers import T2IAdapter

    from t2iadapter.bases import tiny_adapter_config
    from t2iadapter.formats import ours_to_diffusers
    from t2iadapter.models import FullAdapterConfig, build_adapter

    if base.source in ("tiny", "tiny-xl"):
        cfg = tiny_adapter_config(base, 3)
    else:
        cfg = FullAdapterConfig.sdxl(3) if base.is_sdxl else FullAdapterConfig.sd(3)
    ours = []
    for i in range(n):
        torch.manual_seed(100 + i)
        with torch.device(device):
            ours.append(build_adapter(cfg).eval().to(dtype))
    ref = T2IAdapter(in_channels=cfg.in_channels, channels=list(cfg.channels), num_res_blocks=cfg.num_res_blocks,
                     downscale_factor=cfg.downscale_factor, adapter_type="full_adapter_xl" if cfg.kind == "full_xl" else "full_adapter")
    ref.load_state_dict(ours_to_diffusers({k: v.float().cpu() for k, v in ours[0].state_dict().items()}, cfg))
    return ours, ref.to(device=device, dtype=dtype).eval()


def conditions(size: int, n: int = 3):
    from PIL import Image

    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB") for _ in range(n)]


def diffusers_pipeline(kind: str, base, adapter=None, controlnet=None):
    import diffusers as d

    common = dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet, scheduler=base.scheduler)
    if base.is_sdxl:
        common.update(text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2)
        if kind == "adapter":
            pipe = d.StableDiffusionXLAdapterPipeline(**common, adapter=adapter)
        elif kind == "controlnet":
            pipe = d.StableDiffusionXLControlNetPipeline(**common, controlnet=controlnet, add_watermarker=False)
        else:
            pipe = d.StableDiffusionXLPipeline(**common, add_watermarker=False)
    else:
        common.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if kind == "adapter":
            pipe = d.StableDiffusionAdapterPipeline(**common, adapter=adapter)
        elif kind == "controlnet":
            pipe = d.StableDiffusionControlNetPipeline(**common, controlnet=controlnet)
        else:
            pipe = d.StableDiffusionPipeline(**common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_call(pipe, case: Case, steps: int, cond, seed: int, clock: Clock) -> np.ndarray:
    kw = dict(prompt=PROMPT, num_inference_steps=steps, height=case.size, width=case.size, guidance_scale=GUIDANCE,
              num_images_per_prompt=case.batch, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    if cond is not None:
        kw["image"] = cond
    params = inspect.signature(pipe.__call__).parameters
    if "callback_on_step_end" in params:
        kw["callback_on_step_end"] = clock.on_step_end
    else:
        kw.update(callback=clock.legacy, callback_steps=1)
    return np.asarray(pipe(**kw).images)


def ours_call(pipe, case: Case, steps: int, conds, seed: int, clock: Clock) -> np.ndarray:
    out = pipe(PROMPT, conds, steps=steps, guidance_scale=GUIDANCE, size=(case.size, case.size), seed=seed,
               num_images=case.batch, callback=clock.legacy, output_type="np", progress=False)
    return np.stack(out.images)


# ---------------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    name: str
    run: Callable[[Clock], np.ndarray]
    baseline: str | None = None  # plain row of the same mode (adapter overhead)
    pixel_ref: str | None = None  # row whose image this one should reproduce
    fast: bool = False
    result: dict[str, Any] = field(default_factory=dict)
    first_s: float = float("nan")
    times: list[float] = field(default_factory=list)
    steps_ms: list[float] = field(default_factory=list)
    peak: int = 0
    image: np.ndarray | None = None


def time_group(rows: list[Row], device: torch.device, warmup: int, repeats: int, log_line) -> None:
    """Warm every row up, then time them interleaved (drift hits all rows alike)."""
    for row in rows:
        for w in range(warmup):
            clock = Clock(device)
            sync(device)
            t0 = time.perf_counter()
            row.image = row.run(clock)
            sync(device)
            if w == 0:
                row.first_s = time.perf_counter() - t0
        log_line(f"  {row.name}: warm-up done (first call {row.first_s:.2f} s)")
    for _ in range(repeats):
        for row in rows:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            clock = Clock(device)
            sync(device)
            t0 = time.perf_counter()
            row.run(clock)
            sync(device)
            row.times.append(time.perf_counter() - t0)
            row.steps_ms.append(clock.ms_per_step())
            if device.type == "cuda":
                row.peak = max(row.peak, torch.cuda.max_memory_allocated())


def count_loop_syncs(row: Row, device: torch.device, steps: int) -> int | None:
    """Synchronising CUDA calls between the end of step 0 and the end of the last step (sync debug mode)."""
    if device.type != "cuda":
        return None
    clock = Clock(device)

    def on_mark(i: int) -> None:
        if i == 0:
            torch.cuda.set_sync_debug_mode("warn")
        elif i == steps - 1:
            torch.cuda.set_sync_debug_mode("default")

    clock.on_mark = on_mark
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            row.run(clock)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def profile_call(row: Row, device: torch.device) -> str:
    """Top device kernels of one call, and the fraction of the call's wall time the GPU was busy."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        row.run(Clock(device))
        sync(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    busy = sum(getattr(e, key, 0) for e in events if device.type != "cuda" or str(getattr(e, "device_type", "")).endswith("CUDA"))
    lines = [f"{row.name}: wall {wall * 1e3:.1f} ms under the profiler; device busy {busy / 1e3:.1f} ms "
             f"({100 * busy / 1e6 / wall:.0f}% of wall)"]
    try:
        lines.append(events.table(sort_by=key, row_limit=18, max_name_column_width=70))
    except Exception as exc:  # noqa: BLE001 - table formats differ across versions
        lines.append(f"(no table: {exc})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- one case


def unet_reference(base, adapter, case: Case, device: torch.device, dtype: torch.dtype):
    """UNet FLOPs per step (CFG batch, with features) and the eager output on fixed inputs (fast-mode check)."""
    from torch.utils.flop_counter import FlopCounterMode

    from t2iadapter import unet_hook

    g = torch.Generator(device).manual_seed(3)
    lat_side = case.size // base.vae_scale_factor
    b2 = 2 * case.batch
    sample = torch.randn(b2, 4, lat_side, lat_side, generator=g, device=device).to(dtype)
    ctx_dim = base.unet.config.cross_attention_dim
    context = torch.randn(b2, 77, ctx_dim, generator=g, device=device).to(dtype)
    cond = torch.rand(1, 3, case.size, case.size, generator=g, device=device).to(dtype)
    added = None
    if base.is_sdxl:
        pooled = base.text_encoder_2.config.projection_dim
        added = {"text_embeds": torch.randn(b2, pooled, generator=g, device=device).to(dtype),
                 "time_ids": torch.tensor([[case.size, case.size, 0, 0, case.size, case.size]], device=device, dtype=dtype).repeat(b2, 1)}
    t = torch.tensor(500.0, device=device)
    with torch.no_grad():
        feats = [f.repeat(b2, 1, 1, 1) for f in adapter(cond)]
        inputs = dict(sample=sample, t=t, context=context, feats=feats, added=added)
        counter = FlopCounterMode(display=False)
        with counter:
            out = unet_hook.unet_forward(base.unet, sample, t, context, feats, added_cond_kwargs=added)
    return counter.get_total_flops(), inputs, out.float()


def fast_unet_error(base, inputs, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """‖fast UNet − eager UNet‖ / ‖eager UNet‖ on the reference inputs."""
    from t2iadapter import unet_hook

    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    with torch.no_grad():
        if ref.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        added = None if inputs["added"] is None else {k: cast(v) for k, v in inputs["added"].items()}
        feats = [cast(f).contiguous(memory_format=torch.channels_last) for f in inputs["feats"]]  # as the pipeline passes them
        out = unet_hook.unet_forward(base.unet, cast(inputs["sample"]), inputs["t"], cast(inputs["context"]), feats,
                                     added_cond_kwargs=added).float()
    return float((out - ref).norm() / ref.norm())


def run_case(case: Case, args, device: torch.device, peak_rate: float, budget, report) -> dict[str, Any]:
    from diffusers import ControlNetModel

    from t2iadapter.generation import fast as fast_mode
    from t2iadapter.generation.pipeline import AdapterPipeline

    eager_dtype = torch.float16 if device.type == "cuda" else torch.float32
    steps = args.steps
    say = report.say
    t0 = time.perf_counter()
    base = build_base(case.arch, device, eager_dtype)
    adapters, ref_adapter = build_adapters(base, device, eager_dtype)
    conds = conditions(case.size)
    say(f"[{case.name}] built models in {time.perf_counter() - t0:.1f} s")
    try:
        flops, ref_inputs, ref_out = unet_reference(base, adapters[0], case, device, eager_dtype)
    except Exception as exc:  # noqa: BLE001 - no MFU, no UNet check, timings still run
        say(f"  UNet FLOP count failed ({type(exc).__name__}: {exc})")
        flops, ref_inputs, ref_out = float("nan"), None, None
    info: dict[str, Any] = {"case": case.__dict__, "steps": steps, "guidance": GUIDANCE, "unet_flops_per_step": flops,
                            "unet_params_M": sum(p.numel() for p in base.unet.parameters()) / 1e6}
    rows: dict[str, Row] = {}
    seed = 1234

    d_adapter = diffusers_pipeline("adapter", base, adapter=ref_adapter)
    d_plain = diffusers_pipeline("plain", base)
    o1 = AdapterPipeline(base, {"a": adapters[0]})
    o3 = AdapterPipeline(base, {"a": adapters[0], "b": adapters[1], "c": adapters[2]})
    o0 = AdapterPipeline(base)
    rows["diffusers"] = Row("diffusers", lambda c: diffusers_call(d_adapter, case, steps, conds[0], seed, c),
                            baseline="diffusers-plain", pixel_ref="diffusers")
    rows["diffusers-plain"] = Row("diffusers-plain", lambda c: diffusers_call(d_plain, case, steps, None, seed, c),
                                  pixel_ref="diffusers-plain")
    rows["ours-eager"] = Row("ours-eager", lambda c: ours_call(o1, case, steps, conds[:1], seed, c),
                             baseline="ours-eager-plain", pixel_ref="diffusers")
    rows["ours-eager-3"] = Row("ours-eager-3", lambda c: ours_call(o3, case, steps, conds, seed, c), baseline="ours-eager-plain")
    rows["ours-eager-plain"] = Row("ours-eager-plain", lambda c: ours_call(o0, case, steps, [], seed, c), pixel_ref="diffusers-plain")
    groups = [["diffusers", "diffusers-plain"], ["ours-eager", "ours-eager-3", "ours-eager-plain"]]
    wanted = set(args.rows.split(",")) if args.rows else None

    def timed(names: list[str], warmup: int) -> None:
        names = [n for n in names if wanted is None or n in wanted]
        if not names:
            return
        try:
            time_group([rows[n] for n in names], device, warmup, args.repeats, say)
        except Exception as exc:  # noqa: BLE001 - one failing row must not cost the others
            failed(names, exc)
            return
        for n in names:
            finish(rows[n])

    def failed(names: list[str], exc: BaseException) -> None:
        import traceback

        traceback.print_exc()
        say(f"  {', '.join(names)}: FAILED ({type(exc).__name__}: {exc})")
        for n in names:
            report.rows[case.name][n] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"}
        report.write()

    def attempt(what: str, fn: Callable[[], Any], default: Any = None) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - an extra measurement failing leaves the timings standing
            say(f"  {what}: failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
            return default

    def finish(row: Row) -> None:
        ms_img = statistics.median(row.times) * 1e3 / case.batch
        ms_step = statistics.median(row.steps_ms)
        r = row.result
        r.update(ms_image=ms_img, ms_step=ms_step, first_call_s=row.first_s, runs_s=row.times,
                 peak_mem_GiB=row.peak / 2**30 if row.peak else None,
                 mfu=flops / (ms_step / 1e3) / peak_rate if ms_step == ms_step else None)
        r["compile_s"] = max(0.0, row.first_s - statistics.median(row.times)) if row.fast else None
        r["nan_pixels"] = int(np.isnan(row.image).sum()) if row.image is not None else None
        report.rows[case.name][row.name] = r
        fill_relations(case.name, rows, report)
        say(f"  {row.name}: {ms_img:.1f} ms/image, {ms_step:.2f} ms/step")
        report.write()

    report.rows[case.name] = {}
    report.info[case.name] = info
    # 1-2. eager rows (fp16 on GPU), before fast mode changes the shared modules
    timed(groups[0], args.warmup)
    eager_call_s = statistics.median(rows["diffusers"].times) if rows["diffusers"].times else 1.0
    fast_need = COMPILE_SHARE * case.guess_s + 3 * (args.warmup + 1 + args.repeats) * eager_call_s / 2.5
    names = groups[1] if budget.left() > fast_need + 5 * eager_call_s * (args.warmup + args.repeats) else ["ours-eager", "ours-eager-plain"]
    timed(names, args.warmup)
    # 3. ControlNet (reference): needs the eager UNet too
    if (wanted is None or "controlnet" in wanted) and budget.left() > fast_need + 1.6 * eager_call_s * (args.warmup + args.repeats):
        try:
            with torch.device(device):
                cn = ControlNetModel.from_unet(base.unet).to(eager_dtype).eval()
            d_cn = diffusers_pipeline("controlnet", base, controlnet=cn)
            rows["controlnet"] = Row("controlnet", lambda c: diffusers_call(d_cn, case, steps, conds[0], seed, c),
                                     baseline="diffusers-plain")
            timed(["controlnet"], args.warmup)
            rows["controlnet"].run = None
            del d_cn, cn
        except Exception as exc:  # noqa: BLE001
            failed(["controlnet"], exc)
    else:
        say("  controlnet: skipped (time budget)")
    # The profile comes after every eager row: CUDA profiling leaves CUPTI attached to the process, which slows
    # every later kernel launch (pytorch/pytorch#144455); run before ours-eager it cost that row ~15 % at SD1.5
    # batch 1, where a step is launch-bound (the 29.0 vs 24.3 ms/step of the first GPU run, issue 18).
    if args.profile and "diffusers" in report.rows[case.name] and budget.left() > case.guess_s * 0.8:
        text = attempt("profile", lambda: profile_call(rows["diffusers"], device))
        if text:
            report.profiles.append(f"== {case.name}: diffusers (eager) ==\n{text}")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # 4. fast mode on the same base: all three pipelines share the compiled UNet/decoder graphs
    if wanted is None or any(n.startswith("ours-fast") for n in wanted):
        t1 = time.perf_counter()
        try:
            for p in (o1, o3, o0):
                p.optimize(compile=not args.no_compile, mode=args.mode, backend=args.backend,
                           dtype=None if device.type == "cuda" else torch.float32)
        except Exception as exc:  # noqa: BLE001
            failed(["ours-fast", "ours-fast-3", "ours-fast-plain"], exc)
            raise
        info["fast_dtype"] = str(o1.dtype).replace("torch.", "")
        say(f"  fast mode set up in {time.perf_counter() - t1:.1f} s ({info['fast_dtype']}, mode {args.mode}); compiling on first call")
        rows["ours-fast"] = Row("ours-fast", lambda c: ours_call(o1, case, steps, conds[:1], seed, c), baseline="ours-fast-plain",
                                pixel_ref="diffusers", fast=True)
        rows["ours-fast-3"] = Row("ours-fast-3", lambda c: ours_call(o3, case, steps, conds, seed, c), baseline="ours-fast-plain",
                                  pixel_ref="ours-eager-3", fast=True)
        rows["ours-fast-plain"] = Row("ours-fast-plain", lambda c: ours_call(o0, case, steps, [], seed, c),
                                      pixel_ref="diffusers-plain", fast=True)
        timed(["ours-fast", "ours-fast-3", "ours-fast-plain"], args.warmup + 1)
        info["fast_status"] = {n: fast_mode.status(p) for n, p in (("ours-fast", o1), ("ours-fast-3", o3))}
        if ref_out is not None:
            info["unet_rel_err_fast_vs_eager"] = attempt("UNet check", lambda: fast_unet_error(base, ref_inputs, ref_out, o1.dtype))
        for name in ("ours-fast", "ours-fast-3", "ours-fast-plain"):
            if name in report.rows[case.name]:
                report.rows[case.name][name]["loop_host_syncs"] = attempt("sync count", lambda: count_loop_syncs(rows[name], device, steps))
        failures = {n: e for s in info["fast_status"].values() for n, e in s["compiled"].items() if e != "ok"}
        if failures:
            say(f"  WARNING: compile fell back to eager for {failures}")
        report.write()
        if args.profile and budget.left() > 20 and "ours-fast" in report.rows[case.name]:
            text = attempt("profile", lambda: profile_call(rows["ours-fast"], device))
            if text:
                report.profiles.append(f"== {case.name}: ours-fast ==\n{text}")
            report.write()
    del base, adapters, ref_adapter, d_adapter, d_plain, o1, o3, o0, rows, ref_inputs, ref_out
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # next case: other modules; keeps the recompile limits per case
    return info


def fill_relations(case: str, rows: dict[str, Row], report) -> None:
    """Overhead, speed-up and pixel differences, for every pair already measured."""
    res = report.rows[case]
    for name, row in rows.items():
        r = res.get(name)
        if r is None:
            continue
        base = res.get(row.baseline) if row.baseline else None
        r["adapter_overhead_pct"] = 100 * (r["ms_image"] / base["ms_image"] - 1) if base else None
        d = res.get("diffusers")
        r["speedup_vs_diffusers"] = d["ms_image"] / r["ms_image"] if d else None
        ref = rows.get(row.pixel_ref) if row.pixel_ref else None
        if ref is not None and ref.image is not None and row.image is not None and ref.image.shape == row.image.shape and ref is not row:
            diff = np.abs(ref.image.astype(np.float64) - row.image.astype(np.float64)) * 255
            r["pixel_ref"] = row.pixel_ref
            r["max_pixel_diff"] = float(np.nanmax(diff))
            r["mean_pixel_diff"] = float(np.nanmean(diff))


# ---------------------------------------------------------------------------------------------- report


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


class Report:
    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        self.meta = meta
        self.info: dict[str, Any] = {}
        self.rows: dict[str, dict[str, dict[str, Any]]] = {}
        self.profiles: list[str] = []
        self.t0 = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {text}", flush=True)

    def write(self) -> None:
        data = {"meta": self.meta, "cases": self.info, "rows": self.rows}
        (self.out / "bench_inference.json").write_text(json.dumps(data, indent=1, default=str))
        (self.out / "bench_inference.md").write_text(self.markdown())
        if self.profiles:
            (self.out / "bench_inference_profiles.txt").write_text("\n\n".join(self.profiles))

    def markdown(self) -> str:
        m = self.meta
        lines = [f"Device: {m['device_name']} · torch {m['torch']} · diffusers {m['diffusers']} · "
                 f"matmul {m['matmul_rate_TFLOPs']:.3g} TFLOP/s ({m['matmul_kind']}) · {m['steps']} steps, CFG {GUIDANCE}", ""]
        head = ("| case | row | ms/image | ms/step | × diffusers | adapter overhead | peak GiB | max px diff (vs) | "
                "MFU | first call s | compile s | loop syncs |")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        fmt = lambda v, f: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f)  # noqa: E731
        for case, rows in self.rows.items():
            for name, r in rows.items():
                px = "–" if r.get("max_pixel_diff") is None else f"{r['max_pixel_diff']:.1f} ({r['pixel_ref']})"
                ovh = r.get("adapter_overhead_pct")
                lines.append(
                    f"| {case} | {name} | {fmt(r.get('ms_image'), '.1f')} | {fmt(r.get('ms_step'), '.2f')} | "
                    f"{fmt(r.get('speedup_vs_diffusers'), '.2f')} | {'–' if ovh is None else format(ovh, '+.1f') + ' %'} | "
                    f"{fmt(r.get('peak_mem_GiB'), '.2f')} | {px} | {fmt(r.get('mfu'), '.1%')} | {fmt(r.get('first_call_s'), '.1f')} | "
                    f"{fmt(r.get('compile_s'), '.1f')} | {fmt(r.get('loop_host_syncs'), 'd')} |")
        for case, info in self.info.items():
            if "unet_rel_err_fast_vs_eager" in info:
                lines.append("")
                lines.append(f"{case}: UNet {info['unet_flops_per_step'] / 1e12:.2f} TFLOP per CFG step; fast UNet "
                             f"({info.get('fast_dtype')}) vs eager relative error {info['unet_rel_err_fast_vs_eager']:.2e}; "
                             f"compiled: {info['fast_status']['ours-fast']['compiled']}")
        return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default=None, help="comma list of cases (GPU: sd15,sdxl,sd15x4; CPU: tiny,tiny-xl)")
    p.add_argument("--rows", default=None, help="comma list of rows to time (default: all)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 30 on GPU, 10 on CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls per row (fast rows get one more)")
    p.add_argument("--mode", default="reduce-overhead", help="torch.compile mode of the fast rows")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the fast rows")
    p.add_argument("--no-compile", action="store_true", help="fast rows without torch.compile")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--budget-s", type=float, default=520.0,
                   help="start a case only if its estimated time is left, and skip optional rows, to end near this")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--threads", type=int, default=1, help="CPU mode: torch threads (1 is steadiest on a shared machine)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    names = args.only.split(",") if args.only else (list(cases) if device.type == "cuda" else ["tiny"])
    unknown = [n for n in names if n not in cases]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {list(cases)}")
    args.steps = args.steps or (30 if device.type == "cuda" else 10)
    budget = Budget(args.budget_s)
    for key in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), 32))
            break

    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # no per-`.to()` dtype notices in the log
    rate, kind = matmul_rate(device)
    meta = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "matmul_rate_TFLOPs": rate / 1e12,
            "matmul_kind": kind, "steps": args.steps, "repeats": args.repeats, "mode": args.mode, "backend": args.backend,
            "compile": not args.no_compile, "argv": sys.argv[1:] if argv is None else argv}
    report = Report(Path(args.out), meta)
    report.say(f"{meta['device_name']}: matmul {rate / 1e12:.1f} TFLOP/s ({kind}); cases {names}; budget {args.budget_s:.0f} s")
    for name in names:
        case = cases[name]
        if budget.left() < case.guess_s:
            report.say(f"[{name}] skipped: {budget.left():.0f} s left of the budget")
            meta.setdefault("skipped", []).append(name)
            continue
        try:
            run_case(case, args, device, rate, budget, report)
        except Exception as exc:  # noqa: BLE001 - keep the other cases and the partial results
            import traceback

            traceback.print_exc()
            meta.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report.write()
    meta["total_s"] = time.perf_counter() - report.t0
    report.write()
    print()
    print(report.markdown(), flush=True)
    return {"meta": meta, "rows": report.rows}


if __name__ == "__main__":
    main()
