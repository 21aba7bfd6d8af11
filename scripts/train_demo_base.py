"""Train the embedded demo's base model on the procedural world: the VAE, then UNet + text encoder.

    python scripts/train_demo_base.py --out runs/demo-base --minutes-vae 3 --minutes-unet 5   # one GPU, both phases
    python scripts/train_demo_base.py --out /tmp/demo-smoke --smoke --device cpu              # CPU, seconds

Long trainings run as several calls that resume from the script's own state folder (fp32 weights,
EMA, AdamW state, step and minute counters, the loss log), e.g. on a GPU lent ten minutes at a time:

    python scripts/train_demo_base.py --state runs/state --phase vae --minutes-vae 3
    python scripts/train_demo_base.py --state runs/state --phase unet --minutes-unet 8 --plan-unet-minutes 100
    python scripts/train_demo_base.py --state runs/state --phase unet --minutes-unet 8 --plan-unet-minutes 100
    python scripts/train_demo_base.py --state runs/state --phase export --out runs/demo-base

Every GPU of a machine: the same commands under torchrun, one process per GPU; `--batch-*` stay the batch of
all processes together (each takes its share, gradients are averaged, rank 0 writes every file):

    torchrun --standalone --nproc-per-node 2 scripts/train_demo_base.py --state runs/state --phase unet ...

`--init-base FOLDER` starts a new state from a saved pipeline folder (e.g. the shipped fp16 demo base,
whose EMA weights then become both the weights and the EMA: no optimiser state survives that).
The learning rate follows one warm-up + cosine schedule over `--plan-unet-minutes` of cumulative
UNet training, whichever call the minutes fall in.

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

from t2iadapter.demo import world  # noqa: E402
from t2iadapter.demo.architecture import DemoBaseConfig, build_demo_base, count_parameters, save_demo_base  # noqa: E402

logger = logging.getLogger("train_demo_base")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


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
    state: str = ""  # resumable state folder ("" = none: one-shot run)
    phase: str = "all"  # all | vae | unet | export
    init_base: str = ""  # a saved pipeline folder to start a new state from
    plan_unet_minutes: float = 0.0  # length of the lr schedule in cumulative UNet minutes (0: this call's)
    topk_weight: float = 1.0  # VAE: weight of the mean error over each image's worst 1% of pixels (beads)
    topk_share: float = 0.01
    lowfreq_weight: float = 2.0  # VAE: L1 between 16×16-pooled images (background tints; 0 = off)
    compile: bool = False  # torch.compile the UNet training forward
    compile_mode: str = "default"  # torch.compile's mode; "reduce-overhead" replays CUDA graphs (the step is host-bound)
    channels_last: bool = True  # CUDA: VAE and UNet weights and inputs channels-last (False: leave layouts to Inductor)
    compile_cache: str = ""  # torch's portable compile artefacts: loaded before compiling, written once compiled
    profile: str = ""  # write a torch.profiler table of UNet steps 30-39 to this file (where the step time goes)


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Command-line options → RunConfig; --smoke overrides everything for a seconds-long CPU run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="", help="output folder (diffusers pipeline + train_log.json)")
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
    p.add_argument("--state", default="", help="resumable state folder (created, or resumed when present)")
    p.add_argument("--phase", default="all", choices=("all", "vae", "unet", "export"))
    p.add_argument("--init-base", default="", help="start a new state from this pipeline folder")
    p.add_argument("--plan-unet-minutes", type=float, default=0.0, help="lr schedule length, cumulative minutes")
    p.add_argument("--topk-weight", type=float, default=RunConfig.topk_weight)
    p.add_argument("--lowfreq-weight", type=float, default=RunConfig.lowfreq_weight)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--compile-mode", default=RunConfig.compile_mode, choices=COMPILE_MODES,
                   help="torch.compile mode of the UNet (reduce-overhead: CUDA graphs, for a host-bound step)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep NCHW layouts on CUDA (the profile shows layout copies around the convolutions' backward)")
    p.add_argument("--compile-cache", default="", help="file of torch's compile artefacts (read if present, then written)")
    p.add_argument("--profile", default="", help="write a profiler table of UNet steps 30-39 to this file")
    a = p.parse_args(argv)
    cfg = RunConfig(
        out=a.out, minutes_vae=a.minutes_vae, minutes_unet=a.minutes_unet, max_steps_vae=a.max_steps_vae,
        max_steps_unet=a.max_steps_unet, device=a.device, seed=a.seed, batch_vae=a.batch_vae,
        batch_unet=a.batch_unet, lr_vae=a.lr_vae, lr_unet=a.lr_unet, workers=a.workers, chunk=a.chunk,
        pool_images=a.pool_images, preview_scenes=a.preview_scenes, size=a.size, log_every=a.log_every,
        tiny=a.tiny, min_fill=min(RunConfig.min_fill, a.pool_images), state=a.state, phase=a.phase,
        init_base=a.init_base, plan_unet_minutes=a.plan_unet_minutes, topk_weight=a.topk_weight,
        lowfreq_weight=a.lowfreq_weight, compile=a.compile, compile_mode=a.compile_mode, compile_cache=a.compile_cache,
        profile=a.profile, channels_last=a.channels_last,
    )  # fmt: skip
    if a.smoke:
        cfg = RunConfig(
            out=a.out, minutes_vae=0.5, minutes_unet=0.5, max_steps_vae=2, max_steps_unet=2, device=a.device,
            seed=a.seed, size=64, batch_vae=2, batch_unet=2, warmup_steps=1, workers=0, chunk=4, pool_images=16,
            min_fill=4, log_every=1, preview_steps=2, preview_scenes=1, tiny=True, state=a.state, phase=a.phase,
            init_base=a.init_base, plan_unet_minutes=a.plan_unet_minutes,
        )  # fmt: skip
    if cfg.phase in ("all", "export") and not cfg.out:
        p.error(f"--phase {cfg.phase} needs --out")
    if cfg.phase != "all" and not cfg.state:
        p.error(f"--phase {cfg.phase} needs --state")
    return cfg


class SceneStream(torch.utils.data.IterableDataset):
    """Endless batches of training scenes {"image": uint8 N×3×H×W, "ids": int64 N×L}, disjoint per worker."""

    def __init__(self, tokenizer: Any, size: int, chunk: int, max_length: int, offset: int, rank: int = 0,
                 ranks: int = 1) -> None:  # fmt: skip
        super().__init__()
        self.tokenizer, self.size, self.chunk, self.max_length, self.offset = tokenizer, size, chunk, max_length, offset
        self.rank, self.ranks = rank, ranks  # several training processes: each its own scenes

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        n_seeds = len(world.TRAIN_SEEDS)
        k = 0
        while True:
            start = self.offset + ((k * self.ranks + self.rank) * nw + wid) * self.chunk
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
        idx = (self.ptr + torch.arange(n, device=self.device)) % self.capacity  # made there: no host-device sync
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
    """Linear warm-up, then cosine decay to 10% over the plan; each call stops at its own budget.

    The plan is the cumulative training time of every call (`plan_seconds`); a resumed call passes
    the seconds and steps already done, so the learning rate continues where the last call left it.
    """

    def __init__(self, peak: float, warmup: int, seconds: float, max_steps: int, plan_seconds: float = 0.0,
                 before_seconds: float = 0.0, before_steps: int = 0, rewarm: int = 0) -> None:  # fmt: skip
        self.peak, self.warmup, self.seconds, self.max_steps = peak, warmup, seconds, max_steps
        self.rewarm = rewarm  # a fresh optimiser on trained weights (--init-base): ramp this call's first steps
        self.before_seconds, self.before_steps = before_seconds, before_steps
        self.plan = max(plan_seconds, before_seconds + seconds, 1e-9)
        self.start = time.perf_counter()
        self.agreed: float | None = None  # several ranks: the clock they last agreed on (Ranks.agree_clock)

    def live_elapsed(self) -> float:
        """Seconds of this call so far, by this process's clock."""
        return time.perf_counter() - self.start

    def elapsed(self) -> float:
        """Seconds of this call so far (the agreed clock when several ranks train: same lr, same stop)."""
        return self.live_elapsed() if self.agreed is None else self.agreed

    def progress(self, step: int) -> float:
        """Fraction of this call's budget done, in [0, 1] (time, or steps when max_steps is set)."""
        p = self.elapsed() / max(self.seconds, 1e-9)
        if self.max_steps:
            p = max(p, step / self.max_steps)
        return min(p, 1.0)

    def lr(self, step: int) -> float:
        """Learning rate at this call's `step`."""
        done = self.before_steps + step
        if done < self.warmup:
            return self.peak * (done + 1) / self.warmup
        frac = min((self.before_seconds + self.elapsed()) / self.plan, 1.0)
        if self.max_steps and self.plan == self.before_seconds + self.seconds:
            frac = max(frac, self.progress(step))
        ramp = min(1.0, (step + 1) / self.rewarm) if self.rewarm else 1.0
        return ramp * self.peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    def done(self, step: int) -> bool:
        """This call's budget spent (time, or max_steps when set)."""
        return self.progress(step) >= 1.0


@dataclass(frozen=True)
class Ranks:
    """This process among torchrun's (one per GPU): each trains on its own scenes with a share of the batch,
    gradients are averaged so every rank takes the same step, and rank 0 writes every file.

    Gradients are averaged by one flat all-reduce after the backward rather than by wrapping the networks in
    DistributedDataParallel: the UNet's forward and backward are compiled (with CUDA graphs under
    --compile-mode reduce-overhead), which DDP's bucket hooks would split, and the whole model is 16M
    parameters, one 64 MB all-reduce a step.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    every: int = 10  # steps between clock agreements

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def start(cfg: RunConfig) -> tuple[Ranks, torch.device]:
        """Join torchrun's process group when launched by it (WORLD_SIZE > 1); this process's device."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        device = torch.device(cfg.device)
        if world_size == 1:
            return Ranks(device=device), device
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        for name, batch in (("--batch-vae", cfg.batch_vae), ("--batch-unet", cfg.batch_unet)):
            if batch % world_size:
                raise SystemExit(f"{name} {batch} is the batch of all {world_size} processes together; "
                                 f"make it a multiple of {world_size}")  # fmt: skip
        ranks = Ranks(dist.get_rank(), world_size, device)
        logger.info("rank %d of %d on %s", ranks.rank, ranks.world, device)
        return ranks, device

    def batch(self, total: int) -> int:
        """This rank's share of a batch given for all ranks together."""
        return total // self.world

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Every rank's gradients → their mean, on every rank."""
        if self.world == 1:
            return
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(self.world)
        for g, avg in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(avg)

    def agree_clock(self, sched: Schedule, step: int) -> None:
        """Every `every` steps all ranks take the slowest rank's clock, so the lr and the stop are the same on all."""
        if self.world == 1 or step % self.every:
            return
        import torch.distributed as dist

        t = torch.tensor([sched.live_elapsed()], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        sched.agreed = float(t.item())

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (for the logged losses)."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        values = values.clone()
        dist.all_reduce(values)
        return values / self.world

    def broadcast(self, value: float) -> float:
        """Rank 0's value on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        return float(t.item())

    def check_in_step(self, params: list[torch.nn.Parameter], what: str) -> None:
        """Raise unless every rank holds the same weights (a cheap checksum of them all)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        total = torch.stack([p.detach().double().sum() for p in params]).sum()
        t = torch.stack([total, -total]).reshape(2)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if float(t[0]) != -float(t[1]):
            raise RuntimeError(f"the {what} weights differ between ranks: the training is broken")
        logger.info("%s: all %d ranks hold the same weights", what, self.world)

    def finish(self) -> None:
        """Wait for every rank, then leave the process group."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def save_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file, then rename: a killed call never leaves half a state."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, Any] | None:
    """A state written by save_state (tensors and plain data only), or None when absent."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copy of a module's state dict."""
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}


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


def train_vae(vae: torch.nn.Module, pool: Pool, producer: Producer, cfg: RunConfig, device: torch.device,
              resume: dict | None = None, ranks: Ranks = Ranks()) -> dict:  # fmt: skip
    """Phase 1: reconstruction (L1 + L2 + gradient L1 + worst-pixels L1 + low-frequency L1) + KL; returns the state.

    The worst-pixels term (mean error over each image's `topk_share` worst pixels) punishes the
    small saturated "beads" the v1 VAE painted: a few pixels far off cost little in a mean, a lot here.
    The low-frequency term (L1 between 16×16 average-pooled images) weighs what the first v2 VAE got
    wrong after the beads were gone: background tints shifted as a whole (green → beige), an error too
    small per pixel to compete with edges in the other terms.
    """
    vae.train().requires_grad_(True)
    params = list(vae.parameters())
    opt = _optimizer(params, cfg.lr_vae, 0.0, device)
    before_s, before_steps, log, rewarm = 0.0, 0, [], 0
    if resume is not None:
        if resume.get("opt") is not None:
            opt.load_state_dict(resume["opt"])
        before_s, before_steps, log = resume["seconds"], resume["steps"], list(resume["log"])
        rewarm = cfg.warmup_steps if resume.get("opt") is None and before_steps else 0
    sched = Schedule(cfg.lr_vae, cfg.warmup_steps, cfg.minutes_vae * 60, cfg.max_steps_vae,
                     before_seconds=before_s, before_steps=before_steps, rewarm=rewarm)  # fmt: skip
    acc = torch.zeros(6, device=device)
    step = 0
    while True:
        ranks.agree_clock(sched, step)
        if sched.done(step):
            break
        _refresh(pool, producer, cfg.refresh_batches)
        x = _as_float(pool.sample(ranks.batch(cfg.batch_vae))["image"])
        flip = torch.rand(x.shape[0], 1, 1, 1, device=device) < 0.5
        x = torch.where(flip, x.flip(-1), x)
        if device.type == "cuda" and cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for group in opt.param_groups:
            group["lr"] = sched.lr(step)
        with _autocast(device):
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample()).sample.float()
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        err = rec - x
        l1 = err.abs().mean()
        l2 = err.pow(2).mean()
        grad = (rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean()
        worst = err.abs().amax(dim=1).flatten(1)  # N × HW, the worst channel per pixel
        topk = worst.topk(max(1, int(cfg.topk_share * worst.shape[1])), dim=1).values.mean()
        low = (torch.nn.functional.avg_pool2d(rec, 16) - torch.nn.functional.avg_pool2d(x, 16)).abs().mean()
        loss = l1 + l2 + 0.5 * grad + cfg.topk_weight * topk + cfg.lowfreq_weight * low + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        ranks.average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        acc += torch.stack([loss.detach(), l1.detach(), l2.detach(), topk.detach(), kl.detach(), low.detach()])
        step += 1
        if step % cfg.log_every == 0 or sched.done(step):
            n = step % cfg.log_every or cfg.log_every
            vals = ranks.mean(acc / n).tolist()
            acc.zero_()
            entry = {"step": before_steps + step, "time_s": before_s + sched.elapsed(), "loss": vals[0], "l1": vals[1],
                     "l2": vals[2], "topk": vals[3], "kl": vals[4], "low": vals[5], "lr": sched.lr(step),
                     "pool_added": pool.added}  # fmt: skip
            log.append(entry)
            logger.info("vae %s", " ".join(f"{k}={v:.4g}" for k, v in entry.items()))
    vae.eval().requires_grad_(False)
    ranks.check_in_step(params, "VAE")
    return {"vae": _cpu_state(vae), "opt": opt.state_dict(), "steps": before_steps + step,
            "seconds": before_s + sched.elapsed(), "log": log, "call_steps": step, "call_seconds": sched.elapsed(),
            "final_loss": log[-1]["loss"] if log else float("nan")}  # fmt: skip


def posterior(vae: torch.nn.Module, device: torch.device) -> Any:
    """x in [-1, 1] → the VAE posterior's (mean, std), under the training's autocast."""

    def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _autocast(device):
            dist = vae.encode(x).latent_dist
        return dist.mean, dist.std

    return moments


class CompiledEncoder:
    """The frozen VAE's posterior through torch.compile, for the UNet phase's per-step encode of fresh images (eager,
    it was ~30 of a step's ~67 GPU-ms at batch 256: full-resolution group norms and layout copies between them); the
    first failure logs once and the rest of the call encodes eagerly."""

    def __init__(self, vae: torch.nn.Module, device: torch.device) -> None:
        self.eager = posterior(vae, device)
        self.compiled: Any = torch.compile(self.eager, dynamic=False)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception:  # noqa: BLE001 - a compile failure: encode eagerly, keep the call's minutes
                logger.exception("compiled VAE encoder failed; encoding eagerly")
                self.compiled = None
        return self.eager(x)


@torch.no_grad()
def encode_moments(vae: torch.nn.Module, images: torch.Tensor, device: torch.device, chunk: int = 256,
                   moments: Any = None) -> dict:
    """VAE posterior mean and std (bf16 on CUDA) of uint8 images, in chunks (`moments`: a `posterior`, e.g. compiled)."""
    moments = moments or posterior(vae, device)
    means, stds = [], []
    store = torch.bfloat16 if device.type == "cuda" else torch.float32
    for i in range(0, len(images), chunk):
        x = _as_float(images[i : i + chunk].to(device, non_blocking=True))  # pinned worker batches: no sync
        mean, std = moments(x)
        means.append(mean.to(store))
        stds.append(std.to(store))
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
    def load(self, shadow: list[torch.Tensor], n: int) -> None:
        """Continue from a saved average (same parameter order)."""
        for s, saved in zip(self.shadow, shadow, strict=True):
            s.copy_(saved)
        self.n = n

    @torch.no_grad()
    def copy_to(self, params: list[torch.nn.Parameter]) -> None:
        """Write the averaged weights into `params` (another module's parameters, same order)."""
        for s, p in zip(self.shadow, params, strict=True):
            p.copy_(s.to(p.dtype))


def train_unet(modules: dict[str, Any], pool: Pool, producer: Producer, cfg: RunConfig, device: torch.device,
               scale: float, resume: dict | None = None, ranks: Ranks = Ranks()) -> dict:  # fmt: skip
    """Phase 2: UNet + text encoder, ε-prediction MSE with min-SNR weighting and caption dropout; returns the state."""
    vae, unet, text = modules["vae"], modules["unet"], modules["text_encoder"]
    tokenizer = modules["tokenizer"]
    latents = Pool(max(pool.capacity * 2, 16), device)
    for i in range(0, pool.size, 1024):  # start from everything generated so far
        j = min(i + 1024, pool.size)
        latents.add({**encode_moments(vae, pool.data["image"][i:j], device), "ids": pool.data["ids"][i:j]})

    # fresh worker batches (`chunk` images each: one shape) are encoded every step: compiled with the UNet
    moments = CompiledEncoder(vae, device) if cfg.compile else posterior(vae, device)

    def encode(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**encode_moments(vae, batch["image"], device, moments=moments), "ids": batch["ids"]}

    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)  # fmt: skip
    acp = modules["scheduler"].alphas_cumprod.to(device=device, dtype=torch.float32)
    snr_all = acp / (1.0 - acp)
    unet.train().requires_grad_(True)
    text.train().requires_grad_(True)
    params = [p for m in (unet, text) for p in m.parameters()]
    opt = _optimizer(params, cfg.lr_unet, cfg.weight_decay, device)
    ema = Ema(params, cfg.ema_decay)
    before_s, before_steps, log, rewarm = 0.0, 0, [], 0
    if resume is not None:
        if resume.get("opt") is not None:
            opt.load_state_dict(resume["opt"])
        ema.load(resume["ema"], resume["ema_n"])
        before_s, before_steps, log = resume["seconds"], resume["steps"], list(resume["log"])
        rewarm = cfg.warmup_steps if resume.get("opt") is None and before_steps else 0
    sched = Schedule(cfg.lr_unet, cfg.warmup_steps, cfg.minutes_unet * 60, cfg.max_steps_unet,
                     plan_seconds=cfg.plan_unet_minutes * 60, before_seconds=before_s, before_steps=before_steps,
                     rewarm=rewarm)  # fmt: skip
    # what the step runs, best first; a compiled step that fails (forward or backward) falls back to the next
    # (compile errors surface at the first call), so a call never loses its minutes to a compiler problem
    denoiser = Denoiser(unet, text)  # the text encoder inside the compiled graph too (its casts and ~200 launches)
    forwards: list[Any] = [denoiser]
    if cfg.compile:
        load_compile_cache(cfg.compile_cache)
        forwards[:0] = [torch.compile(denoiser, mode=m) for m in dict.fromkeys((cfg.compile_mode, "default"))]
    forward = forwards.pop(0)
    graphed = forward if forward is not denoiser and cfg.compile_mode == "reduce-overhead" and device.type == "cuda" else None
    acc = torch.zeros(1, device=device)
    step = 0
    profiler = StepProfiler(cfg.profile if ranks.main else "", first=30, steps=10)
    while True:
        ranks.agree_clock(sched, step)
        if sched.done(step):
            break
        profiler.at(step)
        if forward is graphed:  # CUDA graphs: a new iteration, the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        _refresh(latents, producer, cfg.refresh_batches_unet, encode)
        b = latents.sample(ranks.batch(cfg.batch_unet))
        z = (b["mean"].float() + b["std"].float() * torch.randn_like(b["mean"].float())) * scale
        drop = torch.rand(z.shape[0], device=device) < cfg.caption_dropout
        ids = torch.where(drop[:, None], empty.expand_as(b["ids"]), b["ids"])
        noise = torch.randn_like(z)
        t = torch.randint(0, len(acp), (z.shape[0],), device=device)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1.0 - a).sqrt() * noise
        if device.type == "cuda" and cfg.channels_last:
            zt = zt.contiguous(memory_format=torch.channels_last)
        for group in opt.param_groups:
            group["lr"] = sched.lr(step)
        while True:
            try:
                loss = _unet_loss(forward, zt, t, ids, noise, snr_all, cfg.snr_gamma, device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                break
            except Exception:  # noqa: BLE001 - a compile failure (forward or backward): fall back, keep the call
                if not forwards:
                    raise
                forward = forwards.pop(0)
                logger.exception("compiled UNet failed; falling back to %s",
                                 "eager" if forward is denoiser else "torch.compile's default mode")  # fmt: skip
        ranks.average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        acc += loss.detach()
        step += 1
        if step == 3 and forward is not denoiser and ranks.main:  # forward and backward graphs exist now
            save_compile_cache(cfg.compile_cache)
        if step % cfg.log_every == 0 or sched.done(step):
            n = step % cfg.log_every or cfg.log_every
            entry = {"step": before_steps + step, "time_s": before_s + sched.elapsed(), "loss": float(ranks.mean(acc).item() / n),
                     "lr": sched.lr(step), "pool_added": latents.added}  # fmt: skip
            acc.zero_()
            log.append(entry)
            logger.info("unet %s", " ".join(f"{k}={v:.4g}" for k, v in entry.items()))
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    ranks.check_in_step(params, "UNet and text encoder")
    return {"unet": _cpu_state(unet), "text_encoder": _cpu_state(text), "ema": [s.cpu() for s in ema.shadow],
            "ema_n": ema.n, "opt": opt.state_dict(), "steps": before_steps + step, "seconds": before_s + sched.elapsed(),
            "log": log, "call_steps": step, "call_seconds": sched.elapsed(), "samples_per_step": cfg.batch_unet,
            "final_loss": log[-1]["loss"] if log else float("nan")}  # fmt: skip


class Denoiser(torch.nn.Module):
    """Text encoder and UNet as one module (what the training step compiles): (noisy latents, timesteps, token ids) →
    the UNet's output."""

    def __init__(self, unet: torch.nn.Module, text: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.text = text

    def forward(self, zt: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> Any:
        return self.unet(zt, t, self.text(ids)[0])


def _unet_loss(forward: Any, zt: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, noise: torch.Tensor,
               snr_all: torch.Tensor, snr_gamma: float, device: torch.device) -> torch.Tensor:
    """ε-prediction MSE of one batch (`forward`: a `Denoiser`, maybe compiled), min-SNR-γ weighted (γ = 0: plain MSE)."""
    with _autocast(device):
        pred = forward(zt, t, ids).sample.float()
    per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
    if snr_gamma > 0:
        snr = snr_all[t]
        per = per * torch.clamp(snr, max=snr_gamma) / snr
    return per.mean()


class StepProfiler:
    """torch.profiler over `steps` training steps from step `first`; tables by device and by host time to a file."""

    def __init__(self, path: str, first: int, steps: int) -> None:
        self.path, self.first, self.last = path, first, first + steps
        self.prof: Any = None
        self.t0 = 0.0

    def at(self, step: int) -> None:
        """Call at the top of every step."""
        if not self.path:
            return
        if step == self.first and self.prof is None:
            kinds = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                kinds.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=kinds)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif step == self.last and self.prof is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ms = (time.perf_counter() - self.t0) * 1000 / (self.last - self.first)
            self.prof.__exit__(None, None, None)
            table = self.prof.key_averages()
            by_device = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            text = (f"{ms:.1f} ms per step (wall, profiled steps {self.first}-{self.last - 1})\n\n"
                    f"by device time:\n{table.table(sort_by=by_device, row_limit=30)}\n\n"
                    f"by host time:\n{table.table(sort_by='cpu_time_total', row_limit=30)}\n")  # fmt: skip
            Path(self.path).write_text(text, encoding="utf-8")
            logger.info("profile of steps %d-%d (%.1f ms/step) written to %s", self.first, self.last - 1, ms, self.path)
            self.prof, self.path = None, ""


def load_compile_cache(path: str) -> None:
    """Hand torch the compile artefacts of an earlier machine (same torch and GPU kind): minutes of compiling saved."""
    if not path or not Path(path).is_file():
        return
    try:
        info = torch.compiler.load_cache_artifacts(Path(path).read_bytes())
    except Exception as exc:  # noqa: BLE001 - a stale or foreign file only means compiling from scratch
        info, why = None, str(exc)
    else:
        why = "torch rejected it"
    if info is None:
        logger.warning("compile artefacts in %s not usable (%s); compiling from scratch", path, why)
    else:
        logger.info("compile artefacts loaded from %s", path)


def save_compile_cache(path: str) -> None:
    """Write torch's portable compile artefacts of this process (atomically), for the next machine."""
    if not path:
        return
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        logger.warning("torch returned no compile artefacts to save")
        return
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_bytes(saved[0])
    tmp.replace(path)
    logger.info("compile artefacts written to %s (%.1f MB)", path, len(saved[0]) / 1e6)


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


def _load_pipeline_weights(modules: dict[str, Any], folder: str) -> float:
    """Load a saved pipeline folder's VAE, UNet and text encoder weights (fp32) into `modules`; its scaling factor."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = Path(folder)
    vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32)
    modules["vae"].load_state_dict(vae.state_dict())
    modules["unet"].load_state_dict(UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=torch.float32).state_dict())
    modules["text_encoder"].load_state_dict(
        CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=torch.float32).state_dict()
    )
    return float(vae.config.scaling_factor)


def _done_before(folder: Path) -> dict[str, dict[str, Any]]:
    """Steps, seconds and loss log of each phase, from an exported folder's train_log.json (zeros without one)."""
    log_path = folder / "train_log.json"
    logs = json.loads(log_path.read_text(encoding="utf-8")) if log_path.is_file() else {}
    return {
        phase: {"steps": int(logs.get(phase, {}).get("steps", 0)), "seconds": float(logs.get(phase, {}).get("seconds", 0.0)),
                "log": list(logs.get(phase, {}).get("log", []))}
        for phase in ("vae", "unet")
    }  # fmt: skip


def _architecture(cfg: RunConfig, state_dir: Path | None) -> DemoBaseConfig:
    """The state's architecture when resuming (it wins over flags), else the flags' (or the init folder's)."""
    for folder in (state_dir, Path(cfg.init_base) if cfg.init_base else None):
        if folder is not None and (folder / "demo_config.json").is_file():
            return DemoBaseConfig.from_dict(json.loads((folder / "demo_config.json").read_text()))
    return DemoBaseConfig.tiny(cfg.size) if cfg.tiny else DemoBaseConfig(image_size=cfg.size)


def _start_data(cfg: RunConfig, tokenizer: Any, device: torch.device, offset: int,
                ranks: Ranks = Ranks()) -> tuple[Producer, Pool, float]:  # fmt: skip
    """Scene workers (forked before CUDA starts) and a device pool filled with the first scenes."""
    t0 = time.perf_counter()
    workers = cfg.workers if cfg.workers >= 0 else max(1, min(14, ((os.cpu_count() or 2) - 2) // ranks.world))
    stream = SceneStream(tokenizer, cfg.size, cfg.chunk, tokenizer.model_max_length, world.TRAIN_SEEDS.start + offset,
                         ranks.rank, ranks.world)  # fmt: skip
    producer = Producer(stream, workers, pin=device.type == "cuda")
    pool = Pool(cfg.pool_images, device)
    while pool.size < min(cfg.min_fill, cfg.pool_images):
        pool.add(producer.get())
    fill_s = time.perf_counter() - t0
    logger.info("pool filled with %d scenes from %d workers after %.1f s", pool.size, workers, fill_s)
    return producer, pool, fill_s


def main(argv: list[str] | None = None) -> dict:
    """Run the asked phase(s); `all` trains both phases and exports in one call (the one-shot run)."""
    cfg = parse_args(argv)
    t0 = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ranks, device = Ranks.start(cfg)
    try:
        return _run(cfg, argv, ranks, device, t0)
    finally:
        ranks.finish()


def _run(cfg: RunConfig, argv: list[str] | None, ranks: Ranks, device: torch.device, t0: float) -> dict:
    """main() in one process of one or several (rank 0 writes the state, the log and the export)."""
    torch.manual_seed(cfg.seed)
    state_dir = Path(cfg.state) if cfg.state else None
    if state_dir is not None and ranks.main:
        state_dir.mkdir(parents=True, exist_ok=True)
    arch = _architecture(cfg, state_dir)
    modules = build_demo_base(cfg.seed, arch)
    if ranks.world > 1:  # the same initial weights on every rank; then each its own noise, timesteps and draws
        torch.manual_seed(cfg.seed + 1000 * ranks.rank)
    tokenizer = modules["tokenizer"]
    vae_state = load_state(state_dir / "vae.pt") if state_dir else None
    unet_state = load_state(state_dir / "unet.pt") if state_dir else None
    scale = None
    if vae_state is None and unet_state is None and cfg.init_base:
        scale = _load_pipeline_weights(modules, cfg.init_base)
        logger.info("new state from %s (its EMA weights become weights and EMA)", cfg.init_base)
        done = _done_before(Path(cfg.init_base))  # its steps and seconds: the lr plan continues where it was
        vae_state = {"vae": _cpu_state(modules["vae"]), "opt": None, **done["vae"], "scaling_factor": scale,
                     "init_base": cfg.init_base}  # fmt: skip
        if done["unet"]["steps"]:  # an export of a VAE-only state holds the UNet's initial weights: no EMA of those
            params = [p for m in (modules["unet"], modules["text_encoder"]) for p in m.parameters()]
            unet_state = {"unet": _cpu_state(modules["unet"]), "text_encoder": _cpu_state(modules["text_encoder"]),
                          "ema": [p.detach().float().clone() for p in params], "ema_n": 10_000, "opt": None,
                          **done["unet"], "init_base": cfg.init_base}  # fmt: skip
        if state_dir is not None and ranks.main:  # later calls of this state (a VAE call first, say) resume from here
            save_state(state_dir / "vae.pt", vae_state)
            if unet_state is not None:
                save_state(state_dir / "unet.pt", unet_state)
    if vae_state is not None:
        modules["vae"].load_state_dict(vae_state["vae"])
        scale = vae_state.get("scaling_factor")
    if unet_state is not None:
        modules["unet"].load_state_dict(unet_state["unet"])
        modules["text_encoder"].load_state_dict(unet_state["text_encoder"])
    if state_dir is not None and ranks.main:
        (state_dir / "demo_config.json").write_text(json.dumps(arch.to_dict(), indent=2) + "\n", encoding="utf-8")
    run_log: dict[str, Any] = {"run": asdict(cfg), "architecture": arch.to_dict(), "parameters": count_parameters(modules),
                               "processes": ranks.world}  # fmt: skip

    if cfg.phase in ("all", "vae", "unet"):
        if cfg.phase == "unet" and scale is None:
            raise SystemExit("--phase unet needs a trained VAE in the state (run --phase vae first, or --init-base)")
        done_before = (vae_state or {}).get("steps", 0) * cfg.batch_vae + (unet_state or {}).get("steps", 0) * 64
        producer, pool, fill_s = _start_data(cfg, tokenizer, device, done_before % len(world.TRAIN_SEEDS), ranks)
        run_log["pool_fill_s"] = fill_s
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        for name in ("vae", "unet", "text_encoder"):
            modules[name].to(device)
            if device.type == "cuda" and cfg.channels_last and name != "text_encoder":
                modules[name].to(memory_format=torch.channels_last)
        run_log["device"] = (f"{ranks.world}× " if ranks.world > 1 else "") + (
            torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
        try:
            if cfg.phase in ("all", "vae"):
                vae_state = train_vae(modules["vae"], pool, producer, cfg, device, vae_state, ranks)
                scale = ranks.broadcast(scaling_factor(modules["vae"], pool, device))
                modules["vae"].register_to_config(scaling_factor=scale)
                vae_state["scaling_factor"] = scale
                logger.info("latent scaling factor %.5f", scale)
                if state_dir is not None and ranks.main:
                    save_state(state_dir / "vae.pt", vae_state)
                run_log["vae"] = {k: v for k, v in vae_state.items() if k not in ("vae", "opt")}
            if cfg.phase in ("all", "unet"):
                unet_state = train_unet(modules, pool, producer, cfg, device, scale, unet_state, ranks)
                if state_dir is not None and ranks.main:
                    save_state(state_dir / "unet.pt", unet_state)
                run_log["unet"] = {k: v for k, v in unet_state.items() if k not in ("unet", "text_encoder", "ema", "opt")}
        finally:
            run_log["scenes_generated"] = producer.produced
            producer.close()
    run_log["versions"] = {"torch": torch.__version__, "python": sys.version.split()[0], **_versions()}
    if not ranks.main:  # the other ranks only trained
        return run_log
    if state_dir is not None:  # one line per call, so every call of a long training is on record
        with open(state_dir / "calls.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"phase": cfg.phase, "wall_s": time.perf_counter() - t0,
                                **{k: run_log[k] for k in ("vae", "unet", "device") if k in run_log},
                                "argv": argv if argv is not None else sys.argv[1:]}, default=str) + "\n")  # fmt: skip

    if cfg.phase not in ("all", "export"):
        logger.info("%s phase done in %.1f s", cfg.phase, time.perf_counter() - t0)
        return run_log
    if scale is None:
        raise SystemExit("nothing to export: the state has no trained VAE (run --phase vae first)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    final = dict(modules)
    final["vae"] = copy.deepcopy(modules["vae"]).cpu()
    final["vae"].register_to_config(scaling_factor=scale)
    for name in ("unet", "text_encoder"):
        final[name] = copy.deepcopy(modules[name]).cpu()
    if unet_state is not None:  # else (a VAE-only state) the UNet and text encoder keep their initial weights
        params = [p for m in (final["unet"], final["text_encoder"]) for p in m.parameters()]
        for p, s in zip(params, unet_state["ema"], strict=True):
            p.data.copy_(s.to(p.dtype))
    save_demo_base(final, out, torch.float16, arch)
    log: dict[str, Any] = {
        **run_log,
        "scaling_factor": scale,
        "vae": {k: v for k, v in (vae_state or {}).items() if k not in ("vae", "opt")},
        "unet": {k: v for k, v in (unet_state or {}).items() if k not in ("unet", "text_encoder", "ema", "opt")},
    }
    log["train_wall_s"] = time.perf_counter() - t0
    (out / "train_log.json").write_text(json.dumps(log, indent=1, default=str) + "\n", encoding="utf-8")
    if cfg.preview_scenes > 0 and unet_state is not None:
        try:  # the weights are saved already: a failing preview must not lose the run
            log["preview"] = preview(out, cfg, device)
        except Exception as exc:  # noqa: BLE001 - reported in the log, the run itself succeeded
            logger.exception("preview failed")
            log["preview"] = {"error": repr(exc)}
    log["total_wall_s"] = time.perf_counter() - t0
    (out / "train_log.json").write_text(json.dumps(log, indent=1, default=str) + "\n", encoding="utf-8")
    logger.info("done in %.1f s: %s", log["total_wall_s"], out)
    return log


def _versions() -> dict[str, str]:
    """diffusers and transformers versions, for the log."""
    import diffusers
    import transformers

    return {"diffusers": diffusers.__version__, "transformers": transformers.__version__}


if __name__ == "__main__":
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun the other ranks log warnings only
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    main()
