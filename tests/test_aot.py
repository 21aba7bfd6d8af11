"""Fast mode's UNet through AOTInductor (issue 18, `optimize(aot=True)`): the same images as the eager UNet, a package
built once and loaded by a new process with other weights of the same architecture, weights changed in place, bad
files, refusals."""
import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from t2iadapter import unet_hook
from t2iadapter.bases import load_base
from t2iadapter.errors import ConfigError
from t2iadapter.generation import aot
from t2iadapter.generation import compile_cache as cc
from t2iadapter.generation.fast import status as fast_status
from t2iadapter.pipeline import AdapterPipeline

ROOT = Path(__file__).resolve().parents[1]

RUN = textwrap.dedent("""
    import json, sys, numpy as np, torch
    from t2iadapter.bases import load_base
    from t2iadapter.generation import fast
    from t2iadapter.pipeline import AdapterPipeline
    from tiny_models import PROMPT, condition, random_adapter
    torch.set_num_threads(1)
    folder, other_weights = sys.argv[1], sys.argv[2] == "1"
    base = load_base("tiny")
    if other_weights:  # another checkpoint of the same architecture: the package must not carry the first one's
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in base.unet.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    pipe = AdapterPipeline(base, {"sketch": random_adapter(base, 1, 3)})
    cond = {"sketch": condition(64, "L", 4)}

    def image():
        return np.asarray(pipe(PROMPT, cond, steps=2, size=(64, 64), seed=1, progress=False, output_type="np").image)

    pipe.optimize(compile=False, dtype=torch.float32)  # the same fast loop, the UNet eager: the reference
    eager = image()
    pipe.optimize(aot=True, dtype=torch.float32, cache_dir=folder)
    first = image()
    out = {"status": [e.status for e in pipe.compile_cache.events], "lines": [e.line() for e in pipe.compile_cache.events],
           "diff": float(np.abs(first - eager).max()), "fast": fast.status(pipe)}
    with torch.no_grad():  # weights changed in place after a call (as a LoRA fused later would)
        for p in base.unet.parameters():
            p.mul_(1.01)
    changed = image()
    unet = base.unet.forward
    base.unet.forward = unet.eager
    out["diff_changed"] = float(np.abs(changed - image()).max())
    out["change_seen"] = float(np.abs(changed - first).max())
    print(json.dumps(out))
""")


def run(folder: Path, other_weights: bool) -> dict:
    script = folder.parent / "aot_run.py"
    script.write_text(RUN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), OMP_NUM_THREADS="1",
               TORCHINDUCTOR_CACHE_DIR=str(folder.parent / f"inductor-{int(other_weights)}"))
    done = subprocess.run([sys.executable, str(script), str(folder), "1" if other_weights else "0"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_aot_unet_equals_eager_and_a_new_process_loads_it_for_other_weights(tmp_path):
    """Process 1 exports and compiles the tiny UNet (AOTInductor, CPU) and saves the package: its image equals the
    eager UNet's. Process 2, other weights of the same architecture, loads the package (no compile) and gets its own
    weights' image — the package holds code, not weights, and what torch folds from the weights is folded at load.
    In both, weights changed in place after a call are seen by the next call."""
    folder = tmp_path / "cache"
    first = run(folder, other_weights=False)
    assert first["status"] == ["compiled"] and first["diff"] < 1e-4, first
    assert first["fast"]["aot"] == "ok" and first["fast"]["compiled"] == {}  # decoder and adapter eager with aot
    assert "fast mode (aot): compiled 64x64, 1 image" in first["lines"][0]
    packages = sorted(p.name for p in folder.rglob("*") if p.is_file())
    assert len(packages) == 2 and packages[0].startswith("unet-") and packages[0].endswith(".json")
    second = run(folder, other_weights=True)
    assert second["status"] == ["loaded"] and second["diff"] < 1e-4, second
    for out in (first, second):
        assert out["diff_changed"] < 1e-4 and out["change_seen"] > 1e-3, out


def test_sdxl_unet_with_added_conditions_exports_as_the_package_takes_it():
    """SDXL's UNet call (pooled text embeddings and time ids: a dict of inputs; adapter features) flattened, exported
    as AotUnet exports it, and run: the eager numbers. (The AOTInductor compile after export is the SD1 test's.)"""
    torch.manual_seed(0)
    unet = load_base("tiny-xl").unet.eval()
    features = [torch.randn_like(f) for f in unet_hook.no_features(unet, 2, (16, 16), dtype=torch.float32,
                                                                    device=torch.device("cpu"))]
    kwargs = dict(encoder_hidden_states=torch.randn(2, 77, unet.config.cross_attention_dim), return_dict=False,
                  added_cond_kwargs={"text_embeds": torch.randn(2, unet.config.projection_class_embeddings_input_dim
                                                                - 6 * unet.config.addition_time_embed_dim),
                                     "time_ids": torch.randn(2, 6)},
                  down_intrablock_additional_residuals=features)
    layout, tensors = aot.flatten((torch.randn(2, 4, 16, 16), torch.tensor(500)), kwargs)
    flat = aot._Flat(unet, unet.forward, layout)
    with torch.no_grad():
        program = torch.export.export(flat, tuple(tensors), strict=False)
        out = program.module()(*tensors)
        ref = unet(**aot.rebuild(layout, tensors), return_dict=False)[0]
    assert torch.allclose(out, ref, atol=1e-5) and {n.split(".")[0] for n in program.state_dict} == {"unet"}


def test_layout_round_trip_and_signature():
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor(3), torch.randn(2, 5, 7)
    feats = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)]
    added = {"time_ids": torch.randn(2, 6), "text_embeds": torch.randn(2, 9)}
    layout, tensors = aot.flatten((x, t), dict(encoder_hidden_states=ctx, return_dict=False, timestep_cond=None,
                                               down_intrablock_additional_residuals=feats, added_cond_kwargs=added))
    back = aot.rebuild(layout, tensors)
    assert set(back) == {"sample", "timestep", "encoder_hidden_states", "down_intrablock_additional_residuals",
                         "added_cond_kwargs"}
    assert back["sample"] is x and back["down_intrablock_additional_residuals"][1] is feats[1]
    assert back["added_cond_kwargs"]["time_ids"] is added["time_ids"] and len(tensors) == 7
    assert aot.flatten((x, 5), dict(encoder_hidden_states=ctx, return_dict=False)) is None  # a number as timestep
    assert aot.flatten((x, t), dict(encoder_hidden_states=ctx)) is None  # return_dict defaults to True: eager
    sig = aot.signature(layout, tensors)
    i = next(k for k, v in enumerate(tensors) if v is x)
    for other in (x.contiguous(memory_format=torch.channels_last), x[:1], x.double()):  # strides, shape, dtype
        assert sig != aot.signature(layout, [*tensors[:i], other, *tensors[i + 1:]])


SETUP = cc.Setup(torch=torch.__version__, triton=None, python="3", diffusers="0.42", t2iadapter="0.1",
                 device="cpu (x86_64)", base="b", family="sd", dtype="float32", precision="fp32", mode="aoti", adapters=())
SIG = {"layout": [["sample", "tensor", None]], "tensors": [[[1, 4, 8, 8], [256, 64, 8, 1], "float32", "cpu"]]}


def test_bad_package_files_are_ignored_with_the_reason(tmp_path):
    store = aot.AotStore(tmp_path, SETUP)
    assert store.check(SIG) == "absent"
    path = store.path(SIG)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"package")
    path.with_suffix(".json").write_text("{not json")
    assert store.check(SIG).startswith("unreadable")
    import hashlib

    manifest = {"format": cc.FORMAT, "key": store.key(SIG), "sha256": hashlib.sha256(b"package").hexdigest()}
    path.with_suffix(".json").write_text(json.dumps(manifest))
    assert store.check(SIG) == ""
    path.with_suffix(".json").write_text(json.dumps({**manifest, "key": "edited"}))
    assert store.check(SIG).startswith("unreadable")
    path.write_bytes(b"packag")
    path.with_suffix(".json").write_text(json.dumps(manifest))
    assert store.check(SIG) == "checksum mismatch (a corrupt or truncated file)"
    # made by another torch, other code (diffusers, ours: the UNet's traced Python), or with other fused projections
    for field, value in [("torch", "9.9"), ("diffusers", "0.1"), ("t2iadapter", "0.0.1"), ("fuse_qkv", False)]:
        other = aot.AotStore(tmp_path, dataclasses.replace(SETUP, **{field: value}))
        other.folder.mkdir(parents=True)
        (other.folder / path.name).write_bytes(b"package")
        (other.folder / path.with_suffix(".json").name).write_text(json.dumps(manifest))
        assert other.check(SIG).startswith(f"written for another {field}"), field


def test_the_package_key_holds_the_code_versions_and_fused_qkv(tmp_path):
    """A package built by other diffusers or t2iadapter code gave other images silently; one built with fused q/k/v
    was loaded for separate projections and left the UNet eager for good."""
    import diffusers

    import t2iadapter

    pipe = AdapterPipeline(load_base("tiny"))
    fused = pipe.optimize(aot=True, dtype=torch.float32, cache_dir=tmp_path).compile_cache  # (nothing compiles yet)
    separate = pipe.optimize(aot=True, dtype=torch.float32, cache_dir=tmp_path, fuse_qkv=False).compile_cache
    assert fused.key(SIG)["diffusers"] == diffusers.__version__ and fused.key(SIG)["t2iadapter"] == t2iadapter.__version__
    assert fused.key(SIG)["fuse_qkv"] is True and separate.key(SIG)["fuse_qkv"] is False
    assert fused.path(SIG) != separate.path(SIG)


class FakePackage:
    """What `aoti_load_package` gives, without compiling: the constants it wants are its file's content (JSON)."""

    def __init__(self, path, device_index=-1):
        self.fqns = json.loads(Path(path).read_text())
        self.device_index = device_index

    def get_constant_fqns(self):
        return self.fqns

    def load_constants(self, constants, **kwargs):
        pass

    def __call__(self, *tensors):
        return torch.full((1,), 7.0)  # not what the eager forward gives: which of them ran shows


def fake_aot(monkeypatch, store, wants=None):
    """An AotUnet over a Linear "UNet" whose packages are fakes: building writes the names of the constants it wants
    (`wants`, else the UNet's own); (the AotUnet, the paths it built into)."""
    monkeypatch.setattr(torch._inductor, "aoti_load_package", FakePackage)
    unet = torch.nn.Linear(4, 4)
    model = aot.AotUnet(lambda *args, **kwargs: (torch.zeros(1),), unet, store)
    built = []

    def build(layout, tensors, path):
        built.append(path)
        path.write_text(json.dumps(wants or [f"unet.{n}" for n, _ in unet.named_parameters()]))

    model._build = build
    return model, built


def call(model):
    """A UNet call; 7 when a package ran it, 0 when the eager forward did."""
    return float(model(torch.zeros(1, 4, 8, 8), torch.tensor(1), torch.zeros(1, 3, 4), return_dict=False)[0][0])


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == aot.__name__]


def test_a_package_wanting_constants_the_unet_lacks_is_built_again(tmp_path, monkeypatch, caplog):
    """A sound file whose package wants constants this UNet lacks (built with fused q/k/v, or by older code) was
    loaded, and the UNet ran eagerly for good; it is built again."""
    old, _ = fake_aot(monkeypatch, aot.AotStore(tmp_path, SETUP), wants=["unet.to_qkv.weight"])
    assert call(old) == 0 and "lacks (unet.to_qkv.weight)" in old.error  # just built and still wrong: eager
    store = aot.AotStore(tmp_path, SETUP)  # a new process; its UNet has no such constant
    new, built = fake_aot(monkeypatch, store)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=aot.__name__):
        assert call(new) == 7 and call(new) == 7
    assert new.error is None and len(built) == 1 and [e.status for e in store.events] == ["compiled"]
    assert "wants constants this UNet lacks (unet.to_qkv.weight)" in store.events[0].reason
    assert len(warnings_of(caplog)) == 1 and "ignoring AOTInductor package" in warnings_of(caplog)[0]
    again = aot.AotStore(tmp_path, SETUP)
    assert call(fake_aot(monkeypatch, again)[0]) == 7 and again.events[0].status == "loaded"


def test_a_cache_folder_that_cannot_be_written_keeps_fast_mode_on(tmp_path, monkeypatch, caplog):
    """The package is built in a temporary folder and used from there, with one warning (it was thrown away and the
    UNet ran eagerly for the rest of the process)."""
    (tmp_path / "a-file").write_text("")
    store = aot.AotStore(tmp_path / "a-file" / "cache", SETUP)
    model, built = fake_aot(monkeypatch, store)
    with caplog.at_level(logging.WARNING, logger=aot.__name__):
        assert call(model) == 7 and call(model) == 7
    assert model.error is None and len(built) == 1 and not str(built[0]).startswith(str(tmp_path))
    assert len(warnings_of(caplog)) == 1 and warnings_of(caplog)[0].startswith("could not save the AOTInductor package")
    event = store.events[0]
    assert event.status == "compiled" and not event.saved and event.line().endswith("; not saved")


def test_builders_write_files_of_their_own_then_move_them_into_place(tmp_path, monkeypatch):
    """Two processes building one package at once each write their own file (they shared `unet-<digest>.partial.pt2`)."""
    first, built_first = fake_aot(monkeypatch, aot.AotStore(tmp_path, SETUP))
    second, built_second = fake_aot(monkeypatch, aot.AotStore(tmp_path, SETUP))
    build_first = first._build

    def meanwhile(layout, tensors, path):  # the other process starts and ends its build while this one builds
        build_first(layout, tensors, path)
        assert call(second) == 7

    first._build = meanwhile
    assert call(first) == 7 and first.error is None and second.error is None
    (a,), (b,) = built_first, built_second
    assert a != b and a.parent == b.parent == first.store.folder
    assert a.name.startswith(".unet-") and a.name.endswith(".partial.pt2")
    names = sorted(p.name for p in first.store.folder.iterdir())
    assert len(names) == 2 and names[0].startswith("unet-") and names[0].endswith(".json") and names[1].endswith(".pt2")
    mode = (first.store.folder / names[1]).stat().st_mode & 0o777
    assert mode == 0o666 & ~current_umask()  # not mkstemp's 0600: a shared cache folder serves its other users


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


@pytest.mark.parametrize("device, index", [(torch.device("cuda", 1), 1), (torch.device("cpu"), -1)])
def test_a_package_loads_onto_the_gpu_of_the_unet_weights(tmp_path, monkeypatch, device, index):
    """A pipeline on cuda:1 had its package loaded onto cuda:0 (`aoti_load_package` without `device_index`)."""
    model, _ = fake_aot(monkeypatch, aot.AotStore(tmp_path, SETUP))
    model._weights = {name: SimpleNamespace(device=device) for name in ("unet.weight", "unet.bias")}  # as if there
    model._kinds = [f"float32/{device.type}"]
    layout, tensors = aot.flatten((torch.zeros(1, 4, 8, 8), torch.tensor(1)),
                                  dict(encoder_hidden_states=torch.zeros(1, 3, 4), return_dict=False))
    assert model._load(layout, tensors).device_index == index


def test_aot_refusals_and_the_environment_default(monkeypatch, tmp_path):
    pipe = AdapterPipeline(load_base("tiny"))
    monkeypatch.setenv(aot.ENV, "1")  # a default where it applies: nothing to refuse without compiling
    pipe.optimize(compile=False, dtype=torch.float32)
    assert pipe.compile_cache is None and fast_status(pipe)["aot"] is None
    pipe.optimize(dtype=torch.float32, cache_dir=tmp_path)  # (nothing compiles before a call)
    assert isinstance(pipe.compile_cache, aot.AotStore) and isinstance(pipe.base.unet.forward, aot.AotUnet)
    monkeypatch.delenv(aot.ENV)
    with pytest.raises(ConfigError, match="needs compile=True and the inductor backend"):
        pipe.optimize(aot=True, compile=False, dtype=torch.float32)
    with pytest.raises(ConfigError, match="needs compile=True and the inductor backend"):
        pipe.optimize(aot=True, backend="eager", dtype=torch.float32)


def test_aot_options_reach_optimize():
    """`--aot` on generate, serve and compile (a one-line error without --fast is in test_compile_cache.py)."""
    from t2iadapter.cli import build_parser
    from t2iadapter.commands.serve import settings_from

    parser = build_parser()
    assert settings_from(parser.parse_args(["serve", "--base", "tiny", "--fast", "--aot", "--device", "cpu"]))[0].aot is True
    assert settings_from(parser.parse_args(["serve", "--base", "tiny", "--fast", "--device", "cpu"]))[0].aot is None
    assert parser.parse_args(["compile", "--base", "tiny", "--size", "64x64", "--aot"]).aot is True
    assert parser.parse_args(["generate", "--prompt", "x", "--out", "x.png", "--fast", "--aot"]).aot is True
