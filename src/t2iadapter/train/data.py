"""Training data: image + caption + condition maps, from a folder, a `datasets` dataset, WebDataset shards or the world.

Every source is random-access (`len`, `load(i)`); `SampleStream` turns it into one endless,
seeded stream: position k is sample `perm_{k // N}[k % N]` of epoch k // N. A run's data position
is therefore just its step count, and `--resume` continues the stream exactly. Unreadable samples
are skipped (the next sample of the epoch's order takes their place) and counted.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from t2iadapter.errors import ConfigError
from t2iadapter.train.config import AdapterSpec, DataConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TENSOR_SUFFIXES = (".safetensors",)
MAX_SKIPS = 64  # consecutive unreadable samples before the data is declared broken

# Conditions whose values are labels (colours per class): resized with nearest neighbour, not bilinear.
LABEL_CONDITIONS = ("seg", "pose", "openpose", "keypose")


class DataError(ConfigError):
    """The training data cannot be read (nothing readable, missing folders, bad columns)."""


@dataclass
class Raw:
    """One sample as read from its source: an RGB image, a caption and condition inputs (PIL or tensors)."""

    image: Any  # PIL.Image
    caption: str
    conditions: dict[str, Any]  # name -> PIL.Image, or a torch.Tensor of style tokens


# ---------------------------------------------------------------------------------------------
# image helpers


def _open_image(source: Any):
    """A decoded PIL image from a path, bytes, a datasets image dict, an array or a PIL image (the one reader)."""
    from PIL import Image

    from t2iadapter.extractors.images import open_image

    if isinstance(source, np.ndarray):
        return Image.fromarray(source)
    return open_image(source)


def resize_crop(image, size: int, *, nearest: bool = False):
    """Resize the short side to `size` and centre-crop to size×size (the original dataset transform)."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.NEAREST if nearest else Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image, channels: int) -> torch.Tensor:
    """PIL → float [C, H, W] in [0, 1] with `channels` channels (1: luma "L", 3: RGB)."""
    image = image.convert("L" if channels == 1 else "RGB")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _load_tokens(path: Path) -> torch.Tensor:
    """Precomputed style tokens (the `style` extractor's .safetensors): [L, width]."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tokens = tensors.get("last_hidden_state", next(iter(tensors.values())))
    return tokens[0] if tokens.ndim == 3 else tokens


# ---------------------------------------------------------------------------------------------
# sources


class Source:
    """Random access to raw samples."""

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Raw:
        raise NotImplementedError

    def name(self, index: int) -> str:
        return f"#{index}"


class WorldSource(Source):
    """Scenes of the procedural world (`t2iadapter.demo.world`) from its TRAIN seeds, with exact conditions."""

    def __init__(self, conditions: list[str], resolution: int, num_samples: int | None) -> None:
        from t2iadapter.demo import world

        self.world = world
        self.resolution = resolution
        self.maps = [c for c in conditions if c in world.CONDITIONS]
        self.n = min(num_samples or len(world.TRAIN_SEEDS), len(world.TRAIN_SEEDS))

    def __len__(self) -> int:
        return self.n

    def name(self, index: int) -> str:
        return f"world seed {self.world.TRAIN_SEEDS[index]}"

    def load(self, index: int) -> Raw:
        from PIL import Image

        seed = self.world.TRAIN_SEEDS[index]
        batch = self.world.generate_batch([seed], size=self.resolution, names=("image", *self.maps))
        conds = {}
        for name in self.maps:
            arr = batch.maps[name][0]
            conds[name] = Image.fromarray(arr.astype(np.uint8) * (255 if arr.dtype == bool else 1))
        return Raw(Image.fromarray(batch.maps["image"][0]), batch.captions[0], conds)


def _resolve_dir(name: str, path: str, root: Path) -> Path:
    """A condition folder: absolute, or relative to data.path or to the working directory (only one may hold it)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    inside = root / p
    if inside.exists() and p.exists() and inside.resolve() != p.resolve():
        raise DataError(f"the {name!r} condition folder {path!r} is both {inside} (under data.path) and {p.resolve()} "
                        "(under the working directory); give the one you mean as an absolute path")
    return inside if inside.exists() else p


class FolderSource(Source):
    """A folder of images with captions (`metadata.jsonl` with file_name and the caption field `text_column`, or sidecar
    .txt) and condition folders."""

    def __init__(self, root: str, conditions: dict[str, str], text_column: str = "text") -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"data.path {self.root} is not a folder")
        self.cond_dirs = {name: _resolve_dir(name, d, self.root) for name, d in conditions.items()}
        for name, d in self.cond_dirs.items():
            if not d.is_dir():
                raise DataError(f"condition folder for {name!r} ({d}) does not exist")
        skip = {d.resolve() for d in self.cond_dirs.values()}
        captions: dict[str, str] = {}
        meta = self.root / "metadata.jsonl"
        textless: list[list[str]] = []  # the keys of rows without the caption field (a `caption` column, say)
        if meta.is_file():
            for line_no, line in enumerate(meta.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    name = str(row["file_name"])
                    if text_column in row:
                        captions[name] = str(row[text_column] or "")
                    else:
                        textless.append(sorted(row))
                except (ValueError, KeyError, TypeError):
                    log.warning("%s:%d: not a {file_name, %s} JSON line; ignored", meta, line_no, text_column)
        if textless:
            log.warning("%s: %d rows have no %r field (the first one's keys: %s); set data.text_column to the caption's "
                        "key", meta, len(textless), text_column, ", ".join(textless[0]))
        self.captions = captions
        self.files = sorted(
            p
            for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
            and not any(parent.resolve() in skip for parent in p.parents)
        )
        if not self.files:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {self.root}")
        rels = [p.relative_to(self.root).as_posix() for p in self.files]
        unmatched = sorted(set(captions) - set(rels))
        if unmatched:
            log.warning("%s: %d of its %d rows name no image under %s (e.g. %r); file_name is relative to that folder",
                        meta, len(unmatched), len(captions), self.root, unmatched[0])
        uncaptioned = sum(1 for p, rel in zip(self.files, rels) if rel not in captions and not p.with_suffix(".txt").is_file())
        if uncaptioned:
            log.warning("%d of %d images under %s have no caption (metadata.jsonl row or a .txt beside it); they train "
                        "with an empty prompt", uncaptioned, len(self.files), self.root)

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        return str(self.files[index])

    def _caption(self, path: Path) -> str:
        rel = path.relative_to(self.root).as_posix()
        if rel in self.captions:
            return self.captions[rel]
        sidecar = path.with_suffix(".txt")
        return sidecar.read_text().strip() if sidecar.is_file() else ""

    def _condition_file(self, name: str, path: Path) -> Path:
        rel = path.relative_to(self.root)
        base = self.cond_dirs[name] / rel
        for suffix in (path.suffix, *IMAGE_SUFFIXES, *TENSOR_SUFFIXES):
            candidate = base.with_suffix(suffix)
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"no {name} condition for {rel} in {self.cond_dirs[name]}")

    def load(self, index: int) -> Raw:
        path = self.files[index]
        conds = {}
        for name in self.cond_dirs:
            file = self._condition_file(name, path)
            conds[name] = _load_tokens(file) if file.suffix in TENSOR_SUFFIXES else _open_image(file)
        return Raw(_open_image(path), self._caption(path), conds)


class DatasetsSource(Source):
    """A Hugging Face `datasets` dataset (hub name, local script/folder or `save_to_disk` folder)."""

    def __init__(self, path: str, split: str, image_column: str, text_column: str, conditions: dict[str, str]) -> None:
        try:
            import datasets
        except ImportError:
            raise DataError("data.kind 'datasets' needs the `datasets` package: pip install 't2iadapter[train]'") from None
        local = Path(path).expanduser()
        try:
            if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[split]
            else:
                ds = datasets.load_dataset(path, split=split)
        except Exception as exc:
            raise DataError(f"cannot load dataset {path!r} (split {split!r}): {str(exc).splitlines()[0]}") from None
        missing = [c for c in (image_column, text_column, *conditions.values()) if c not in ds.column_names]
        if missing:
            raise DataError(f"dataset {path!r} has no column(s) {missing}; its columns: {ds.column_names}")
        self.ds, self.image_column, self.text_column, self.columns = ds, image_column, text_column, dict(conditions)

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, index: int) -> Raw:
        row = self.ds[int(index)]
        conds = {}
        for name, column in self.columns.items():
            value = row[column]
            if isinstance(value, (list, torch.Tensor)) or (isinstance(value, np.ndarray) and value.dtype != np.uint8):
                tokens = torch.as_tensor(np.asarray(value, dtype=np.float32))
                conds[name] = tokens[0] if tokens.ndim == 3 else tokens
            else:
                conds[name] = _open_image(value)
        return Raw(_open_image(row[self.image_column]), str(row[self.text_column] or ""), conds)


class WebDatasetSource(Source):
    """Local WebDataset shards (`.tar`: `KEY.jpg|png`, `KEY.txt`, `KEY.<condition key>`), indexed once for random access."""

    IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")

    def __init__(self, spec: str, text_key: str, conditions: dict[str, str]) -> None:
        import glob

        shards: list[str] = []
        for part in spec.split():
            found = sorted(glob.glob(str(Path(part).expanduser())))
            if not found:
                raise DataError(f"no WebDataset shard matches {part!r}")
            shards += found
        self.shards = shards
        # the caption entry: `text_column`; its default `text` also finds WebDataset's own `KEY.txt`
        self.text_keys = (text_key.lower(), "txt") if text_key.lower() == "text" else (text_key.lower(),)
        self.cond_keys = dict(conditions)
        self.samples: list[tuple[int, str, dict[str, tarfile.TarInfo]]] = []
        for s, shard in enumerate(shards):
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            try:
                with tarfile.open(shard, "r:") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        name = member.name
                        base, _, ext = name.partition(".")
                        if "/" in name:
                            d, _, fname = name.rpartition("/")
                            stem, _, ext = fname.partition(".")
                            base = f"{d}/{stem}"
                        groups.setdefault(base, {})[ext.lower()] = member
            except (tarfile.TarError, OSError) as exc:
                log.warning("skipping unreadable shard %s: %s", shard, exc)
                continue
            for key in sorted(groups):
                self.samples.append((s, key, groups[key]))
        if not self.samples:
            raise DataError(f"no samples in the WebDataset shards {spec!r}")
        uncaptioned = sum(1 for _, _, members in self.samples if not any(k in members for k in self.text_keys))
        if uncaptioned:
            log.warning("%d of %d samples in %s have no %s entry; they train with an empty prompt (data.text_column "
                        "names the caption key)", uncaptioned, len(self.samples), spec,
                        " or ".join(repr(k) for k in self.text_keys))
        self._open: dict[int, tarfile.TarFile] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        s, key, _ = self.samples[index]
        return f"{self.shards[s]}:{key}"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}  # open files do not travel to DataLoader workers
        return state

    def _read(self, shard: int, member: tarfile.TarInfo) -> bytes:
        tar = self._open.get(shard)
        if tar is None:
            tar = self._open[shard] = tarfile.open(self.shards[shard], "r:")
        f = tar.extractfile(member)
        if f is None:
            raise OSError(f"{member.name} is not a file")
        return f.read()

    def load(self, index: int) -> Raw:
        s, key, members = self.samples[index]
        image_key = next((k for k in self.IMAGE_KEYS if k in members), None)
        if image_key is None:
            raise FileNotFoundError(f"{key}: no image ({'/'.join(self.IMAGE_KEYS)}) in the shard")
        text_key = next((k for k in self.text_keys if k in members), None)
        caption = self._read(s, members[text_key]).decode("utf-8").strip() if text_key is not None else ""
        conds = {}
        for name, ckey in self.cond_keys.items():
            member = members.get(ckey.lower())
            if member is None:
                raise FileNotFoundError(f"{key}: no {ckey!r} entry for condition {name!r}")
            data = self._read(s, member)
            if ckey.endswith("safetensors"):
                from safetensors.torch import load as load_bytes

                tokens = next(iter(load_bytes(data).values()))
                conds[name] = tokens[0] if tokens.ndim == 3 else tokens
            else:
                conds[name] = _open_image(data)
        return Raw(_open_image(self._read(s, members[image_key])), caption, conds)


def build_source(data: DataConfig, adapters: tuple[AdapterSpec, ...]) -> Source:
    """The raw-sample source `data` describes; conditions without a stored location must have an extractor."""
    if data.resolution is None:
        raise ConfigError("data.resolution is not set: the Trainer takes the base's own size; set it to read data alone")
    stored = dict(data.conditions)
    if data.kind == "world":
        from t2iadapter.demo import world

        names = [a.condition for a in adapters]
        bad = [a.condition for a in adapters if a.condition not in world.CONDITIONS and a.extractor is None]
        if bad:
            raise ConfigError(f"the world renders {', '.join(world.CONDITIONS)}; no {bad} (set the adapter's extractor)")
        source: Source = WorldSource([n for n, a in zip(names, adapters) if a.extractor is None], data.resolution,
                                     data.num_samples)
    else:
        missing = [a.condition for a in adapters if a.condition not in stored and a.extractor is None]
        if missing:
            raise ConfigError(f"condition(s) {missing}: give data.conditions.<name> (stored) or the adapter's `extractor`")
        if data.kind == "folder":
            source = FolderSource(data.path, stored, data.text_column)
        elif data.kind == "datasets":
            source = DatasetsSource(data.path, data.split, data.image_column, data.text_column, stored)
        else:
            source = WebDatasetSource(data.path, data.text_column, stored)
    if data.num_samples and data.kind != "world" and data.num_samples < len(source):
        source = _Head(source, data.num_samples)
    return source


class _Head(Source):
    """The first n samples of a source."""

    def __init__(self, source: Source, n: int) -> None:
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> Raw:
        return self.source.load(index)

    def name(self, index: int) -> str:
        return self.source.name(index)


# ---------------------------------------------------------------------------------------------
# the seeded stream


class SampleStream(torch.utils.data.Dataset):
    """Stream position k → a training sample (tensors), in a seeded per-epoch order; bad samples are skipped."""

    def __init__(self, source: Source, data: DataConfig, adapters: tuple[AdapterSpec, ...], seed: int) -> None:
        self.source = source
        self.resolution = data.resolution
        self.random_flip = data.random_flip
        self.adapters = adapters
        self.seed = seed
        self._perm: tuple[int, torch.Tensor] | None = None
        self._extractors: dict[str, Callable] = {}

    def __len__(self) -> int:
        return len(self.source)

    def order(self, epoch: int) -> torch.Tensor:
        """The sample order of `epoch` (a permutation seeded by the run seed and the epoch)."""
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.source), generator=g))
        return self._perm[1]

    def _extractor(self, name: str) -> Callable:
        if name not in self._extractors:
            from t2iadapter import extractors

            self._extractors[name] = extractors.get(name)
        return self._extractors[name]

    def prepare(self, raw: Raw, position: int) -> dict[str, Any]:
        """Crop/resize the image and conditions, run on-the-fly extractors, make tensors."""
        size = self.resolution
        image = resize_crop(raw.image.convert("RGB"), size)
        conds: dict[str, torch.Tensor] = {}
        for spec in self.adapters:
            name = spec.condition
            if spec.extractor is not None and name not in raw.conditions:
                value = self._extractor(spec.extractor)(image)
            else:
                value = raw.conditions[name]
            if isinstance(value, torch.Tensor):  # style tokens [L, width]; the `style` extractor gives [1, L, width]
                conds[name] = (value[0] if value.ndim == 3 else value).float()
                continue
            cond = resize_crop(value, size, nearest=name in LABEL_CONDITIONS)
            conds[name] = to_tensor(cond, spec.in_channels)
        pixels = to_tensor(image, 3).mul_(2).sub_(1)  # [-1, 1], as the VAE takes
        if self.random_flip and np.random.default_rng((self.seed, position)).random() < 0.5:
            pixels = pixels.flip(-1)
            conds = {k: v.flip(-1) if v.ndim == 3 and v.shape[-1] == size else v for k, v in conds.items()}
        return {"pixels": pixels, "caption": raw.caption, "conditions": conds}

    def __getitem__(self, position: int) -> dict[str, Any]:
        n = len(self.source)
        epoch, offset = divmod(int(position), n)
        order = self.order(epoch)
        errors = []
        for attempt in range(min(MAX_SKIPS, n)):
            index = int(order[(offset + attempt) % n])
            try:
                sample = self.prepare(self.source.load(index), position)
            except Exception as exc:  # unreadable image, missing condition, bad caption: skip, count, go on
                errors.append(f"{self.source.name(index)}: {type(exc).__name__}: {exc}")
                log.warning("skipping unreadable sample %s", errors[-1])
                continue
            sample.update(index=index, skipped=len(errors), errors=errors)
            return sample
        raise DataError(f"{len(errors)} samples in a row could not be read; the last: {errors[-1]}")


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch: pixels [B,3,H,W], conditions {name: [B,...]}, captions, indices, skip counts."""
    names = list(samples[0]["conditions"])
    return {
        "pixels": torch.stack([s["pixels"] for s in samples]),
        "conditions": {n: torch.stack([s["conditions"][n] for s in samples]) for n in names},
        "captions": [s["caption"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "skipped": sum(s["skipped"] for s in samples),
        "errors": [e for s in samples for e in s["errors"]],
    }


class StreamBatches(torch.utils.data.Sampler):
    """Batches of stream positions for one process: micro-batch m of the run holds positions
    offset + [(m·W + rank)·B, (m·W + rank + 1)·B), so every process reads its own slice of the same global stream
    (`offset`: the samples a resumed run's checkpoint had read, whatever its number of processes)."""

    def __init__(self, batch_size: int, rank: int, world_size: int, start_micro: int, offset: int = 0) -> None:
        self.batch_size, self.rank, self.world_size, self.start = batch_size, rank, world_size, start_micro
        self.offset = offset

    def __iter__(self):
        m = self.start
        while True:
            first = self.offset + (m * self.world_size + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))
            m += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(), which the loop never calls
        return 2**62


def next_batch(batches) -> dict[str, Any]:
    """The next batch of a loader; our error raised in a DataLoader worker keeps its one-line message (torch re-raises
    it with the worker's whole traceback as the message)."""
    from t2iadapter.errors import T2IAdapterError

    try:
        return next(batches)
    except T2IAdapterError as exc:
        text = str(exc)
        if not (text.startswith("Caught ") and "Original Traceback" in text):
            raise
        last = text.rstrip().splitlines()[-1]  # "t2iadapter.train.data.DataError: <the message>"
        raise type(exc)(last.split(": ", 1)[-1]) from None


def make_loader(stream: SampleStream, batch_size: int, rank: int, world_size: int, start_micro: int,
                num_workers: int, offset: int = 0) -> torch.utils.data.DataLoader:
    """An endless DataLoader over the stream, starting at micro-batch `start_micro` after `offset` samples (resume)."""
    return torch.utils.data.DataLoader(
        stream,
        batch_sampler=StreamBatches(batch_size, rank, world_size, start_micro, offset),
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
