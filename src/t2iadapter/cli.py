"""The `t2iadapter` console script.

Each sub-command lives in its own module under `t2iadapter.commands` and exposes
`register(subparsers)`, which adds its parser and sets `func`. Modules import their heavy
dependencies inside `func`, so `t2iadapter --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from t2iadapter import commands
from t2iadapter.errors import ConfigError, T2IAdapterError, out_of_memory


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (not the 12-line usage block), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="t2iadapter",
        description="T2I-Adapter: structural and style control for Stable Diffusion models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def quiet_loaded_libraries() -> None:
    """transformers and diffusers read HF_HUB_DISABLE_PROGRESS_BARS when imported; where main() runs in a process
    that imported them before (an embedding program, a test run), their loading bars are turned off directly."""
    for name in ("transformers", "diffusers"):
        if name in sys.modules:
            importlib.import_module(f"{name}.utils.logging").disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # sub-command parsers are `Parser`s too (argparse copies the class)
    except SystemExit as exc:  # a usage error (already printed) or --help
        return exc.code if isinstance(exc.code, int) else 2
    if not args.verbose:
        # Library chatter (dtype advisories, loading bars) is not what a person running a command needs.
        for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
            os.environ.setdefault(var, "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        quiet_loaded_libraries()  # the variables are read at import: a process that imported them already
        # torchao (the fp8 extra) is imported by diffusers whenever it is installed; its import notices (C++
        # extensions for other torch builds, pytree registrations) and a CUDA build's C++-compile notice on a CPU
        # are not for a person running a command
        for name in ("torchao", "torch.utils._pytree", "torch.utils.cpp_extension"):
            logging.getLogger(name).setLevel(logging.ERROR)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        threads = getattr(args, "threads", None)
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"--threads must be at least 1, got {threads}")
            import torch

            torch.set_num_threads(threads)
        return int(args.func(args) or 0)
    except T2IAdapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`t2iadapter info X | head -1`): stop quietly, as a shell tool killed by SIGPIPE does,
        # and keep Python's flush of stdout at exit from failing on the closed pipe too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except FileNotFoundError as exc:
        print(f"error: file not found: {exc.filename or exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user named cannot be read or written (permissions, a folder, a full disk)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        device = out_of_memory(exc)
        if device is None:
            raise
        print(f"error: out of {device} memory in `{args.command}`: ask for less at once (fewer images per call, a "
              f"smaller size or batch) or free the {device} for this job", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
