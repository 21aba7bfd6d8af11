"""Seeded tiny adapters and conditions shared by the tests that compare with diffusers (not a test module)."""
import numpy as np
import torch
from PIL import Image

from t2iadapter.bases import tiny_adapter_config
from t2iadapter.formats import ours_to_diffusers
from t2iadapter.models import build_adapter

PROMPT = "a large red star left of a small blue circle"  # words the tiny bases' tokenizers know


def random_adapter(base, in_channels, seed):
    """A full adapter that fits `base`, seeded, with weights ×3 so it visibly changes the output."""
    torch.manual_seed(seed)
    module = build_adapter(tiny_adapter_config(base, in_channels)).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(3.0)
    return module


def as_diffusers(module):
    """The same adapter as diffusers' `T2IAdapter` (weights mapped, not re-drawn)."""
    from diffusers import T2IAdapter

    cfg = module.config
    d = T2IAdapter(in_channels=cfg.in_channels, channels=list(cfg.channels), num_res_blocks=cfg.num_res_blocks,
                   downscale_factor=cfg.downscale_factor, adapter_type="full_adapter_xl" if cfg.kind == "full_xl" else "full_adapter")
    d.load_state_dict(ours_to_diffusers(module.state_dict(), cfg))
    return d.eval()


def condition(size, mode, seed):
    """A seeded random condition image, `mode` "L" or "RGB"."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
