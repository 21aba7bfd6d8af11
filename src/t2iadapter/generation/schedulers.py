"""Schedulers by name: a fresh diffusers scheduler configured like the base's own (betas, prediction type)."""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from t2iadapter.errors import ConfigError

# name → (diffusers scheduler class name, extra config); aliases map the names people use.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    # few-step distilled sampling (LCM / LCM-LoRA, TCD-LoRA): 2-8 steps, guidance_scale <= 1 (no CFG branch);
    # for "tcd" the request's `eta` is TCD's gamma (0: deterministic; TCD's authors suggest 0.3)
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
_ALIASES = {"euler a": "euler_a", "euler_ancestral": "euler_a", "dpm++ 2m": "dpm++2m", "dpmpp_2m": "dpm++2m",
            "dpm++ 2m karras": "dpm++2m_karras", "dpmpp_2m_karras": "dpm++2m_karras", "uni_pc": "unipc"}


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def scheduler_key(name: str) -> str:
    """The `SCHEDULERS` key of a name or alias (any case); ConfigError naming the choices for another name."""
    key = _ALIASES.get(name.lower().strip(), name.lower().strip())
    if key not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return key


def make_scheduler(name: Any, base_scheduler: Any):
    """A fresh scheduler of the named kind (None: the base's own kind), configured like the base's.

    A diffusers scheduler object instead of a name is used as diffusers users pass one: a fresh copy of its
    own kind and config (the object itself keeps no state from this call).
    """
    if name is None:
        return type(base_scheduler).from_config(base_scheduler.config)
    if not isinstance(name, str):
        return type(name).from_config(name.config)
    config: Mapping[str, Any] = base_scheduler.config
    return scheduler_class(name, base_scheduler).from_config(dict(config), **SCHEDULERS[scheduler_key(name)][1])


def scheduler_class(name: Any, base_scheduler: Any) -> type:
    """The class `make_scheduler` makes for `name` (what its `step` takes can be read without building one)."""
    if name is None:
        return type(base_scheduler)
    if not isinstance(name, str):
        return type(name)
    import diffusers

    return getattr(diffusers, SCHEDULERS[scheduler_key(name)][0])


def step_kwargs(scheduler: Any, generator: Any, eta: float) -> dict[str, Any]:
    """`eta` and `generator` for schedulers whose `step` takes them (as diffusers' pipelines pass them)."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs
