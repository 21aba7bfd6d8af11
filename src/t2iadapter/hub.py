"""Hugging Face hub ids (`org/repo`, `org/repo/path/in/repo`): the local cache first, the network at most once.

The cache is read with `local_files_only=True` (no network, no retries). Only when that misses and
`HF_HUB_OFFLINE` is not set does huggingface_hub go online; offline, a miss is one clear error at once.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from t2iadapter.errors import CheckpointError


_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+(/.+)?")  # the hub's own repo-id characters; a path starts with `.`, `/` or `~`


def is_id(text: str) -> bool:
    """`org/repo[/file]` rather than a local path (one that starts with `.`, `/` or `~`, has no `/`, or spaces)."""
    return _ID.fullmatch(text) is not None


def offline() -> bool:
    """huggingface_hub's own offline switch (HF_HUB_OFFLINE, read when it is imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def fetch(source: str, what: str, get: Callable[..., Any], needs: str | None = None) -> Path:
    """`get(local_files_only=...)` → a local path: from the cache, else (online only) one download.

    `needs`: a file a cached folder must hold to count (a folder that holds only another file of the repo,
    as `hf_hub_download` of one file leaves it, is a miss, not the repo).
    """
    try:
        path = Path(get(local_files_only=True))
        if needs is None or (path / needs).is_file():
            return path
    except Exception:  # noqa: BLE001 - not cached (or a partial cache): decide below
        pass
    if offline():
        raise CheckpointError(
            f"{source!r} is not a local path, and the {what} is not in the local Hugging Face hub cache while "
            f"HF_HUB_OFFLINE is set; download it on a machine with internet "
            f"(`hf download {'/'.join(source.split('/')[:2])}`) or pass a local path"
        )
    try:
        return Path(get(local_files_only=False))
    except Exception as exc:  # no network, missing repo or file: one message
        raise CheckpointError(
            f"{source!r} is not a local path, and fetching the {what} from the Hugging Face hub failed "
            f"({_first_line(exc)}). Check the name, or go online."
        ) from None


def adapter_path(source: str) -> Path:
    """An adapter from the hub: `org/repo` (its config.json and weights) or `org/repo/file/in/repo`."""
    from huggingface_hub import hf_hub_download, snapshot_download

    parts = source.split("/")
    repo, rest = "/".join(parts[:2]), "/".join(parts[2:])
    if rest:
        return fetch(source, "file", lambda **kw: hf_hub_download(repo, rest, **kw))
    patterns = ["config.json", "*.safetensors", "*.bin"]
    return fetch(source, "adapter", lambda **kw: snapshot_download(repo, allow_patterns=patterns, **kw),
                 needs="config.json")


def pipeline_path(source: str) -> Path:
    """A diffusers pipeline repo from the hub, as a local folder: diffusers' own download, which fetches (and, from
    the cache, asks for) only the files its pipelines load — not the repo's every file (.ckpt, fp16 variants), which
    a cache that diffusers filled does not hold and huggingface_hub's listing of the repo still names."""

    def get(local_files_only: bool) -> str:
        import logging

        from diffusers import DiffusionPipeline

        quiet = logging.getLogger("diffusers")  # its "Couldn't connect to the Hub" lines: our one error says it
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            return DiffusionPipeline.download(source, local_files_only=local_files_only)
        finally:
            quiet.setLevel(level)

    return fetch(source, "pipeline", get, needs="model_index.json")
