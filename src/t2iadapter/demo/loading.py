"""The embedded demo model with its shipped adapters (and ControlNets, when asked), as one pipeline."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from t2iadapter import assets


def demo_pipeline(adapters: list[str] | None = None, *, device: str | None = None, dtype=None,
                  controlnets: Mapping[str, Any] | None = None, fuser: Any = None):
    """`AdapterPipeline` on the shipped demo base with the shipped adapters (and `fuser`, default the shipped one
    if shipped); `controlnets`: {name: source} to load beside them (e.g. {"controlnet-sketch": "demo/controlnet-sketch"})."""
    import torch

    from t2iadapter.generation.pipeline import AdapterPipeline

    names = [n for n in assets.demo_adapter_names() if n != "fuser"]
    chosen = names if adapters is None else adapters
    if fuser is None:
        fuser = "demo/fuser" if "fuser" in assets.demo_adapter_names() else None
    pipe = AdapterPipeline.from_pretrained("demo", {n: f"demo/{n}" for n in chosen}, fuser=fuser,
                                           device=device or "cpu", dtype=dtype or torch.float32,
                                           controlnets=dict(controlnets or {}))
    if pipe.device.type == "cpu":
        # fp32 stays; channels-last convs and fused attention make a 256² image ~25% faster on 2 cores
        pipe.optimize(compile=False)
    return pipe


def shipped_controlnets() -> dict[str, str]:
    """{name: "demo/<name>"} of the ControlNets shipped with the demo (empty until one is shipped)."""
    return {n: f"demo/{n}" for n in assets.demo_controlnet_names()}
