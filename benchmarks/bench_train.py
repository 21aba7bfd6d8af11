"""Adapter-training throughput and peak memory: our trainer's step vs a loop written like diffusers' example.

SD1.5 architecture with random weights (configs as /work/shared/tools/train_anchor.py), 512², batch 8,
bf16, full adapter with 3-channel conditions. Text embeddings are precomputed in every variant (as
diffusers' example does), so no text encoder is on the GPU in any of them.

  reference      diffusers-example style: VAE encode every step, UNet gradients not frozen, plain AdamW
  ours           t2iadapter.train.loop.Trainer.train_step (the code `t2iadapter train` runs): frozen base,
                 cached VAE posteriors (VAE then leaves the GPU), fused AdamW, channels-last, bf16 autocast
  ours-compile   ours + torch.compile of the UNet (falls back to eager if the compiler fails)
  ours-ckpt      ours + UNet gradient checkpointing (the low-memory setting)
  frozen         our Trainer with only the base frozen (no caching, no fused AdamW, no channels-last)

One GPU:   python benchmarks/bench_train.py [--variants reference,ours,ours-compile]
Two GPUs:  torchrun --nproc_per_node 2 benchmarks/bench_train.py --ddp   (per-GPU throughput; scaling
           efficiency against `ours` of a single-GPU run whose JSON is in $OUT)
CPU smoke: python benchmarks/bench_train.py --device cpu --tiny
Writes $OUT/bench_train.json (one GPU) or $OUT/bench_train_ddp.json (OUT defaults to ./out).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)  # fmt: skip
SD15_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512,
)  # fmt: skip
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)  # fmt: skip
TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 16, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64,
)  # fmt: skip

# variant -> recipe overrides of our trainer (None: the reference loop)
VARIANTS: dict[str, dict | None] = {
    "reference": None,
    "frozen": dict(cache_latents=False, cache_text=True, fused_adamw=False, channels_last=False),
    "ours": dict(cache_latents=True, cache_text=True, fused_adamw=True, channels_last=True),
    "ours-compile": dict(cache_latents=True, cache_text=True, fused_adamw=True, channels_last=True, compile=True),
    "ours-nchw": dict(cache_latents=True, cache_text=True, fused_adamw=True, channels_last=False),
    "ours-compile-nchw": dict(cache_latents=True, cache_text=True, fused_adamw=True, channels_last=False, compile=True),
    "ours-ckpt": dict(cache_latents=True, cache_text=True, fused_adamw=True, channels_last=True, gradient_checkpointing=True),
}


class Synthetic(torch.utils.data.Dataset):
    """In-memory samples shaped like SampleStream's: pixels in [-1, 1], a 3-channel condition, a caption."""

    def __init__(self, n: int, res: int, condition: str = "depth") -> None:
        g = torch.Generator().manual_seed(0)
        self.pixels = torch.rand(n, 3, res, res, generator=g) * 2 - 1
        self.conds = torch.rand(n, 3, res, res, generator=g)
        self.condition = condition

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> dict:
        return {"pixels": self.pixels[i], "caption": "", "conditions": {self.condition: self.conds[i]}, "index": i,
                "skipped": 0, "errors": []}


def make_base(tiny: bool, device: torch.device, dtype: torch.dtype):
    """SD1.5-shaped (or tiny) UNet + VAE with random weights, built directly on the device."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from t2iadapter.bases import BaseModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    if dtype != torch.float32:
        unet, vae = unet.to(dtype), vae.to(dtype)
    base = BaseModel(unet=unet, vae=vae, text_encoder=None, tokenizer=None, scheduler=scheduler,
                     source="random-sd15" if not tiny else "random-tiny")
    return base.freeze()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run_reference(args, device: torch.device) -> dict:
    """The loop of diffusers' T2I-Adapter example / train_anchor.py's `reference` mode."""
    import torch.nn.functional as F
    from diffusers import T2IAdapter

    B, res = args.batch, args.res
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = make_base(args.tiny, device, dtype)
    unet, vae = base.unet, base.vae
    unet.requires_grad_(True).train()  # the example never freezes the UNet's gradients
    chans = list(unet.config.block_out_channels)
    adapter = T2IAdapter(in_channels=3, channels=chans, num_res_blocks=2, downscale_factor=8).to(device).train()
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-5)
    data = Synthetic(B, res)
    img = data.pixels.to(device, dtype)
    cond = data.conds.to(device)
    ctx = torch.randn(B, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step() -> None:
        with torch.no_grad():
            lat = vae.encode(img).latent_dist.sample() * vae.config.scaling_factor
        t = ((1 - torch.rand(B, device=device) ** 3) * 1000).long().clamp(0, 999)
        noise = torch.randn_like(lat)
        noisy = base.scheduler.add_noise(lat, noise, t)
        with autocast:
            feats = adapter(cond)
            pred = unet(noisy, t, ctx, down_intrablock_additional_residuals=list(feats)).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, args, device, lambda: None)


def make_trainer(args, device: torch.device, overrides: dict, accelerator=None):
    """Our Trainer on the random base and synthetic data, configured like `t2iadapter train` would be."""
    from t2iadapter.train.config import load_config
    from t2iadapter.train.loop import Trainer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = make_base(args.tiny, device, dtype)
    sets = [f"recipe.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()]
    sets += [f"recipe.batch_size={args.batch}", "recipe.mixed_precision=bf16", "recipe.lr=1e-5", "recipe.max_steps=1000000",
             f"data.resolution={args.res}", "adapter.kind=full", "adapter.condition=depth", "adapter.in_channels=3",
             "checkpoint.every=0", f"output_dir={tempfile.mkdtemp(prefix='bench-train-')}"]
    config = load_config(None, sets)
    data = Synthetic(args.batch * (accelerator.num_processes if accelerator else 1), args.res)
    trainer = Trainer(config, base=base, stream=data, accelerator=accelerator)
    ctx = torch.randn(len(data), 77, base.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    for i in range(len(data)):  # precomputed text embeddings (no text encoder in the benchmark)
        trainer.text_cache[i] = (ctx[i].to(dtype), None)
    return trainer, data


def run_ours(args, device: torch.device, overrides: dict, accelerator=None) -> dict:
    """Time Trainer.train_step, the step `t2iadapter train` runs, on one fixed batch per process."""
    from t2iadapter.train.data import collate

    trainer, data = make_trainer(args, device, overrides, accelerator)
    rank = accelerator.process_index if accelerator else 0
    batch = collate([data[rank * args.batch + j] for j in range(args.batch)])
    if device.type == "cuda":  # as the trainer's DataLoader delivers it (pin_memory on CUDA)
        batch = {k: ({n: t.pin_memory() for n, t in v.items()} if isinstance(v, dict) else
                     v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def step() -> None:
        trainer.train_step([batch])

    result = timed(step, args, device, lambda: accelerator.wait_for_everyone() if accelerator else None)
    result["compiled"] = bool(overrides.get("compile")) and trainer._unet is not trainer.base.unet
    result["loss_finite"] = bool(torch.isfinite(trainer.micro_loss(batch)).item())
    return result


def timed(step, args, device: torch.device, barrier) -> dict:
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t0
    setup_peak = peak(device)
    reset_peak(device)
    barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    dt = time.perf_counter() - t0
    train_peak = peak(device)
    return dict(samples_per_s=args.batch * args.steps / dt, step_ms=1000 * dt / args.steps, peak_GiB=train_peak,
                peak_with_setup_GiB=max(setup_peak, train_peak), warmup_s=warm_s)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def table(rows: list[dict], device_name: str) -> str:
    ref = next((r for r in rows if r["variant"] == "reference"), None)
    lines = [f"{device_name} · batch {rows[0]['batch']} · {rows[0]['res']}² · bf16",
             f"{'variant':<14}{'samples/s':>11}{'step ms':>9}{'peak GiB':>10}{'peak+setup':>11}{'× ref speed':>12}{'× ref mem':>10}"]
    for r in rows:
        speed = f"{r['samples_per_s'] / ref['samples_per_s']:.2f}" if ref else "-"
        mem = f"{r['peak_GiB'] / ref['peak_GiB']:.2f}" if ref and ref["peak_GiB"] == ref["peak_GiB"] else "-"
        lines.append(f"{r['variant']:<14}{r['samples_per_s']:>11.1f}{r['step_ms']:>9.1f}{r['peak_GiB']:>10.2f}"
                     f"{r['peak_with_setup_GiB']:>11.2f}{speed:>12}{mem:>10}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (64², batch 2, 2 steps): a CPU smoke check")
    parser.add_argument("--batch", type=int, default=None, help="per-process batch (default 8; --tiny: 2)")
    parser.add_argument("--res", type=int, default=None, help="image size (default 512; --tiny: 64)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5, compile: incl.)")
    parser.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)} "
                        "(default: reference,ours,ours-compile; --tiny: no compile, which takes minutes on a CPU; --ddp: ours)")
    parser.add_argument("--ddp", action="store_true", help="under torchrun: our trainer on every GPU (DDP)")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for the JSON (default $OUT or ./out)")
    args = parser.parse_args()
    args.batch = args.batch or (2 if args.tiny else 8)
    args.res = args.res or (64 if args.tiny else 512)
    args.steps = args.steps or (2 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    default = "ours" if args.ddp else ("reference,frozen,ours,ours-ckpt" if args.tiny else "reference,ours,ours-compile")
    variants = [v.strip() for v in (args.variants or default).split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu --tiny for a smoke check")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    if args.ddp:
        return run_ddp(args, variants, out)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = []
    for variant in variants:
        overrides = VARIANTS[variant]
        row = run_reference(args, device) if overrides is None else run_ours(args, device, overrides)
        row.update(variant=variant, batch=args.batch, res=args.res)
        rows.append(row)
        print(json.dumps(row), flush=True)
        free()
    report = table(rows, name)
    print(report)
    meta = dict(device=name, torch=torch.__version__, batch=args.batch, res=args.res, steps=args.steps,
                warmup=args.warmup, tiny=args.tiny)
    (out / "bench_train.json").write_text(json.dumps({"meta": meta, "rows": rows, "table": report}, indent=2))
    return 0


def run_ddp(args, variants: list[str], out: Path) -> int:
    """Every process trains with DDP; per-GPU throughput vs the single-GPU `ours` row of $OUT/bench_train.json."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    acc = Accelerator(mixed_precision="no", cpu=args.device == "cpu",
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    device = acc.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    single = {}
    single_file = out / "bench_train.json"
    if single_file.is_file():
        single = {r["variant"]: r for r in json.loads(single_file.read_text())["rows"]}
    rows = []
    for variant in variants:
        overrides = VARIANTS[variant]
        if overrides is None:
            continue  # the reference loop is single-GPU only
        row = run_ours(args, device, overrides, accelerator=acc)
        rates = acc.gather(torch.tensor([row["samples_per_s"]], device=device)).tolist()
        peaks = acc.gather(torch.tensor([row["peak_GiB"]], device=device)).tolist()
        one = single.get(variant, {}).get("samples_per_s")
        row = dict(variant=variant, gpus=acc.num_processes, batch_per_gpu=args.batch, res=args.res,
                   per_gpu_samples_per_s=rates, total_samples_per_s=sum(rates), peak_GiB=max(peaks),
                   single_gpu_samples_per_s=one,
                   scaling_efficiency=(sum(rates) / (acc.num_processes * one)) if one else None)
        rows.append(row)
        if acc.is_main_process:
            print(json.dumps(row), flush=True)
        free()
    if acc.is_main_process:
        lines = [f"{name} × {acc.num_processes} (DDP) · batch {args.batch}/GPU · {args.res}² · bf16",
                 f"{'variant':<14}{'total samples/s':>16}{'per GPU':>10}{'1 GPU':>8}{'efficiency':>12}{'peak GiB':>10}"]
        for r in rows:
            eff = f"{100 * r['scaling_efficiency']:.1f}%" if r["scaling_efficiency"] else "-"
            one = f"{r['single_gpu_samples_per_s']:.1f}" if r["single_gpu_samples_per_s"] else "-"
            lines.append(f"{r['variant']:<14}{r['total_samples_per_s']:>16.1f}"
                         f"{r['total_samples_per_s'] / r['gpus']:>10.1f}{one:>8}{eff:>12}{r['peak_GiB']:>10.2f}")
        report = "\n".join(lines)
        print(report)
        (out / "bench_train_ddp.json").write_text(json.dumps({"device": name, "rows": rows, "table": report}, indent=2))
    acc.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
