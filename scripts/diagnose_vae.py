"""How faithfully a demo VAE reconstructs held-out world scenes: PSNR, beads, background, edges.

    python scripts/diagnose_vae.py src/t2iadapter/assets/demo/base/vae --scenes 64 --grid docs/demo/vae-v1.png

Encodes and decodes held-out scenes (world.EVAL_SEEDS, never seen in training) with the VAE alone
(posterior mean, no diffusion) and prints one row of measures: PSNR (mean / 10th percentile / min),
the mean absolute error on true-background pixels, the share of true-background pixels the
reconstruction paints as foreground (the "beads": `evaluation.spurious_foreground`), structure IoU
and edge F1 of the reconstruction. Whatever the diffusion model does, it cannot beat these numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    import t2iadapter  # noqa: F401 - installed (pip install -e .)
except ImportError:  # a bare checkout, e.g. on the GPU machine: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from t2iadapter.demo import world  # noqa: E402
from t2iadapter.evaluation import edge_f1, spurious_foreground, structure_iou  # noqa: E402


@torch.no_grad()
def reconstruct(vae: torch.nn.Module, images: np.ndarray, device: torch.device, chunk: int = 32) -> np.ndarray:
    """uint8 N×H×W×3 → the VAE's reconstruction of each (posterior mean), uint8."""
    out = []
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(images[i : i + chunk]).permute(0, 3, 1, 2).to(device).float() / 127.5 - 1.0
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((rec.clamp(-1, 1) + 1) * 127.5 + 0.5).byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def measure(vae: torch.nn.Module, scenes: list[world.Scene], device: torch.device) -> tuple[dict, np.ndarray]:
    """The measures over `scenes`, and the reconstructions."""
    images = np.stack([s.image for s in scenes])
    rec = reconstruct(vae, images, device)
    err = rec.astype(np.float32) - images.astype(np.float32)
    mse = (err**2).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))
    bg_err = [np.abs(e[~s.mask]).mean() / 255.0 for e, s in zip(err, scenes, strict=True)]
    row = {
        "scenes": len(scenes),
        "psnr_mean": float(psnr.mean()),
        "psnr_p10": float(np.percentile(psnr, 10)),
        "psnr_min": float(psnr.min()),
        "background_abs_err": float(np.mean(bg_err)),
        "spurious_foreground": float(np.mean([spurious_foreground(r, s) for r, s in zip(rec, scenes, strict=True)])),
        "structure_iou": float(np.mean([structure_iou(r, s) for r, s in zip(rec, scenes, strict=True)])),
        "edge_f1": float(np.mean([edge_f1(r, s) for r, s in zip(rec, scenes, strict=True)])),
        "edge_f1_of_the_scene_itself": float(np.mean([edge_f1(s.image, s) for s in scenes])),
    }
    return row, rec


def grid(scenes: list[world.Scene], rec: np.ndarray, cols: int = 8) -> np.ndarray:
    """Scene above reconstruction, `cols` pairs per row."""
    tiles = [np.concatenate([s.image, r], axis=0) for s, r in zip(scenes, rec, strict=True)][: cols * 2]
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    return np.concatenate([np.concatenate(tiles[i : i + cols], axis=1) for i in range(0, len(tiles), cols)], axis=0)


def main(argv: list[str] | None = None) -> dict:
    """Load the VAE folder, measure, print one JSON row (and save the grid when asked)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("vae", help="a diffusers AutoencoderKL folder (e.g. src/t2iadapter/assets/demo/base/vae), "
                   "or a train_demo_base.py --state folder (its vae.pt)")
    p.add_argument("--scenes", type=int, default=64, help="held-out scenes (world.EVAL_SEEDS from the start)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid", help="save scenes over reconstructions as this PNG")
    p.add_argument("--json", help="also write the row to this file")
    a = p.parse_args(argv)
    from diffusers import AutoencoderKL

    torch.set_grad_enabled(False)
    device = torch.device(a.device)
    source = Path(a.vae)
    if (source / "vae.pt").is_file():  # a training state: the architecture beside it, fp32 weights inside
        from t2iadapter.demo.architecture import DemoBaseConfig, vae_config

        arch = DemoBaseConfig.from_dict(json.loads((source / "demo_config.json").read_text()))
        vae = AutoencoderKL(**vae_config(arch))
        vae.load_state_dict(torch.load(source / "vae.pt", map_location="cpu", weights_only=True)["vae"])
    else:
        vae = AutoencoderKL.from_pretrained(source, torch_dtype=torch.float32)
    vae = vae.to(device).eval()
    scenes = [world.generate(s, a.size) for s in world.EVAL_SEEDS[: a.scenes]]
    start = time.perf_counter()
    row, rec = measure(vae, scenes, device)
    row["seconds"] = time.perf_counter() - start
    print(json.dumps(row))
    if a.json:
        Path(a.json).write_text(json.dumps(row, indent=1) + "\n", encoding="utf-8")
    if a.grid:
        from PIL import Image

        Image.fromarray(grid(scenes, rec)).save(a.grid)
    return row


if __name__ == "__main__":
    main()
