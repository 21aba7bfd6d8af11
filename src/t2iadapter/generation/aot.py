"""Fast mode's UNet through AOTInductor (issue 18, `optimize(aot=True)`): a new process loads it in about a second.

A torch.compile'd UNet loaded from the compiled-graph cache (`generation.compile_cache`) still makes a new process
trace the UNet and load inductor's generated Python before its first image (12 s for SD1.5 on an H100 in the first
benchmark run). With `aot=True` the UNet's forward becomes an `AotUnet`: the first call of each input signature
(the shapes, dtypes and strides of its tensors, and which optional inputs it has) exports the UNet with
`torch.export` and compiles it with AOTInductor into a package (`.pt2`, torch's own format) in the cache folder;
a later process — or another machine with the same GPU and torch — loads the package (a shared library and its
kernels: no tracing, no code generation) and runs it from C++.

Weights are not in the package. The live module's tensors are handed to it (`load_constants`, user-managed: no copy)
and torch folds what it derives from them (transposed matmul weights, ...) when they are handed over, so a package
built from one checkpoint runs any other of the same architecture exactly, and weights changed in place after a
call, or moved to new storage, are handed over again before the next one (version counters, data pointers).

What `aot=True` gives up: CUDA graphs (AOTInductor launches its kernels from C++, one by one), and compiling the VAE
decoder and the adapters (they run once per image; eager, so nothing is traced at start). fp8 runs through
torch.compile only. A package is keyed by what made its code (torch, diffusers and t2iadapter versions, fused q/k/v,
...: `compile_cache.Setup`) and its input signature; a file that wants constants the UNet lacks is built again. A
cache folder that cannot be written keeps the process's packages in a temporary folder (one warning). Any other
failure (export, compile, load) logs one warning and the UNet runs eagerly from then on.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from t2iadapter.generation.compile_cache import Event, Reporter, Setup, Shape, _digest, manifest_of, read_checked

log = logging.getLogger(__name__)

ENV = "T2IADAPTER_AOT"  # 1: `optimize()` uses AOTInductor for the UNet unless told otherwise
# the package holds code, not weights; what it derives from weights is folded when they are handed over
INDUCTOR_CONFIG = {"aot_inductor.package_constants_in_so": False, "aot_inductor.use_runtime_constant_folding": True,
                   "conv_1x1_as_mm": True}
POSITIONAL = ("sample", "timestep", "encoder_hidden_states")  # the UNet forward's leading parameters


def aot_default() -> bool:
    """`optimize(aot=None)`: on when $T2IADAPTER_AOT is 1."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------- call layout


def flatten(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[tuple, list[torch.Tensor]] | None:
    """A UNet call as (layout, tensors): the layout names each input and its structure (a tensor, a list or tuple of
    them, a dict of them), the tensors are its leaves in order. None for a call the package cannot take (a Python
    number as timestep, return_dict=True, an argument of another kind): it runs eagerly."""
    if len(args) > len(POSITIONAL):
        return None
    named = {**dict(zip(POSITIONAL, args)), **kwargs}
    if named.pop("return_dict", True) is not False:
        return None
    layout, tensors = [], []
    for name in sorted(named):
        value = named[name]
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            layout.append((name, "tensor", None))
            tensors.append(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value):
            layout.append((name, type(value).__name__, len(value)))
            tensors.extend(value)
        elif isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values()):
            keys = tuple(sorted(value))
            layout.append((name, "dict", keys))
            tensors.extend(value[k] for k in keys)
        else:
            return None
    return tuple(layout), tensors


def rebuild(layout: tuple, tensors: Sequence[torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments `flatten` took apart."""
    out: dict[str, Any] = {}
    at = 0
    for name, kind, extra in layout:
        if kind == "tensor":
            out[name], at = tensors[at], at + 1
        elif kind == "dict":
            out[name], at = dict(zip(extra, tensors[at:at + len(extra)])), at + len(extra)
        else:
            part = list(tensors[at:at + extra])
            out[name], at = (part if kind == "list" else tuple(part)), at + extra
    return out


def signature(layout: tuple, tensors: Sequence[torch.Tensor]) -> dict[str, Any]:
    """What a package is compiled for: the layout and every tensor's shape, stride, dtype and device."""
    return {"layout": [list(entry) for entry in layout],
            "tensors": [[list(t.shape), list(t.stride()), str(t.dtype).replace("torch.", ""), t.device.type]
                        for t in tensors]}


class _Flat(torch.nn.Module):
    """The UNet as a function of positional tensors (what torch.export and the package take)."""

    def __init__(self, unet: torch.nn.Module, forward: Callable[..., Any], layout: tuple) -> None:
        super().__init__()
        self.unet = unet  # registered: its parameters and buffers are the package's constants, `unet.<name>`
        self.forward_fn = forward
        self.layout = layout

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.forward_fn(**rebuild(self.layout, tensors), return_dict=False)[0]


# ---------------------------------------------------------------------------------------------- packages on disk


class AotStore(Reporter):
    """The UNet packages of one setup: `<folder>/unet-<digest of the signature>.pt2`, each with a manifest (`.json`:
    the key and a checksum). Without a folder (`cache_dir=False`) packages go to a temporary folder, removed at exit.
    Has the compiled-graph cache's interface for the pipeline and the CLI (`events`, `folder`, `first_call`,
    `report`)."""

    def __init__(self, folder: str | Path | None, setup: Setup, report: Callable[[str], None] | None = None) -> None:
        self.persistent = folder is not None
        if folder is None:
            folder = tempfile.mkdtemp(prefix="t2iadapter-aot-")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
        self.root = Path(folder)
        self.setup = setup
        self.report = report
        self.events: list[Event] = []
        self.shape: Shape | None = None  # the call under way (for the events' lines)

    @property
    def folder(self) -> Path:
        return self.root / self.setup.folder

    def path(self, sig: dict[str, Any]) -> Path:
        return self.folder / f"unet-{_digest(sig, 16)}.pt2"

    def key(self, sig: dict[str, Any]) -> dict[str, Any]:
        return {**dataclasses.asdict(self.setup), "adapters": list(self.setup.adapters), "signature": sig}

    @contextlib.contextmanager
    def first_call(self, shape: Shape) -> Iterator[None]:
        """Around a call (the pipeline's hook, as for the compiled-graph cache): which shape the events belong to."""
        self.shape = shape
        yield

    def check(self, sig: dict[str, Any]) -> str:
        """"" when a sound package for `sig` is there; else why not ("absent" when there is none)."""
        blob, why = read_checked(self.path(sig), self.key(sig))
        return "" if blob is not None else (why or "absent")

    def get(self, sig: dict[str, Any], build: Callable[[Path], None], *, fits: Callable[[Any], str] = lambda model: "",
            device_index: int = -1) -> Any:
        """The loaded package for `sig`, on GPU `device_index` (-1: the current one): from its file when sound and
        `fits(model)` finds nothing wrong with it (it says why not), else built (`build(path)` writes the package) and
        saved. A file that cannot be used is ignored with one warning."""
        path, started = self.path(sig), time.perf_counter()
        why = self.check(sig)
        if not why:
            try:
                model = torch._inductor.aoti_load_package(str(path), device_index=device_index)
            except Exception as exc:  # noqa: BLE001 - any failure: build as if there were no file
                why = f"torch could not load it ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
            else:
                why = fits(model)
                if not why:
                    self._event("loaded", path, started)
                    return model
        if why != "absent":
            log.warning("ignoring AOTInductor package %s: %s; compiling instead", path, why)
        self._say(f"fast mode (aot): compiling the UNet for {self._shape()} (once; later runs load it from {self.folder})")
        built, saved = self._save(path, build, self.key(sig), started)
        model = torch._inductor.aoti_load_package(str(built), device_index=device_index)
        self._event("compiled", path, started, reason="" if why == "absent" else why, saved=saved)
        return model

    def _save(self, path: Path, build: Callable[[Path], None], key: dict[str, Any], started: float) -> tuple[Path, bool]:
        """Build a package into a file of its own beside `path` (builders in other processes each have theirs), then
        move it into place with its manifest: (the package file, saved). Where the folder cannot be written it is
        built in a temporary folder, removed at exit, with one warning: fast mode stays on, the next process builds
        again."""
        from t2iadapter.models.saving import _atomic_write_text

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.folder, prefix=f".{path.stem}.", suffix=".partial.pt2")
            os.close(fd)
        except OSError as exc:
            log.warning("could not save the AOTInductor package in %s (%s); it is kept in a temporary folder for "
                        "this process", self.folder, exc)
            scratch = Path(tempfile.mkdtemp(prefix="t2iadapter-aot-"))
            atexit.register(shutil.rmtree, scratch, ignore_errors=True)
            build(scratch / path.name)
            return scratch / path.name, False
        partial = Path(name)
        try:
            build(partial)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        try:
            blob = partial.read_bytes()
            umask = os.umask(0)  # mkstemp made it 0600: the usual permissions, as the other cache files have
            os.umask(umask)
            os.chmod(partial, 0o666 & ~umask)
            os.replace(partial, path)
            manifest = manifest_of(key, blob, time.perf_counter() - started, shape=self._shape())
            _atomic_write_text(json.dumps(manifest, indent=1), path.with_suffix(".json"))
        except OSError as exc:
            used = partial if partial.exists() else path  # without its manifest the next process builds it again
            log.warning("could not save the AOTInductor package %s (%s); it is used from %s for this process", path,
                        exc, used)
            if used == partial:
                atexit.register(partial.unlink, missing_ok=True)
            return used, False
        return path, True

    def _shape(self) -> str:
        return self.shape.describe() if self.shape is not None else "this input"

    def _event(self, status: str, path: Path, started: float, reason: str = "", saved: bool = False) -> None:
        shape = self.shape or Shape(0, 0)
        event = Event(shape, status, path, time.perf_counter() - started, saved=saved and self.persistent, reason=reason,
                      kind="aot")
        self.events.append(event)
        self._say(event.line())


# ---------------------------------------------------------------------------------------------- the UNet's forward


class AotUnet:
    """A UNet's forward through AOTInductor packages, one per input signature; eager for calls a package cannot take,
    and from the first failure on (one warning)."""

    def __init__(self, eager: Callable[..., Any], unet: torch.nn.Module, store: AotStore) -> None:
        self.eager = eager
        self.unet = unet
        self.store = store
        self.models: dict[tuple, Any] = {}  # loaded packages by call layout, tensor shapes/strides/dtypes, weights' dtypes
        self.handed: dict[tuple, tuple] = {}  # per package: the weights' state when they were handed over
        self.error: str | None = None
        self._weights: dict[str, torch.Tensor] | None = None
        self._state: tuple = ()  # the weights' (version, data pointer) pairs last seen
        self._kinds: list[str] = []  # the weights' dtypes and devices

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.error is None:
            flat = flatten(args, kwargs)
            if flat is not None:
                try:
                    return (self._run(*flat),)
                except Exception as exc:  # noqa: BLE001 - any export/compile/load failure: keep generating, eagerly
                    self.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                    log.warning("AOTInductor UNet failed (%s); it runs eagerly from now on", self.error)
        return self.eager(*args, **kwargs)

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The UNet's parameters and buffers by the package's constant names (collected once: a walk of the module
        each step would cost ~1 ms on SD1.5; dtype changes and fusing keep the same tensor objects)."""
        if self._weights is None:
            self._weights = {f"unet.{n}": t for n, t in [*self.unet.named_parameters(), *self.unet.named_buffers()]}
        return self._weights

    def _run(self, layout: tuple, tensors: list[torch.Tensor]) -> torch.Tensor:
        weights = self._tensors()
        state = tuple((t._version, t.data_ptr()) for t in weights.values())  # changed in place, or moved
        if state != self._state:
            self._state = state
            self._kinds = sorted({f"{str(t.dtype).replace('torch.', '')}/{t.device.type}" for t in weights.values()})
        # the loaded package of this call: found by a plain tuple each step; the JSON signature (the file's key,
        # with the weights' dtypes a package is built for) is made only when it is not loaded yet
        name = (layout, tuple((t.shape, t.stride(), t.dtype, t.device) for t in tensors), tuple(self._kinds))
        model = self.models.get(name)
        if model is None:
            model = self.models[name] = self._load(layout, tensors)
        if self.handed.get(name) != state:  # first use, or weights changed since: hand them over
            wanted = model.get_constant_fqns()
            model.load_constants({n: weights[n] for n in wanted if n in weights}, check_full_update=False,
                                 user_managed=True)
            self.handed[name] = state
        with torch.no_grad():
            return model(*tensors)

    def _load(self, layout: tuple, tensors: list[torch.Tensor]) -> Any:
        """The package of a call, loaded onto the GPU of the UNet's weights (or built): a file whose package wants
        constants this UNet lacks (made by other code, or with q/k/v fused otherwise) is built again."""
        weights = self._tensors()
        device = next(iter(weights.values())).device
        sig = {**signature(layout, tensors), "weights": self._kinds}
        model = self.store.get(sig, lambda path: self._build(layout, tensors, path), fits=self._missing,
                               device_index=device.index if device.type == "cuda" and device.index is not None else -1)
        missing = self._missing(model)
        if missing:
            raise RuntimeError(f"the package just built {missing}")
        return model

    def _missing(self, model: Any) -> str:
        """What a package wants that this UNet lacks ("" when nothing)."""
        weights = self._tensors()
        missing = [n for n in model.get_constant_fqns() if n not in weights and not n.startswith("_FOLDED_CONST")]
        return f"wants constants this UNet lacks ({', '.join(missing[:3])})" if missing else ""

    def _build(self, layout: tuple, tensors: list[torch.Tensor], path: Path) -> None:
        flat = _Flat(self.unet, self.eager, layout)
        with torch.no_grad():
            program = torch.export.export(flat, tuple(tensors), strict=False)
            torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=INDUCTOR_CONFIG)
