"""Sub-commands of the `t2iadapter` CLI: one module each, discovered by `t2iadapter.cli`."""
from __future__ import annotations

import re

from t2iadapter.errors import ConfigError

DEMO_BASE = "demo"  # the --base every command defaults to: the embedded demo base (assets/demo)


def add_threads_argument(p) -> None:
    """`--threads N` on every command that runs a model; `t2iadapter.cli` applies it before the command runs."""
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's own; on a busy shared CPU, 1 can be several times faster)")


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
