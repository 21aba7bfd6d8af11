"""Training a ControlNet with the adapters' trainer (issue 16, `kind: controlnet`): the trainable module, its files.

The ControlNet starts as a copy of the base UNet's encoder with zero-initialised output convs
(`ControlNetModel.from_unet`, the ControlNet paper §3.2), in fp32, while the base stays frozen. It
trains with the same data, recipe, checkpoints and resume as an adapter; only the step differs: it
runs on the noisy latents, timestep and context and hands the UNet its residuals (`unet_forward(control=...)`).
Checkpoints hold our single file (safetensors, diffusers' key names, the ControlNet config JSON in
the metadata); the final output adds diffusers' `save_pretrained` folder, which diffusers' ControlNet
pipelines and `AdapterPipeline(controlnets=...)` load.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2iadapter.errors import ConfigError
from t2iadapter.generation.controlnet import METADATA_KEY, read_single_file


class TrainableControlNet(nn.Module):
    """A diffusers `ControlNetModel` with the interface the trainer's modules share (`kind`, `config`, `save_file`,
    `save_pretrained`); `forward(condition, sample, t, context, added)` → (down residuals, mid residual)."""

    kind = "controlnet"

    def __init__(self, controlnet: Any) -> None:
        super().__init__()
        self.controlnet = controlnet

    @property
    def config(self) -> dict[str, Any]:
        plain = {k: v for k, v in dict(self.controlnet.config).items() if not k.startswith("_")}
        return json.loads(json.dumps(plain))  # lists, not tuples: equal to the config read back from a file

    def forward(self, condition: torch.Tensor, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                added: dict[str, torch.Tensor] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        from t2iadapter.generation.controlnet import residuals

        return residuals(self.controlnet, sample, t, context, condition, 1.0, added)

    def save_file(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Our single file: safetensors with diffusers' keys and the config JSON in the metadata (atomic)."""
        from t2iadapter.models.saving import _atomic_save_safetensors, _check_target

        path = Path(path)
        _check_target(path, overwrite)
        _atomic_save_safetensors(self.controlnet.state_dict(), path, {"format": "pt", METADATA_KEY: json.dumps(self.config)})
        return path

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """diffusers' folder (config.json + diffusion_pytorch_model.safetensors)."""
        from t2iadapter.models.saving import _check_target

        directory = Path(directory)
        _check_target(directory, overwrite)
        self.controlnet.save_pretrained(directory)
        return directory


def build(spec: Any, unet: Any, vae_scale_factor: int) -> TrainableControlNet:
    """A fresh ControlNet from the base UNet (`spec.in_channels` condition channels), or `spec.init_from` (any
    format diffusers reads, or our single file), in fp32."""
    from t2iadapter.generation.controlnet import check_fits, controlnet_from_unet, load_controlnet

    if spec.init_from:
        module = TrainableControlNet(load_controlnet(spec.init_from))
    else:
        module = TrainableControlNet(controlnet_from_unet(unet, vae_scale_factor, conditioning_channels=spec.in_channels))
    if module.controlnet.config.conditioning_channels != spec.in_channels:
        raise ConfigError(f"ControlNet {spec.condition!r} takes {module.controlnet.config.conditioning_channels}-channel "
                          f"conditions; the config says in_channels {spec.in_channels}")
    check_fits(unet, module.controlnet, spec.condition)
    return module.float().requires_grad_(True)


def load_file(path: str | Path) -> TrainableControlNet:
    """Our single ControlNet file (a checkpoint's `controlnet.safetensors`)."""
    return TrainableControlNet(read_single_file(path))


__all__ = ["METADATA_KEY", "TrainableControlNet", "build", "load_file"]
