"""Training data sources (folder, `datasets`, WebDataset, world), the seeded stream, and SDXL/checkpointing steps."""
import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from t2iadapter.train.config import AdapterSpec, DataConfig, load_config
from t2iadapter.train.data import SampleStream, build_source, collate, make_loader

ROOT = Path(__file__).resolve().parents[1]
SPECS = (AdapterSpec(condition="sketch", in_channels=1), AdapterSpec(kind="full", condition="depth", in_channels=3))


def _png(color, size=(96, 64), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _check(stream: SampleStream, n: int) -> None:
    batch = collate([stream[k] for k in range(n)])
    assert batch["pixels"].shape == (n, 3, 64, 64) and -1 <= batch["pixels"].min() and batch["pixels"].max() <= 1
    assert batch["conditions"]["sketch"].shape == (n, 1, 64, 64)
    assert batch["conditions"]["depth"].shape == (n, 3, 64, 64)
    assert 0 <= batch["conditions"]["depth"].min() and batch["conditions"]["depth"].max() <= 1
    assert all(isinstance(c, str) for c in batch["captions"])


def test_datasets_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"image": [Image.new("RGB", (80, 64), (i * 50, 20, 90)) for i in range(3)], "text": ["a", "b", "c"],
            "sk": [Image.new("L", (80, 64), 255 * (i % 2)) for i in range(3)],
            "dp": [Image.new("RGB", (80, 64), (i * 60,) * 3) for i in range(3)]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"), "sk": datasets.Image(),
                                  "dp": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    data = DataConfig(kind="datasets", path=str(tmp_path / "ds"), conditions={"sketch": "sk", "depth": "dp"},
                      resolution=64)
    stream = SampleStream(build_source(data, SPECS), data, SPECS, seed=0)
    assert len(stream) == 3
    _check(stream, 3)


def test_webdataset_source_skips_broken_entries(tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            entries = {f"{i:04d}.jpg" if i else f"{i:04d}.png": _png((i * 40, 80, 20)), f"{i:04d}.txt": b"a red circle",
                       f"{i:04d}.sketch.png": _png(255, mode="L"), f"{i:04d}.depth.png": _png((30, 30, 30))}
            if i == 2:
                entries[f"{i:04d}.jpg"] = b"not a jpeg"
            for name, data in entries.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = DataConfig(kind="webdataset", path=str(tmp_path / "shard-*.tar"), text_column="txt",
                      conditions={"sketch": "sketch.png", "depth": "depth.png"}, resolution=64)
    stream = SampleStream(build_source(data, SPECS), data, SPECS, seed=0)
    assert len(stream) == 3
    batch = collate([stream[k] for k in range(3)])
    assert batch["skipped"] == 1 and 2 not in batch["index"].tolist()
    _check(stream, 2)


def test_world_stream_order_is_seeded_and_sharded_by_rank():
    data = DataConfig(kind="world", resolution=64, num_samples=8)
    stream = SampleStream(build_source(data, SPECS), data, SPECS, seed=3)
    _check(stream, 2)
    assert sorted(stream.order(0).tolist()) == list(range(8)) and not torch.equal(stream.order(0), stream.order(1))
    r0 = next(iter(make_loader(stream, 2, rank=0, world_size=2, start_micro=1, num_workers=0)))
    r1 = next(iter(make_loader(stream, 2, rank=1, world_size=2, start_micro=1, num_workers=0)))
    order = stream.order(0).tolist()
    assert r0["index"].tolist() == order[4:6] and r1["index"].tolist() == order[6:8]


def test_sdxl_base_and_gradient_checkpointing_steps():
    from t2iadapter.bases import load_base
    from t2iadapter.train.loop import Trainer

    torch.set_num_threads(1)
    args = ["base=tiny-xl", "adapter.kind=full_xl", "recipe.batch_size=1", "recipe.text_dropout=0.5",
            "output_dir=unused", "checkpoint.every=0"]
    base = load_base("tiny-xl")
    grads = []
    for checkpointing in (False, True):
        cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml", [*args, f"recipe.gradient_checkpointing={checkpointing}"])
        trainer = Trainer(cfg, base=base)
        batch = next(iter(make_loader(trainer.stream, 1, 0, 1, 0, 0)))
        trainer.micro_loss(batch).backward()
        grads.append([p.grad.clone() for p in trainer.params])
    for a, b in zip(*grads):  # recomputation changes nothing, even with the UNet's own weights frozen
        torch.testing.assert_close(a, b)
    assert any(g.abs().sum() > 0 for g in grads[1])


def test_folder_images_without_a_caption_are_counted_aloud(tmp_path, caplog):
    """A folder without captions, or a metadata.jsonl whose file_name misses every image (a wrong prefix), trained
    text-free adapters with no word."""
    import json
    import logging

    import numpy as np
    from PIL import Image

    from t2iadapter.train.data import FolderSource

    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "1.txt").write_text("a red circle")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "train/0.png", "text": "a blue square"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="t2iadapter.train.data"):
        source = FolderSource(tmp_path, {})
    assert [source._caption(p) for p in source.files] == ["", "a red circle", ""]
    said = " | ".join(r.getMessage() for r in caplog.records)
    assert "1 of its 1 rows name no image" in said and "'train/0.png'" in said
    assert "2 of 3 images under" in said and "empty prompt" in said


def test_folder_captions_come_from_the_text_column_and_a_missing_field_is_said(tmp_path, caplog):
    """metadata.jsonl rows with a `caption` field (not `text`) trained every image with an empty prompt, silently:
    `data.text_column` names the field, as for `datasets`, and rows without it are counted aloud."""
    import json
    import logging

    from t2iadapter.train.data import FolderSource

    (tmp_path / "sk").mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
        Image.new("L", (64, 64), 255).save(tmp_path / "sk" / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "caption": f"scene {i}"} for i in range(2)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = (AdapterSpec(condition="sketch"),)
    data = DataConfig(kind="folder", path=str(tmp_path), conditions={"sketch": "sk"}, resolution=64,
                      text_column="caption")
    stream = SampleStream(build_source(data, spec), data, spec, seed=0)
    assert sorted(stream[k]["caption"] for k in range(2)) == ["scene 0", "scene 1"]
    with caplog.at_level(logging.WARNING, logger="t2iadapter.train.data"):
        FolderSource(tmp_path, {"sketch": "sk"})  # text_column "text": no row has it
    said = " | ".join(r.getMessage() for r in caplog.records)
    assert "2 rows have no 'text' field" in said and "caption, file_name" in said
    assert "2 of 2 images under" in said


def _shard(path: Path, entries: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_captions_from_txt_by_default_and_missing_ones_are_said(tmp_path, caplog):
    """The default text_column `text` read no `KEY.txt` caption (WebDataset's own key, the one the docs show): every
    sample trained with an empty prompt, silently."""
    import logging

    spec = (AdapterSpec(condition="sketch"),)
    _shard(tmp_path / "a.tar", {"0.png": _png((9, 9, 9)), "0.txt": b"a red circle", "0.sketch.png": _png(255, mode="L")})
    data = DataConfig(kind="webdataset", path=str(tmp_path / "a.tar"), conditions={"sketch": "sketch.png"},
                      resolution=64)
    assert SampleStream(build_source(data, spec), data, spec, seed=0)[0]["caption"] == "a red circle"
    _shard(tmp_path / "b.tar", {"0.png": _png((9, 9, 9)), "0.cap": b"a blue square", "0.sketch.png": _png(255, mode="L")})
    with caplog.at_level(logging.WARNING, logger="t2iadapter.train.data"):
        build_source(DataConfig(kind="webdataset", path=str(tmp_path / "b.tar"), resolution=64,
                                conditions={"sketch": "sketch.png"}), spec)
    said = " | ".join(r.getMessage() for r in caplog.records)
    assert "1 of 1 samples" in said and "'text' or 'txt'" in said and "empty prompt" in said
    data = DataConfig(kind="webdataset", path=str(tmp_path / "b.tar"), conditions={"sketch": "sketch.png"},
                      resolution=64, text_column="cap")
    assert SampleStream(build_source(data, spec), data, spec, seed=0)[0]["caption"] == "a blue square"


def test_a_relative_condition_folder_in_both_data_path_and_the_working_directory_is_refused(tmp_path, monkeypatch):
    """`conditions: {sketch: sk}` with a `sk` folder under data.path and another in the working directory took the
    working directory's: other sketches under the same file names (silently misaligned), and data.path's own `sk`
    images trained as photos."""
    from t2iadapter.train.data import DataError

    (tmp_path / "data" / "sk").mkdir(parents=True)
    (tmp_path / "sk").mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "data" / f"{i}.png")
        Image.new("L", (64, 64), 255).save(tmp_path / "data" / "sk" / f"{i}.png")
        Image.new("L", (64, 64), 0).save(tmp_path / "sk" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    spec = (AdapterSpec(condition="sketch"),)
    with pytest.raises(DataError, match="both .* absolute path"):
        build_source(DataConfig(kind="folder", path="data", conditions={"sketch": "sk"}, resolution=64), spec)
    data = DataConfig(kind="folder", path="data", conditions={"sketch": str(tmp_path / "data" / "sk")}, resolution=64)
    source = build_source(data, spec)
    assert len(source) == 2 and SampleStream(source, data, spec, seed=0)[0]["conditions"]["sketch"].min() == 1
    (tmp_path / "sk").rename(tmp_path / "elsewhere")  # only under data.path: that one
    data = DataConfig(kind="folder", path="data", conditions={"sketch": "sk"}, resolution=64)
    source = build_source(data, spec)
    assert len(source) == 2 and SampleStream(source, data, spec, seed=0)[0]["conditions"]["sketch"].min() == 1


def test_unreadable_data_in_a_worker_is_one_line(tmp_path, capsys):
    """With data.num_workers > 0 the 'samples in a row could not be read' error came back from the DataLoader worker
    with the worker's whole traceback as its message: `error:` and 20 lines of traceback."""
    from t2iadapter.cli import main

    (tmp_path / "data" / "sk").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "data" / f"{i}.png").write_bytes(b"not a png")
        Image.new("L", (64, 64), 255).save(tmp_path / "data" / "sk" / f"{i}.png")
    code = main(["train", "--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "--set", "data.kind=folder",
                 "--set", f"data.path={tmp_path / 'data'}", "--set", "data.conditions={sketch: sk}",
                 "--set", "data.num_samples=null", "--set", "data.num_workers=1", "--set", "max_steps=1",
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert line.startswith("error: 3 samples in a row could not be read; the last: ")
