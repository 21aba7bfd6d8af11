"""Ship a trained demo into the package: the base, the adapters and fuser, the ControlNets (issue 11 item 4).

    python scripts/ship_demo.py --base .demo-v2/s5/export --adapters RUN/adapters --controlnets RUN/controlnets --force

BASE is `scripts/train_demo_base.py --phase export`'s folder (a diffusers pipeline with demo_config.json; its
samples.png and train_log.json stay behind: the run log belongs in docs/demo/), ADAPTERS the fp16 files of
`scripts/train_demo_adapters.py` ({sketch,seg,depth,pose,color,fuser}.safetensors), CONTROLNETS its
controlnets/ folder (optional). Before the shipped folder is touched, everything is staged beside it and checked:
  * every network file is safetensors and every floating tensor in it fp16; nothing else with weights;
  * all of it together within --budget-mib (the issue's 96 MiB);
  * the staged base, each adapter, the fuser and each ControlNet load through the package's own loaders (which
    check a stored config against its tensors and an adapter's features against the UNet's slots), and one
    two-step 64² generation runs with every adapter composed by the fuser and every ControlNet, on a world scene.
Then the old folder is replaced by the staged one in one rename (`--force` is needed when it exists). Prints each
file with its size.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
try:
    import t2iadapter  # noqa: F401 - installed (pip install -e .)
except ImportError:  # a bare checkout: use the source tree
    sys.path.insert(0, str(SRC))

from t2iadapter import assets  # noqa: E402

ADAPTERS = ("sketch", "seg", "depth", "pose", "color", "fuser")
BASE_NETWORKS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors")  # fmt: skip
BASE_LEFT_BEHIND = ("samples.png", "train_log.json")
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
logger = logging.getLogger("ship_demo")


class ShipError(Exception):
    """Something about the inputs that the person shipping must fix (one line)."""


def stage(base: Path, adapters: Path, controlnets: Path | None, staged: Path) -> None:
    """Copy what ships into `staged` (base/, adapters/, controlnets/) in the shipped layout."""
    if not (base / "model_index.json").is_file() or not (base / "demo_config.json").is_file():
        raise ShipError(f"{base} is not an exported demo base (model_index.json and demo_config.json expected); "
                        "pass the folder of train_demo_base.py --phase export")  # fmt: skip
    missing = [n for n in BASE_NETWORKS if not (base / n).is_file()]
    if missing:
        raise ShipError(f"{base} lacks {', '.join(missing)}; export the base again (fp16 safetensors)")
    shutil.copytree(base, staged / "base", ignore=shutil.ignore_patterns(*BASE_LEFT_BEHIND))
    missing = [n for n in ADAPTERS if not (adapters / f"{n}.safetensors").is_file()]
    if missing:
        raise ShipError(f"{adapters} lacks {', '.join(f'{n}.safetensors' for n in missing)}; the demo ships "
                        f"{', '.join(ADAPTERS)} (scripts/train_demo_adapters.py writes them)")  # fmt: skip
    (staged / "adapters").mkdir()
    for name in ADAPTERS:
        shutil.copy2(adapters / f"{name}.safetensors", staged / "adapters")
    if controlnets is not None:
        files = sorted(controlnets.glob("*.safetensors"))
        if not files:
            raise ShipError(f"{controlnets} holds no .safetensors ControlNet; leave --controlnets out to ship none")
        (staged / "controlnets").mkdir()
        for f in files:
            shutil.copy2(f, staged / "controlnets")


def check_files(staged: Path, budget_mib: float) -> list[tuple[str, int]]:
    """Safetensors only, floating tensors fp16, all within the budget; (relative path, bytes) of every file."""
    from safetensors import safe_open

    files = sorted(p for p in staged.rglob("*") if p.is_file())
    pickles = [str(p.relative_to(staged)) for p in files if p.suffix in PICKLES]
    if pickles:
        raise ShipError(f"pickled weights would ship: {', '.join(pickles)}; the demo ships safetensors only")
    for path in (p for p in files if p.suffix == ".safetensors"):
        with safe_open(str(path), "pt") as f:
            wide = [k for k in f.keys() if f.get_slice(k).get_dtype() in ("F32", "F64", "BF16")]
        if wide:
            raise ShipError(f"{path.relative_to(staged)} holds {len(wide)} tensors that are not fp16 (e.g. {wide[0]}); "
                            "the demo ships fp16: export it again")  # fmt: skip
    sizes = [(str(p.relative_to(staged)), p.stat().st_size) for p in files]
    total = sum(s for _, s in sizes)
    if total > budget_mib * 2**20:
        raise ShipError(f"the demo would take {total / 2**20:.1f} MiB, over the {budget_mib:g} MiB budget")
    return sizes


def check_generation(staged: Path) -> None:
    """Load everything staged through the package's loaders and run one short generation with all of it."""
    import numpy as np
    import torch

    from t2iadapter.demo import world
    from t2iadapter.generation import AdapterPipeline, AdapterUse, ControlNetUse, GenerationRequest

    names = [n for n in ADAPTERS if n != "fuser"]
    cn_files = sorted((staged / "controlnets").glob("*.safetensors")) if (staged / "controlnets").is_dir() else []
    pipe = AdapterPipeline.from_pretrained(
        str(staged / "base"), {n: str(staged / "adapters" / f"{n}.safetensors") for n in names},
        fuser=str(staged / "adapters" / "fuser.safetensors"), device="cpu", dtype=torch.float32,
        controlnets={f.stem: str(f) for f in cn_files},
    )  # fmt: skip
    scene = world.generate(world.BUILTIN_SEEDS[0], 64)
    conditions = {n: world.render_condition(scene, n) for n in world.CONDITIONS}
    uses = []
    for f in cn_files:
        known = [c for c in world.CONDITIONS if c in f.stem]
        if not known:
            raise ShipError(f"ControlNet {f.name}: its name must contain its condition ({', '.join(world.CONDITIONS)})")
        uses.append(ControlNetUse(f.stem, conditions[known[0]]))
    request = GenerationRequest(scene.caption, adapters=tuple(AdapterUse(n, conditions[n]) for n in names),
                                controlnets=tuple(uses), compose="fuser", steps=2, seed=0, size=(64, 64))  # fmt: skip
    image = np.asarray(pipe.generate(request).image, dtype=np.float32)
    if image.shape != (64, 64, 3) or not np.isfinite(image).all():
        raise ShipError(f"the staged demo generated a broken image (shape {image.shape}); do not ship it")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="the exported base folder (train_demo_base.py --phase export)")
    p.add_argument("--adapters", required=True, help="folder of {sketch,seg,depth,pose,color,fuser}.safetensors")
    p.add_argument("--controlnets", default=None, help="folder of ControlNet single files to ship (optional)")
    p.add_argument("--dest", default=str(assets.DEMO), help="where the demo lives (default: the package's)")
    p.add_argument("--budget-mib", type=float, default=96.0, help="size limit of everything shipped (default 96)")
    p.add_argument("--force", action="store_true", help="replace the demo at --dest")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    dest = Path(a.dest)
    if dest.exists() and not a.force:
        print(f"error: {dest} exists; pass --force to replace the shipped demo", file=sys.stderr)
        return 2
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".ship-") as tmp:
        staged = Path(tmp) / "demo"
        staged.mkdir()
        try:
            stage(Path(a.base), Path(a.adapters), Path(a.controlnets) if a.controlnets else None, staged)
            sizes = check_files(staged, a.budget_mib)
            check_generation(staged)
        except ShipError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        old = Path(tmp) / "old"
        if dest.exists():
            dest.rename(old)  # same filesystem: two renames, and the old demo goes with the staging folder
        staged.rename(dest)
    for name, size in sizes:
        print(f"{size / 2**20:8.2f} MiB  {name}")
    print(f"{sum(s for _, s in sizes) / 2**20:8.2f} MiB  in all (budget {a.budget_mib:g} MiB) -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
