"""Finding model weights: a local folder, the hub cache, or a download; one clear error when offline."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, TypeVar

from t2iadapter.errors import MissingWeightsError

log = logging.getLogger(__name__)
T = TypeVar("T")


def offline() -> bool:
    """True when the user has switched the hub off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    import huggingface_hub.constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return huggingface_hub.constants.HF_HUB_OFFLINE or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def is_local(model: str) -> bool:
    """Whether `model` names a folder on disk rather than a hub repo id ("owner/name")."""
    return (
        Path(model).expanduser().exists() or model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model
    )


def missing(
    extractor: str, what: str, model: str, default: str, reason: str, files: tuple[str, ...] = ()
) -> MissingWeightsError:
    """The one error for absent weights: which model, where to get it, and the option for a local copy."""
    fetch = f"hf download {default}{''.join(' ' + f for f in files)} --local-dir DIR"
    return MissingWeightsError(
        f"{extractor}: weights for {what} ({model}) are not available: {reason}. "
        f"Get them from the hub repo {default} (e.g. `{fetch}` on a machine with internet) "
        f"and pass --model DIR (model='DIR' in Python)."
    )


def _probe(repo: str) -> str | None:
    """None if the hub answers for `repo`, else why not (no network, unknown repo); fails fast, no retries."""
    import huggingface_hub

    try:
        huggingface_hub.model_info(repo, timeout=10)
    except huggingface_hub.errors.RepositoryNotFoundError:
        return f"the hub has no repo {repo!r}"
    except Exception as exc:  # network errors come from several libraries (httpx, requests, OSError)
        return f"the hub cannot be reached ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def load_pretrained(load: Callable[..., T], model: str, *, extractor: str, what: str, default: str) -> T:
    """Call `load(model, local_files_only=...)` (a from_pretrained) on a folder, the cache, then the hub."""
    if is_local(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise missing(extractor, what, model, default, f"there is no folder {folder}")
        try:
            return load(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise missing(
                extractor, what, model, default, f"{folder} is not a usable model folder ({_first_line(exc)})"
            ) from None
    try:
        return load(model, local_files_only=True)
    except (OSError, ValueError):
        log.debug("%s not in the hub cache", model)
    if offline():
        raise missing(extractor, what, model, default, "it is not in the local hub cache and HF_HUB_OFFLINE is set")
    reason = _probe(model)
    if reason:
        raise missing(extractor, what, model, default, reason)
    log.info("downloading %s from the hub", model)
    try:
        return load(model)
    except (OSError, ValueError) as exc:
        raise missing(extractor, what, model, default, f"the download failed ({_first_line(exc)})") from None


def hub_folder(model: str, files: tuple[str, ...], *, extractor: str, what: str, default: str) -> str:
    """A folder holding `files`: `model` itself if it is a folder, else the hub snapshot (downloaded if needed)."""
    if is_local(model):
        folder = Path(model).expanduser()
        absent = [f for f in files if not (folder / f).is_file()]
        if not folder.is_dir() or absent:
            reason = f"there is no folder {folder}" if not folder.is_dir() else f"{folder} lacks {', '.join(absent)}"
            raise missing(extractor, what, model, default, reason, files)
        return str(folder)
    import huggingface_hub

    try:
        paths = [huggingface_hub.hf_hub_download(model, f, local_files_only=True) for f in files]
        return str(Path(paths[0]).parent)
    except (OSError, ValueError):
        log.debug("%s not in the hub cache", model)
    if offline():
        raise missing(
            extractor, what, model, default, "it is not in the local hub cache and HF_HUB_OFFLINE is set", files
        )
    reason = _probe(model)
    if reason:
        raise missing(extractor, what, model, default, reason, files)
    try:
        paths = [huggingface_hub.hf_hub_download(model, f) for f in files]
    except (OSError, ValueError) as exc:
        raise missing(extractor, what, model, default, f"the download failed ({_first_line(exc)})", files) from None
    return str(Path(paths[0]).parent)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
