"""Compiled graphs as files (issue 18): fast mode's torch.compile output, saved once and loaded by later processes.

What is stored is torch's own portable compile cache: `torch.compiler.save_cache_artifacts()` after a call
that compiled (inductor's compiled graphs with their Triton kernels, AOTAutograd's entries, autotuning
results), and `torch.compiler.load_cache_artifacts()` before the first compiled call of the same key. There is
no serializer of ours; torch checks every entry against its own keys, so a file can only make compiling
shorter, never change a result. Dynamo still traces the modules in the new process (seconds, not minutes),
unless torch's caching precompile is on (`optimize(precompile=True)` or $T2IADAPTER_PRECOMPILE=1,
experimental): then dynamo's traced bytecode and guards are in the file too and the new process skips tracing.

Layout (`cache_dir()`: the `cache_dir` option, else $T2IADAPTER_COMPILE_CACHE, else the user cache folder):

    <dir>/<family>-<precision>-<device>-<digest of the setup>/<W>x<H>-b<images>[-nocfg][-batched].bin
                                                                                         ....json (manifest)

The key is everything the compiled graphs depend on: torch (and Triton), Python, diffusers and t2iadapter
versions (the code that is traced), the GPU's name and compute capability (or "cpu" and the machine), the base
architecture (a digest of its UNet and VAE configs), dtype, precision, compile mode, fused q/k/v projections, the
spatial adapters' architectures, and the call's canvas, images per call, classifier-free guidance and entry
(`generate`, or `generate_batch`, which pads the UNet's rows). The same setup keys `generation.aot`'s packages.
A file holds every graph its process had compiled or loaded when it was written, so it is complete on its
own. A folder copied to another machine with the same GPU and torch serves there as is. A file that cannot be
read, fails its checksum, or was written for another key (other torch, other GPU, edited by hand) is ignored
with one warning and compiled over; nothing here raises into a generation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from t2iadapter.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "T2IADAPTER_COMPILE_CACHE"  # the cache folder (overrides the user cache folder; `cache_dir=` overrides it)
PRECOMPILE_ENV = "T2IADAPTER_PRECOMPILE"  # 1: dynamo's own results go into the files too (`enable_precompile`)
FORMAT = 1  # manifest layout; a manifest of another format is ignored
_LOADED: set[str] = set()  # sha256 of the artefacts given to torch in this process (each is loaded once)


def user_cache_root() -> Path:
    """The platform's per-user cache folder (XDG on Linux, ~/Library/Caches on macOS, %LOCALAPPDATA% on Windows)."""
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where compiled graphs live: `override`, else $T2IADAPTER_COMPILE_CACHE, else <user cache>/t2iadapter/compiled."""
    if override is not None and str(override):
        folder = Path(override).expanduser()
    elif os.environ.get(ENV):
        folder = Path(os.environ[ENV]).expanduser()
    else:
        folder = user_cache_root() / "t2iadapter" / "compiled"
    # a file there or above it (`out.png/cache`): refused now, else a compile's minutes end in "could not write"
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == folder else f": {existing}"
        raise ConfigError(f"compiled-graph cache {folder}{where} is a file; name a folder (--cache-dir or ${ENV})")
    return folder


def precompile_default() -> bool:
    """`optimize(precompile=None)`: on when $T2IADAPTER_PRECOMPILE is 1 (experimental, see `enable_precompile`)."""
    return os.environ.get(PRECOMPILE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def enable_precompile() -> bool:
    """Turn on torch's caching precompile (`torch._dynamo.config.caching_precompile`, experimental, process-wide):
    dynamo's traced bytecode and guards are saved with the compiled graphs, so a process that loads the file skips
    tracing too (the seconds the inductor cache alone leaves). Must be on before `torch.compile` wraps a module.
    False where this torch has no such option."""
    config = torch._dynamo.config
    if not hasattr(config, "caching_precompile"):
        log.warning("this torch (%s) has no caching precompile; only inductor's compiled graphs are cached",
                    torch.__version__)
        return False
    config.caching_precompile = True
    return True


def _digest(value: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _config(module: Any) -> dict[str, Any]:
    """A diffusers config without its bookkeeping keys (`_name_or_path`, `_diffusers_version`, ...)."""
    return {k: v for k, v in dict(module.config).items() if not k.startswith("_")}


def architecture(base: Any) -> str:
    """A digest of the base's UNet and VAE configs: equal for every checkpoint of one architecture."""
    return _digest({"unet": _config(base.unet), "vae": _config(base.vae)})


def adapter_architectures(adapters: Mapping[str, Any]) -> tuple[str, ...]:
    """The compiled (spatial) adapters' architectures, `kind:digest` each, sorted: names and weights do not count."""
    out = []
    for module in adapters.values():
        if module.kind in ("full", "full_xl", "light"):
            out.append(f"{module.kind}:{_digest(dataclasses.asdict(module.config), 8)}")
    return tuple(sorted(out))


def device_label(device: str | torch.device) -> str:
    """`NVIDIA H200 (sm_90)` for a GPU, `cpu (x86_64)` otherwise: what compiled kernels are built for."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"{device.type} ({platform.machine()})"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return getattr(triton, "__version__", "?")


@dataclass(frozen=True)
class Setup:
    """The part of the key `optimize()` fixes: software, device, base, precision, compile mode, adapter set."""

    torch: str
    triton: str | None
    python: str
    diffusers: str  # the UNet's code that is traced (an AOTInductor package holds it compiled)
    t2iadapter: str
    device: str  # device_label()
    base: str  # architecture()
    family: str  # sd | sdxl (for the folder's name)
    dtype: str
    precision: str  # bf16 | fp16 | fp32 | fp8
    mode: str  # torch.compile mode
    adapters: tuple[str, ...]  # adapter_architectures()
    precompile: bool = False  # dynamo's results in the files too (`enable_precompile`)
    fuse_qkv: bool = True  # one q/k/v matmul per attention layer: other weights' names, another graph

    @classmethod
    def of(cls, base: Any, adapters: Mapping[str, Any], device: str | torch.device, dtype: torch.dtype, precision: str,
           mode: str, precompile: bool = False, fuse_qkv: bool = True) -> "Setup":
        import diffusers

        return cls(torch=torch.__version__, triton=_triton_version(), python=platform.python_version(),
                   diffusers=diffusers.__version__, t2iadapter=_version(), device=device_label(device),
                   base=architecture(base), family="sdxl" if base.is_sdxl else "sd", dtype=str(dtype).replace("torch.", ""),
                   precision=precision, mode=mode, adapters=adapter_architectures(adapters), precompile=precompile,
                   fuse_qkv=fuse_qkv)

    @property
    def folder(self) -> str:
        """`sdxl-bf16-nvidia-h200-sm90-1a2b3c4d5e6f`: readable, and unique to the whole setup."""
        device = re.sub(r"[^a-z0-9]+", "-", self.device.lower()).strip("-")
        return f"{self.family}-{self.precision}-{device}-{_digest(dataclasses.asdict(self))}"


@dataclass(frozen=True)
class Shape:
    """The part of the key a call fixes: canvas (the size rounded up to what the UNet takes), images, CFG."""

    width: int
    height: int
    batch: int = 1  # images per call (prompts × images per prompt; a server batch: all its images)
    cfg: bool = True  # guidance > 1: the UNet runs both branches (twice the rows)
    batched: bool = False  # through generate_batch (a server's workers, generate --batch): rows padded to 2^k

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}-b{self.batch}" + ("" if self.cfg else "-nocfg") + ("-batched" if self.batched else "")

    def describe(self) -> str:
        images = f"{self.batch} image{'s' if self.batch != 1 else ''}"
        return f"{self.width}x{self.height}, {images}" + ("" if self.cfg else ", no CFG") + (", batched" if self.batched else "")


TRACING = "_compile.compile_inner"  # torch's timer of dynamo's whole work on a frame (backend included)
BACKEND = "OutputGraph.call_user_compiler"  # its backend's part (AOTAutograd and inductor, cache loads included)


@dataclass
class Event:
    """What one key's first call did: `loaded` (its graphs came from the file) or `compiled` (and saved)."""

    shape: Shape
    status: str
    path: Path
    seconds: float = 0.0  # the first call's wall time (compilation included)
    saved: bool = False
    reason: str = ""  # why a file was ignored
    timers: dict[str, float] = dataclasses.field(default_factory=dict)  # torch's compile timers during the call
    kind: str = ""  # "aot": an AOTInductor package of the UNet (`generation.aot`); "": torch.compile's graphs

    def line(self) -> str:
        """One line for a person (the CLI prints it)."""
        where = self.path.parent
        mode = "fast mode (aot)" if self.kind == "aot" else "fast mode"
        what = "the UNet's package" if self.kind == "aot" else "compiled graphs"
        if self.status == "loaded":
            tracing = self.timers.get(TRACING)
            split = "" if tracing is None else (f": tracing {tracing:.1f} s, of it the compiler backend "
                                                 f"{self.timers.get(BACKEND, 0.0):.1f} s")
            first = "loading" if self.kind == "aot" else "first call"
            return f"{mode}: {what} for {self.shape.describe()} loaded from {where} ({first} {self.seconds:.1f} s{split})"
        ignored = f" (the cached file was ignored: {self.reason})" if self.reason else ""
        if self.saved:
            saved = f"; saved to {where}"
        else:
            saved = "; not saved" if self.kind == "aot" else "; nothing to save (torch's caches off, or not inductor)"
        return f"{mode}: compiled {self.shape.describe()} in {self.seconds:.1f} s{ignored}{saved}"


def compile_timers() -> dict[str, float]:
    """torch's cumulative compile timers of this process, seconds by timer name (`dynamo_timed`; `TRACING` and
    `BACKEND` among them). Empty where this torch keeps none."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return {}
    return {name: float(sum(values)) for name, values in compilation_time_metrics.items()}


def timer_delta(before: Mapping[str, float], after: Mapping[str, float], floor: float = 0.01) -> dict[str, float]:
    """The timers that grew by at least `floor` seconds between two `compile_timers()`, largest first."""
    grown = {name: after[name] - before.get(name, 0.0) for name in after}
    return {name: round(s, 3) for name, s in sorted(grown.items(), key=lambda kv: -kv[1]) if s >= floor}


def compile_counts() -> dict[str, int]:
    """torch's compile counters: new dynamo graphs, inductor / AOTAutograd / dynamo cache hits and misses (the cache
    checks what a call compiled with them; tests and benchmarks check cache hits)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"],
            "miss": counters["inductor"]["fxgraph_cache_miss"] + counters["aot_autograd"]["autograd_cache_miss"],
            "hit": counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"],
            "dynamo_hit": counters["dynamo_cache"]["dynamo_cache_hit"],
            "dynamo_miss": counters["dynamo_cache"]["dynamo_cache_miss"]}


def read_checked(path: Path, want: Mapping[str, Any]) -> tuple[bytes | None, str]:
    """A cache file and its manifest (`.json` beside it): (the file's bytes, "") when both are there, the manifest is
    of this format, its key is `want` and the checksum matches; (None, why) otherwise ("" when neither exists)."""
    manifest_path = path.with_suffix(".json")
    if not path.exists() and not manifest_path.exists():
        return None, ""
    try:
        manifest = json.loads(manifest_path.read_text())
        blob = path.read_bytes()
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None, f"manifest format {manifest.get('format') if isinstance(manifest, dict) else '?'}, not {FORMAT}"
    got = manifest.get("key")
    if not isinstance(got, dict) or not isinstance(manifest.get("sha256"), str):  # edited by hand, or not ours
        return None, "unreadable (a manifest without a key object or a sha256 string)"
    stale = sorted(k for k in want if got.get(k) != want[k])
    if stale:
        return None, "written for another " + ", ".join(f"{k} ({got.get(k)!r}, here {want[k]!r})" for k in stale[:3])
    if hashlib.sha256(blob).hexdigest() != manifest.get("sha256"):
        return None, "checksum mismatch (a corrupt or truncated file)"
    return blob, ""


def manifest_of(key: Mapping[str, Any], blob: bytes, seconds: float, **extra: Any) -> dict[str, Any]:
    """The manifest written beside a cache file (what `read_checked` checks): format, key, checksum, and for a
    person the size, the compile time, when and by what it was written."""
    return {"format": FORMAT, "key": dict(key), "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
            "compile_seconds": round(seconds, 2), **extra, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "writer": "t2iadapter " + _version()}


class Reporter:
    """Says a line to the log (INFO) and to `report`, when set (the CLI sets `print`)."""

    report: Callable[[str], None] | None = None

    def _say(self, line: str) -> None:
        log.info(line)
        if self.report is not None:
            self.report(line)


class CompileCache(Reporter):
    """One pipeline's compiled-graph files: loaded before a key's first compiled call, saved after one that compiled.

    One line is logged (INFO) before a compilation starts and one when a key's first call ends; `report` (the
    CLI sets `print`) gets the same lines.
    """

    def __init__(self, folder: str | os.PathLike, setup: Setup, report: Callable[[str], None] | None = None) -> None:
        self.root = Path(folder)
        self.setup = setup
        self.report = report
        self.events: list[Event] = []
        self._done: set[Shape] = set()
        self._preloaded: set[Shape] = set()

    @property
    def folder(self) -> Path:
        return self.root / self.setup.folder

    def path(self, shape: Shape) -> Path:
        """The artefact file of a key (its manifest is beside it, `.json`)."""
        return self.folder / f"{shape.name}.bin"

    def key(self, shape: Shape) -> dict[str, Any]:
        return {**dataclasses.asdict(self.setup), **dataclasses.asdict(shape), "adapters": list(self.setup.adapters)}

    # ------------------------------------------------------------------ reading

    def check(self, shape: Shape) -> tuple[bytes | None, str]:
        """(the artefact's bytes, "") when the file is there and sound; (None, why) otherwise ("" when absent)."""
        return read_checked(self.path(shape), self.key(shape))

    def load(self, shape: Shape) -> tuple[str, str]:
        """Give a key's file to torch: ("loaded", ""), ("absent", "") or ("ignored", why) — one warning, never raises."""
        blob, why = self.check(shape)
        if blob is None:
            if why:
                log.warning("ignoring compiled-graph cache %s: %s; compiling instead", self.path(shape), why)
                return "ignored", why
            return "absent", ""
        digest = hashlib.sha256(blob).hexdigest()
        if digest in _LOADED:
            return "loaded", ""
        quiet = logging.getLogger("torch.compiler._cache")  # its own warning would repeat ours, with a traceback
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            info = torch.compiler.load_cache_artifacts(blob)
        except Exception as exc:  # noqa: BLE001 - any failure: compile as if there were no file
            info, why = None, f"torch could not load it ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        finally:
            quiet.setLevel(level)
        if info is None:
            why = why or "torch could not read its artefacts"
            log.warning("ignoring compiled-graph cache %s: %s; compiling instead", self.path(shape), why)
            return "ignored", why
        _LOADED.add(digest)
        log.info("loaded compiled graphs for %s from %s (%s)", shape.describe(), self.path(shape),
                 ", ".join(f"{len(v)} {k}" for k, v in info.artifacts.items()))
        return "loaded", ""

    def preload(self) -> list[Shape]:
        """Load every sound file of this setup now, oldest first (the newest dynamo entry wins; each file holds all
        its process had). With precompile this must run before `torch.compile` wraps the modules: dynamo reads its
        cache then, not at the first call."""
        if not self.folder.is_dir():
            return []
        names = {f.name for f in dataclasses.fields(Shape)}
        for manifest in sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                key = json.loads(manifest.read_text())["key"]
                shape = Shape(**{k: key[k] for k in names})
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring compiled-graph cache %s: unreadable (%s)", manifest, type(exc).__name__)
                continue
            if self.load(shape)[0] == "loaded":
                self._preloaded.add(shape)
        return sorted(self._preloaded, key=lambda s: s.name)

    # ------------------------------------------------------------------ writing

    def save(self, shape: Shape, seconds: float) -> Path | None:
        """Write what this process compiled or loaded so far under a key (atomic); None when torch gives nothing."""
        from t2iadapter.models.saving import _atomic_write

        try:
            saved = torch.compiler.save_cache_artifacts()
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be written costs the next start, not this one
            log.warning("could not collect compiled graphs for the cache (%s: %s)", type(exc).__name__, exc)
            return None
        if saved is None:
            log.info("torch recorded no compile-cache artefacts (its caches are off?); nothing saved for %s",
                     shape.describe())
            return None
        blob, info = saved
        path = self.path(shape)
        manifest = manifest_of(self.key(shape), blob, seconds, artifacts={k: len(v) for k, v in info.artifacts.items()})
        try:
            _atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))
            _atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
        except OSError as exc:
            log.warning("could not write the compiled-graph cache %s (%s)", path, exc)
            return None
        _LOADED.add(manifest["sha256"])
        log.info("saved compiled graphs for %s to %s (%.1f MB)", shape.describe(), path, len(blob) / 1e6)
        return path

    # ------------------------------------------------------------------ around a call

    @contextlib.contextmanager
    def first_call(self, shape: Shape) -> Iterator[None]:
        """Around a call: the first time a key is met, load its file before and save after if anything compiled."""
        if shape in self._done:
            yield
            return
        status, why = ("loaded", "") if shape in self._preloaded else self.load(shape)
        before, timers = compile_counts(), compile_timers()
        if status != "loaded":
            self._say(f"fast mode: compiling for {shape.describe()} (once; later runs load it from {self.folder})")
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self._done.add(shape)
        after = compile_counts()
        missed = after["miss"] - before["miss"]
        if self.setup.precompile:  # dynamo traced after all (no entry, or one it could not use): the file lacks it
            missed += max(after["dynamo_miss"] - before["dynamo_miss"], after["graphs"] - before["graphs"])
        grown = timer_delta(timers, compile_timers())
        if status == "loaded" and not missed:
            event = Event(shape, "loaded", self.path(shape), seconds, timers=grown)
        else:  # no file, a bad one, or graphs it lacked: write what this process has (a key without new graphs too)
            path = self.save(shape, seconds)
            event = Event(shape, "compiled", self.path(shape), seconds, saved=path is not None, reason=why, timers=grown)
        self.events.append(event)
        self._say(event.line())


def _version() -> str:
    from t2iadapter import __version__

    return __version__


def folder_for(value: str | os.PathLike | bool | None) -> Path | None:
    """`optimize(cache_dir=...)`: a folder; None or True: the default folder (`cache_dir()`); False: no files."""
    if value is False:
        return None
    return cache_dir(None if value is True else value)
