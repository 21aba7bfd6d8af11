"""The validation grid: one row per (item, seed): condition | base alone | base + adapter(s), at fixed seeds."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def validation_items(config, resolution: int) -> list[tuple[str, dict[str, Any]]]:
    """(prompt, {condition name: PIL image, or a style adapter's tokens [1, L, width]}) pairs from the config: explicit
    files (a style adapter's: a reference image, or a `.safetensors` of tokens as it trains on), or world scenes."""
    from PIL import Image

    from t2iadapter.train.data import TENSOR_SUFFIXES, _load_tokens, _open_image, resize_crop

    val = config.validation
    names = [a.condition for a in config.adapters]
    style = {a.condition for a in config.adapters if a.kind == "style"}

    def read(name: str, path: Any) -> Any:
        if name not in style:
            return resize_crop(_open_image(path), resolution)
        if Path(str(path)).suffix.lower() in TENSOR_SUFFIXES:
            return _load_tokens(Path(path))[None]
        return _open_image(path)  # the pipeline's style encoder takes the whole reference

    items: list[tuple[str, dict[str, Any]]] = []
    for prompt, cond in zip(val.prompts, val.conditions):
        paths = cond if isinstance(cond, dict) else {names[0]: cond}
        items.append((prompt, {n: read(n, p) for n, p in paths.items()}))
    if val.world_seeds:
        from t2iadapter.demo import world

        for seed in val.world_seeds:
            scene = world.generate(int(seed), size=resolution)
            conds = {}
            for spec in config.adapters:
                if spec.extractor is not None:
                    from t2iadapter import extractors

                    conds[spec.condition] = extractors.get(spec.extractor)(Image.fromarray(scene.image))
                else:
                    arr = world.render_condition(scene, spec.condition)
                    conds[spec.condition] = Image.fromarray(arr.astype("uint8") * (255 if arr.dtype == bool else 1))
            items.append((scene.caption, conds))
    return items


def render_grid(trainer, path: Path) -> Path:
    """Sample every validation item with the adapter weights at 0 and at 1, and write the grid PNG.

    The pipeline runs copies of the modules (EMA weights, or the live ones): training state is never touched.
    """
    from PIL import Image

    from t2iadapter.generation.pipeline import AdapterPipeline

    config = trainer.config
    val = config.validation
    res = config.data.resolution
    modules = trainer.export_modules()
    fuser = modules.pop("fuser", None)
    names = [a.condition for a in config.adapters]
    adapters = dict(zip(names, modules.values()))  # condition name → module: the fuser's task names
    controlnets = {n: m.controlnet for n, m in adapters.items() if m.kind == "controlnet"}  # issue 16
    adapters = {n: m for n, m in adapters.items() if n not in controlnets}
    pipe = AdapterPipeline(trainer.base, adapters=adapters, fuser=fuser, controlnets=controlnets)
    spatial = [n for n in names if n in controlnets or adapters[n].kind != "style"]
    style = [n for n in names if n not in spatial]
    compose = "fuser" if fuser is not None else "sum"
    rows = []
    for prompt, conds in validation_items(config, res):
        with_style = {"style_image": conds[style[0]]} if style else {}  # the base column runs without the tokens
        pictures = [conds.get(n) for n in names if isinstance(conds.get(n), Image.Image)]  # tokens have no picture
        shown = pictures[0].convert("RGB").resize((res, res)) if pictures else Image.new("RGB", (res, res), "grey")
        for seed in val.seeds:
            common = dict(conditions={n: conds[n] for n in spatial}, steps=val.steps, seed=int(seed), size=(res, res),
                          guidance_scale=val.guidance_scale, compose=compose, progress=False)
            base_img = pipe(prompt, weights={n: 0.0 for n in spatial}, **common).images[0]
            with_img = pipe(prompt, weights={n: 1.0 for n in spatial + style}, **with_style, **common).images[0]
            rows.append([shown, base_img.convert("RGB").resize((res, res)), with_img.convert("RGB").resize((res, res))])
    grid = Image.new("RGB", (3 * res, len(rows) * res), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (c * res, r * res))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    log.info("validation grid %s", path)
    return path
