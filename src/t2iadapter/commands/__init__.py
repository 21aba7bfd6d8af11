"""Sub-commands of the `t2iadapter` CLI: one module each, discovered by `t2iadapter.cli`."""
from __future__ import annotations

import re

from t2iadapter.errors import ConfigError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_adapters(specs: list[str], flag: str = "--adapter") -> dict[str, str]:
    """`NAME=PATH` (or a bare source, named after its file stem) → {name: source}; `serve`, `eval` and (for
    `--controlnet`) `generate` use it."""
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
