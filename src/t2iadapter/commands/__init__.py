"""Sub-commands of the `t2iadapter` CLI: one module each, discovered by `t2iadapter.cli`."""
from __future__ import annotations

import re

from t2iadapter.errors import ConfigError

DEMO_BASE = "demo"  # the --base every command defaults to: the embedded demo base (assets/demo)


def add_base_arguments(p) -> None:
    """`--base` and `--config-dir` of the commands that load any base (an offline single file needs its configs)."""
    p.add_argument("--base", default=DEMO_BASE,
                   help="base model: demo (default), tiny, tiny-xl, a diffusers folder, .safetensors/.ckpt or a hub id")
    p.add_argument("--config-dir", default=None, help="diffusers configs for an offline single-file base")


def add_threads_argument(p) -> None:
    """`--threads N` on every command that runs a model; `t2iadapter.cli` applies it before the command runs."""
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's own; on a busy shared CPU, 1 can be several times faster)")


FAST_CHOICES = ("auto", "bf16", "fp16", "fp32", "fp8")  # --fast [PRECISION]; auto: bf16/fp16 on a GPU, fp32 on the CPU


def add_fast_arguments(p, what: str) -> None:
    """`--fast [PRECISION]`, `--aot` and `--cache-dir DIR` (issue 18): fast mode, how it compiles the UNet, where its
    compiled graphs are kept."""
    p.add_argument("--fast", nargs="?", const="auto", default=None, choices=FAST_CHOICES, metavar="PRECISION",
                   help=f"fast mode {what}: half precision, channels-last, torch.compile; PRECISION is auto (default: "
                   "bf16/fp16 on a GPU, fp32 on the CPU), bf16, fp16, fp32 or fp8 (GPUs of compute capability 8.9+, "
                   "needs torchao)")
    add_aot_argument(p, "with --fast: ")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="folder of fast mode's compiled graphs (default: $T2IADAPTER_COMPILE_CACHE, else "
                   "~/.cache/t2iadapter/compiled); written after a compile, loaded before the next one")


def add_aot_argument(p, when: str = "") -> None:
    """`--aot`: fast mode's UNet as an AOTInductor package (`optimize(aot=True)`); unset: $T2IADAPTER_AOT decides."""
    p.add_argument("--aot", action="store_const", const=True, default=None,
                   help=f"{when}the UNet as an AOTInductor package (a new process loads it without tracing; "
                   "no CUDA graphs, VAE decoder and adapters eager; default: $T2IADAPTER_AOT)")


def check_fast_arguments(args) -> None:
    """--aot only means something in fast mode: one clear line otherwise."""
    if args.aot and not args.fast:
        raise ConfigError("--aot compiles fast mode's UNet with AOTInductor; add --fast")


def fast_precision(value: str | None) -> str | None:
    """The `precision=` of `optimize()` for a --fast value (None: the device's default)."""
    return None if value in (None, "auto") else value


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_adapters(specs: list[str], flag: str = "--adapter") -> dict[str, str]:
    """`NAME=PATH` (or a bare source, named after its file stem) → {name: source}; every `--adapter` option and
    `--controlnet` use it."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep:
            source = spec
            name = spec.rstrip("/").rsplit("/", 1)[-1].split(".")[0]
        if not NAME.match(name) or not source:
            raise ConfigError(f"{flag} {spec!r}: give NAME=PATH with a NAME of letters, digits, '_', '-', '.'")
        if name in adapters:
            raise ConfigError(f"{flag}: the name {name!r} is registered twice")
        adapters[name] = source
    return adapters
