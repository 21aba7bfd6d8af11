"""Train the embedded demo's base model on the procedural world: the VAE, then UNet + text encoder.

    python scripts/train_demo_base.py --out runs/demo-base --minutes-vae 3 --minutes-unet 5   # one H100
    python scripts/train_demo_base.py --out /tmp/demo-smoke --smoke --device cpu              # CPU, seconds

Phase 1 trains the AutoencoderKL (L1 + L2 + image-gradient L1 + a KL weight of 1e-6, as SD's
VAE minus its GAN/LPIPS terms). The latent scaling factor is then set to 1/std of the latents.
Phase 2 trains the UNet and the CLIP text encoder jointly with ε-prediction MSE (min-SNR-γ
weighting), 10% empty captions for classifier-free guidance, bf16 autocast, AdamW, an EMA of the
weights. Both phases are bounded by wall-clock budgets. World scenes are generated on the fly by
DataLoader workers into a device-resident ring buffer that training samples from, so the GPU never
waits for the CPU. The output folder is a diffusers StableDiffusionPipeline (fp16 safetensors)
plus train_log.json and samples.png (captions of held-out scenes, text only).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import t2iadapter  # noqa: F401 - installed (pip install -e .)
except ImportError:  # a bare checkout, e.g. on the GPU machine: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from t2iadapter import world  # noqa: E402
from t2iadapter.demo.architecture import DemoBaseConfig, build_demo_base, count_parameters, save_demo_base  # noqa: E402

logger = logging.getLogger("train_demo_base")


@dataclass(frozen=True)
class RunConfig:
    """Training options (defaults: the real run on one H100, ~8 minutes of training)."""

    out: str
    minutes_vae: float = 3.0  # wall-clock budget of phase 1
    minutes_unet: float = 5.0  # wall-clock budget of phase 2
    max_steps_vae: int = 0  # 0 = bounded by time only
    max_steps_unet: int = 0
    device: str = "cuda"
    seed: int = 0
    size: int = 256  # world image size
    batch_vae: int = 64  # 256² images; ~3 TFLOP per step
    batch_unet: int = 256  # 32² latents; large batches make ε-prediction gradients less noisy
    lr_vae: float = 4e-4
    lr_unet: float = 3e-4  # UNet and text encoder, both from scratch; warm-up then cosine to 10%
    warmup_steps: int = 300
    weight_decay: float = 1e-2  # AdamW β (0.9, 0.999), wd 1e-2 as the paper's recipe
    kl_weight: float = 1e-6  # SD's VAE
    caption_dropout: float = 0.1  # empty caption, for classifier-free guidance
    snr_gamma: float = 5.0  # min-SNR-γ loss weighting (Hang et al. 2023); 0 = plain MSE
    ema_decay: float = 0.999
    workers: int = -1  # scene-generating processes; -1 = cpu_count - 2
    chunk: int = 64  # scenes per worker batch
    pool_images: int = 32768  # device ring buffer of uint8 images (6.4 GB at 256²)
    min_fill: int = 4096  # images in the pool before training starts
    refresh_batches: int = 4  # fresh worker batches taken into the image pool per VAE step, at most
    refresh_batches_unet: int = 1  # per UNet step (each costs a VAE encode of `chunk` images)
    log_every: int = 50
    preview_steps: int = 25
    preview_guidance: float = 5.0
    preview_scenes: int = 32
    tiny: bool = False  # DemoBaseConfig.tiny() instead of the shipped sizes (smoke runs)


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Command-line options → RunConfig; --smoke overrides everything for a seconds-long CPU run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (diffusers pipeline + train_log.json)")
    p.add_argument("--minutes-vae", type=float, default=RunConfig.minutes_vae)
    p.add_argument("--minutes-unet", type=float, default=RunConfig.minutes_unet)
    p.add_argument("--max-steps-vae", type=int, default=0)
    p.add_argument("--max-steps-unet", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-vae", type=int, default=RunConfig.batch_vae)
    p.add_argument("--batch-unet", type=int, default=RunConfig.batch_unet)
    p.add_argument("--lr-vae", type=float, default=RunConfig.lr_vae)
    p.add_argument("--lr-unet", type=float, default=RunConfig.lr_unet)
    p.add_argument("--workers", type=int, default=-1, help="scene-generating processes (-1: cpu_count - 2)")
    p.add_argument("--chunk", type=int, default=RunConfig.chunk, help="scenes per worker batch")
    p.add_argument("--pool-images", type=int, default=RunConfig.pool_images)
    p.add_argument("--preview-scenes", type=int, default=RunConfig.preview_scenes, help="0 = no samples.png")
    p.add_argument("--size", type=int, default=RunConfig.size, help="world image size (multiple of 64)")
    p.add_argument("--log-every", type=int, default=RunConfig.log_every)
    p.add_argument("--tiny", action="store_true", help="DemoBaseConfig.tiny() sizes (quick experiments)")
    p.add_argument("--smoke", action="store_true", help="tiny model, 64² scenes, 2 steps per phase, CPU-friendly")
    a = p.parse_args(argv)
    cfg = RunConfig(
        out=a.out, minutes_vae=a.minutes_vae, minutes_unet=a.minutes_unet, max_steps_vae=a.max_steps_vae,
        max_steps_unet=a.max_steps_unet, device=a.device, seed=a.seed, batch_vae=a.batch_vae,
        batch_unet=a.batch_unet, lr_vae=a.lr_vae, lr_unet=a.lr_unet, workers=a.workers, chunk=a.chunk,
        pool_images=a.pool_images, preview_scenes=a.preview_scenes, size=a.size, log_every=a.log_every,
        tiny=a.tiny, min_fill=min(RunConfig.min_fill, a.pool_images),
    )  # fmt: skip
    if a.smoke:
        cfg = RunConfig(
            out=a.out, minutes_vae=0.5, minutes_unet=0.5, max_steps_vae=2, max_steps_unet=2, device=a.device,
            seed=a.seed, size=64, batch_vae=2, batch_unet=2, warmup_steps=1, workers=0, chunk=4, pool_images=16,
            min_fill=4, log_every=1, preview_steps=2, preview_scenes=1, tiny=True,
        )  # fmt: skip
    return cfg


class SceneStream(torch.utils.data.IterableDataset):
    """Endless batches of training scenes {"image": uint8 N×3×H×W, "ids": int64 N×L}, disjoint per worker."""

    def __init__(self, tokenizer: Any, size: int, chunk: int, max_length: int, offset: int) -> None:
        super().__init__()
        self.tokenizer, self.size, self.chunk, self.max_length, self.offset = tokenizer, size, chunk, max_length, offset

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        n_seeds = len(world.TRAIN_SEEDS)
        k = 0
        while True:
            start = self.offset + (k * nw + wid) * self.chunk
            seeds = [world.TRAIN_SEEDS[(start + j) % n_seeds] for j in range(self.chunk)]
            batch = world.generate_batch(seeds, self.size, names=("image",))
            ids = self.tokenizer(
                list(batch.captions), padding="max_length", max_length=self.max_length, truncation=True,
                return_tensors="pt",
            ).input_ids  # fmt: skip
            image = torch.from_numpy(batch.maps["image"]).permute(0, 3, 1, 2).contiguous()
            yield {"image": image, "ids": ids}
            k += 1


def _worker_init(_: int) -> None:
    """One thread per scene-generating worker (the cores are the workers)."""
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


class Producer:
    """Pulls worker batches on a background thread into a bounded queue; the training loop never blocks."""

    def __init__(self, dataset: SceneStream, workers: int, pin: bool, max_queue: int = 64) -> None:
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers, pin_memory=pin, worker_init_fn=_worker_init,
            prefetch_factor=4 if workers > 0 else None, persistent_workers=False,
        )  # fmt: skip
        self.iterator = iter(self.loader)  # workers fork here, on the main thread, before CUDA starts
        self.queue: queue.Queue[dict[str, torch.Tensor]] = queue.Queue(maxsize=max_queue)
        self.stop = threading.Event()
        self.produced = 0
        self.thread = threading.Thread(target=self._run, name="scene-producer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for batch in self.iterator:
            while not self.stop.is_set():
                try:
                    self.queue.put(batch, timeout=0.2)
                    self.produced += len(batch["ids"])
                    break
                except queue.Full:
                    continue
            if self.stop.is_set():
                return

    def get(self, timeout: float = 120.0) -> dict[str, torch.Tensor]:
        """One batch, waiting for it."""
        return self.queue.get(timeout=timeout)

    def drain(self, max_batches: int) -> list[dict[str, torch.Tensor]]:
        """Up to max_batches batches that are ready now."""
        out = []
        for _ in range(max_batches):
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return out

    def close(self) -> None:
        """Stop the thread after its current batch (the workers exit with the loader's iterator)."""
        self.stop.set()
        while not self.queue.empty():
            self.queue.get_nowait()
        self.thread.join(timeout=10)
        del self.iterator  # shuts the worker processes down


class Pool:
    """A device-resident ring buffer of examples; training samples uniformly from what it holds."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity, self.device = capacity, device
        self.data: dict[str, torch.Tensor] = {}
        self.size = 0
        self.ptr = 0
        self.added = 0

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        """Insert a batch, overwriting the oldest examples when full."""
        n = len(next(iter(batch.values())))
        if not self.data:
            for k, v in batch.items():
                self.data[k] = torch.empty((self.capacity, *v.shape[1:]), dtype=v.dtype, device=self.device)
        idx = (self.ptr + torch.arange(n)) % self.capacity
        idx = idx.to(self.device)
        for k, v in batch.items():
            self.data[k][idx] = v.to(self.device, non_blocking=True)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self.added += n

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """n examples drawn uniformly with replacement."""
        idx = torch.randint(0, self.size, (n,), device=self.device)
        return {k: v[idx] for k, v in self.data.items()}


class Schedule:
    """Linear warm-up, then cosine decay to 10% over the phase, by time or steps, whichever is further."""

    def __init__(self, peak: float, warmup: int, seconds: float, max_steps: int) -> None:
        self.peak, self.warmup, self.seconds, self.max_steps = peak, warmup, seconds, max_steps
        self.start = time.perf_counter()

    def progress(self, step: int) -> float:
        """Fraction of the phase done, in [0, 1]."""
        p = (time.perf_counter() - self.start) / max(self.seconds, 1e-9)
        if self.max_steps:
            p = max(p, step / self.max_steps)
        return min(p, 1.0)

    def lr(self, step: int) -> float:
        """Learning rate at `step`."""
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        return self.peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * self.progress(step))))

    def done(self, step: int) -> bool:
        """Budget spent (time, or max_steps when set)."""
        return self.progress(step) >= 1.0


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA; nothing on CPU (smoke runs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _optimizer(params: list[torch.nn.Parameter], lr: float, wd: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (β 0.9/0.999), fused on CUDA."""
    kwargs: dict[str, Any] = {"lr": lr, "betas": (0.9, 0.999), "weight_decay": wd}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(params, **kwargs)


def _refresh(pool: Pool, producer: Producer, n: int, transform: Any = None) -> None:
    """Move ready worker batches into the pool (optionally transformed, e.g. VAE-encoded)."""
    for batch in producer.drain(n):
        pool.add(transform(batch) if transform is not None else batch)


def _as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×3×H×W → float in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def train_vae(vae: torch.nn.Module, pool: Pool, producer: Producer, cfg: RunConfig, device: torch.device) -> dict:
    """Phase 1: reconstruction (L1 + L2 + gradient L1) + KL, time-bounded; returns the phase log."""
    vae.train().requires_grad_(True)
    opt = _optimizer(list(vae.parameters()), cfg.lr_vae, 0.0, device)
    sched = Schedule(cfg.lr_vae, cfg.warmup_steps, cfg.minutes_vae * 60, cfg.max_steps_vae)
    log: list[dict[str, float]] = []
    acc = torch.zeros(4, device=device)
    step, start = 0, time.perf_counter()
    while not sched.done(step):
        _refresh(pool, producer, cfg.refresh_batches)
        x = _as_float(pool.sample(cfg.batch_vae)["image"])
        flip = torch.rand(x.shape[0], 1, 1, 1, device=device) < 0.5
        x = torch.where(flip, x.flip(-1), x)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        for group in opt.param_groups:
            group["lr"] = sched.lr(step)
        with _autocast(device):
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample()).sample.float()
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        l1 = (rec - x).abs().mean()
        l2 = (rec - x).pow(2).mean()
        grad = (rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean()
        loss = l1 + l2 + 0.5 * grad + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        acc += torch.stack([loss.detach(), l1.detach(), l2.detach(), kl.detach()])
        step += 1
        if step % cfg.log_every == 0 or sched.done(step):
            n = step % cfg.log_every or cfg.log_every
            vals = (acc / n).tolist()
            acc.zero_()
            entry = {"step": step, "time_s": time.perf_counter() - start, "loss": vals[0], "l1": vals[1],
                     "l2": vals[2], "kl": vals[3], "lr": sched.lr(step), "pool_added": pool.added}  # fmt: skip
            log.append(entry)
            logger.info("vae %s", " ".join(f"{k}={v:.4g}" for k, v in entry.items()))
    vae.eval().requires_grad_(False)
    wall = time.perf_counter() - start
    return {"steps": step, "samples": step * cfg.batch_vae, "wall_s": wall, "log": log,
            "final_loss": log[-1]["loss"] if log else float("nan")}  # fmt: skip


@torch.no_grad()
def encode_moments(vae: torch.nn.Module, images: torch.Tensor, device: torch.device, chunk: int = 256) -> dict:
    """VAE posterior mean and std (bf16 on CUDA) of uint8 images, in chunks."""
    means, stds = [], []
    store = torch.bfloat16 if device.type == "cuda" else torch.float32
    for i in range(0, len(images), chunk):
        x = _as_float(images[i : i + chunk].to(device))
        with _autocast(device):
            dist = vae.encode(x).latent_dist
        means.append(dist.mean.to(store))
        stds.append(dist.std.to(store))
    return {"mean": torch.cat(means), "std": torch.cat(stds)}


@torch.no_grad()
def scaling_factor(vae: torch.nn.Module, pool: Pool, device: torch.device, n: int = 2048) -> float:
    """1 / std of sampled latents over n pool images (SD's recipe for its 0.18215)."""
    images = pool.data["image"][: min(n, pool.size)]
    m = encode_moments(vae, images, device)
    z = m["mean"].float() + m["std"].float() * torch.randn_like(m["mean"].float())
    return float(1.0 / z.std())


class Ema:
    """Exponential moving average of parameters (fp32), with the usual (1+n)/(10+n) warm-up."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.shadow = [p.detach().clone().float() for p in params]
        self.decay = decay
        self.n = 0

    @torch.no_grad()
    def update(self) -> None:
        """shadow ← decay·shadow + (1 − decay)·param."""
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to(self, params: list[torch.nn.Parameter]) -> None:
        """Write the averaged weights into `params` (another module's parameters, same order)."""
        for s, p in zip(self.shadow, params, strict=True):
            p.copy_(s.to(p.dtype))


def train_unet(modules: dict[str, Any], pool: Pool, producer: Producer, cfg: RunConfig, device: torch.device,
               scale: float) -> tuple[dict, Ema]:  # fmt: skip
    """Phase 2: UNet + text encoder, ε-prediction MSE with min-SNR weighting and caption dropout."""
    vae, unet, text = modules["vae"], modules["unet"], modules["text_encoder"]
    tokenizer = modules["tokenizer"]
    latents = Pool(max(pool.capacity * 2, 16), device)
    for i in range(0, pool.size, 1024):  # start from everything phase 1 generated
        latents.add({**encode_moments(vae, pool.data["image"][i : i + 1024], device),
                     "ids": pool.data["ids"][i : i + 1024]})  # fmt: skip

    def encode(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**encode_moments(vae, batch["image"], device), "ids": batch["ids"]}

    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)  # fmt: skip
    acp = modules["scheduler"].alphas_cumprod.to(device=device, dtype=torch.float32)
    snr_all = acp / (1.0 - acp)
    unet.train().requires_grad_(True)
    text.train().requires_grad_(True)
    params = [p for m in (unet, text) for p in m.parameters()]
    opt = _optimizer(params, cfg.lr_unet, cfg.weight_decay, device)
    ema = Ema(params, cfg.ema_decay)
    sched = Schedule(cfg.lr_unet, cfg.warmup_steps, cfg.minutes_unet * 60, cfg.max_steps_unet)
    log: list[dict[str, float]] = []
    acc = torch.zeros(1, device=device)
    step, start = 0, time.perf_counter()
    while not sched.done(step):
        _refresh(latents, producer, cfg.refresh_batches_unet, encode)
        b = latents.sample(cfg.batch_unet)
        z = (b["mean"].float() + b["std"].float() * torch.randn_like(b["mean"].float())) * scale
        drop = torch.rand(z.shape[0], device=device) < cfg.caption_dropout
        ids = torch.where(drop[:, None], empty.expand_as(b["ids"]), b["ids"])
        noise = torch.randn_like(z)
        t = torch.randint(0, len(acp), (z.shape[0],), device=device)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1.0 - a).sqrt() * noise
        if device.type == "cuda":
            zt = zt.contiguous(memory_format=torch.channels_last)
        for group in opt.param_groups:
            group["lr"] = sched.lr(step)
        with _autocast(device):
            context = text(ids)[0]
            pred = unet(zt, t, context).sample.float()
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        if cfg.snr_gamma > 0:
            snr = snr_all[t]
            per = per * torch.clamp(snr, max=cfg.snr_gamma) / snr
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        acc += loss.detach()
        step += 1
        if step % cfg.log_every == 0 or sched.done(step):
            n = step % cfg.log_every or cfg.log_every
            entry = {"step": step, "time_s": time.perf_counter() - start, "loss": float(acc.item() / n),
                     "lr": sched.lr(step), "pool_added": latents.added}  # fmt: skip
            acc.zero_()
            log.append(entry)
            logger.info("unet %s", " ".join(f"{k}={v:.4g}" for k, v in entry.items()))
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    wall = time.perf_counter() - start
    result = {"steps": step, "samples": step * cfg.batch_unet, "wall_s": wall, "log": log,
              "final_loss": log[-1]["loss"] if log else float("nan")}  # fmt: skip
    return result, ema


def preview(out: Path, cfg: RunConfig, device: torch.device) -> dict:
    """Load the saved folder with diffusers, generate held-out captions (text only), save samples.png."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from t2iadapter.evaluation import colour_accuracy, structure_iou

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        str(out), safety_checker=None, requires_safety_checker=False, torch_dtype=dtype
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    seeds = list(world.BUILTIN_SEEDS) + list(world.EVAL_SEEDS[: max(cfg.preview_scenes - len(world.BUILTIN_SEEDS), 0)])
    scenes = [world.generate(s, cfg.size) for s in seeds[: cfg.preview_scenes]]
    images: list[np.ndarray] = []
    start = time.perf_counter()
    for i in range(0, len(scenes), 16):
        part = scenes[i : i + 16]
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed + i)
        out_np = pipe(
            [s.caption for s in part], height=cfg.size, width=cfg.size, num_inference_steps=cfg.preview_steps,
            guidance_scale=cfg.preview_guidance, generator=gen, output_type="np",
        ).images  # fmt: skip
        images += [(np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8) for x in out_np]
    wall = time.perf_counter() - start
    cols = 8
    tiles = [np.concatenate([s.image, g], axis=0) for s, g in zip(scenes, images, strict=True)]
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[r : r + cols], axis=1) for r in range(0, len(tiles), cols)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(out / "samples.png")
    acc = [colour_accuracy(g, s, region="image") for s, g in zip(scenes, images, strict=True)]
    iou = [structure_iou(g, s) for s, g in zip(scenes, images, strict=True)]
    result = {"scenes": len(scenes), "steps": cfg.preview_steps, "guidance": cfg.preview_guidance,
              "wall_s": wall, "text_only_colour_accuracy_image": float(np.mean(acc)),
              "text_only_structure_iou": float(np.mean(iou)), "captions": [s.caption for s in scenes]}  # fmt: skip
    logger.info("preview: colour accuracy (image) %.3f, structure IoU %.3f, %.1f s",
                result["text_only_colour_accuracy_image"], result["text_only_structure_iou"], wall)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> dict:
    """Run both phases, save the fp16 pipeline folder, train_log.json and samples.png; return the log."""
    cfg = parse_args(argv)
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    arch = DemoBaseConfig.tiny(cfg.size) if cfg.tiny else DemoBaseConfig(image_size=cfg.size)
    modules = build_demo_base(cfg.seed, arch)
    tokenizer = modules["tokenizer"]
    workers = cfg.workers if cfg.workers >= 0 else max(1, min(14, (os.cpu_count() or 2) - 2))
    # Workers fork before CUDA is touched.
    stream = SceneStream(tokenizer, cfg.size, cfg.chunk, tokenizer.model_max_length, world.TRAIN_SEEDS.start)
    producer = Producer(stream, workers, pin=device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    for name in ("vae", "unet", "text_encoder"):
        modules[name].to(device)
        if device.type == "cuda" and name != "text_encoder":
            modules[name].to(memory_format=torch.channels_last)
    params = count_parameters(modules)
    logger.info("parameters: %s; %d scene workers; device %s", params, workers, device)
    pool = Pool(cfg.pool_images, device)
    while pool.size < min(cfg.min_fill, cfg.pool_images):
        pool.add(producer.get())
    fill_s = time.perf_counter() - t0
    logger.info("pool filled with %d scenes after %.1f s", pool.size, fill_s)
    try:
        vae_log = train_vae(modules["vae"], pool, producer, cfg, device)
        scale = scaling_factor(modules["vae"], pool, device)
        modules["vae"].register_to_config(scaling_factor=scale)
        logger.info("latent scaling factor %.5f", scale)
        unet_log, ema = train_unet(modules, pool, producer, cfg, device, scale)
    finally:
        produced = producer.produced
        producer.close()
    final = dict(modules)
    for name in ("unet", "text_encoder"):
        final[name] = copy.deepcopy(modules[name])
    ema.copy_to([p for m in (final["unet"], final["text_encoder"]) for p in m.parameters()])
    save_demo_base(final, out, torch.float16, arch)
    log: dict[str, Any] = {
        "run": asdict(cfg),
        "architecture": arch.to_dict(),
        "parameters": params,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0], **_versions()},
        "scene_workers": workers,
        "scenes_generated": produced,
        "pool_fill_s": fill_s,
        "vae": vae_log,
        "scaling_factor": scale,
        "unet": unet_log,
    }
    log["train_wall_s"] = time.perf_counter() - t0
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    if cfg.preview_scenes > 0:
        try:  # the weights are saved already: a failing preview must not lose the run
            log["preview"] = preview(out, cfg, device)
        except Exception as exc:  # noqa: BLE001 - reported in the log, the run itself succeeded
            logger.exception("preview failed")
            log["preview"] = {"error": repr(exc)}
    log["total_wall_s"] = time.perf_counter() - t0
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    logger.info("done in %.1f s: %s", log["total_wall_s"], out)
    return log


def _versions() -> dict[str, str]:
    """diffusers and transformers versions, for the log."""
    import diffusers
    import transformers

    return {"diffusers": diffusers.__version__, "transformers": transformers.__version__}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main()
