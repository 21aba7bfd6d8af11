"""Few-step sampling (issue 15): LCM and TCD by name equal diffusers' adapter pipeline; guidance <= 1 runs one branch."""
import json

import numpy as np
import pytest
import torch

from t2iadapter.pipeline import AdapterPipeline
from script_modules import load_script
from test_pipeline_parity import sd_reference
from tiny_models import PROMPT, as_diffusers, condition, random_adapter


@pytest.mark.parametrize("name,cls", [("lcm", "LCMScheduler"), ("tcd", "TCDScheduler")])
def test_few_step_schedulers_match_diffusers_and_skip_the_unconditional_branch(sd_base, name, cls):
    import diffusers

    module = random_adapter(sd_base, 1, 9)
    cond = condition(64, "L", 9)
    batches = []
    hook = sd_base.unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    try:
        ours = AdapterPipeline(sd_base, [module])(PROMPT, [cond], steps=4, seed=2, size=(64, 64), guidance_scale=1.0,
                                                  scheduler=name, output_type="np", progress=False).images[0]
    finally:
        hook.remove()
    assert batches == [1] * 4  # guidance 1: no unconditional branch, one UNet call per step
    ref_pipe = sd_reference(sd_base, as_diffusers(module))
    ref_pipe.scheduler = getattr(diffusers, cls).from_config(sd_base.scheduler.config)
    ref = ref_pipe(PROMPT, image=cond, num_inference_steps=4, height=64, width=64, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(2), output_type="np").images[0]
    assert np.abs(ours - ref).max() <= 1e-4


def test_fewstep_benchmark_smoke(tmp_path, monkeypatch):
    bench = load_script("benchmarks/bench_fewstep.py", monkeypatch)
    bench.main(["--smoke", "--only", "tiny", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_fewstep.json").read_text())["rows"]["tiny"]
    assert set(rows) == {"diffusers", "ours-eager", "ours-fast"}
    assert rows["ours-eager"]["max_px_diff"] < 0.5 and rows["ours-fast"]["max_px_diff"] < 0.5
    assert "| tiny | ours-fast |" in (tmp_path / "bench_fewstep.md").read_text()
    for row in rows.values():  # every stage was seen and the stages add up to the call
        stages = row["stages"]
        assert all(stages[k] > 0 for k in ("text", "adapter", "unet steps", "decode")), stages
        parts = sum(v for k, v in stages.items() if k != "total")
        assert stages["other"] >= 0 and abs(parts - stages["total"]) <= 0.05 * stages["total"] + 0.1, stages


def lcm_unet_base(base, seed):
    """The base with a seeded guidance-distilled UNet (LCM's `time_cond_proj_dim`: LCM_Dreamshaper, lcm-sdxl) and LCM."""
    import dataclasses

    from diffusers import LCMScheduler, UNet2DConditionModel

    config = {k: v for k, v in base.unet.config.items() if k != "_use_default_values"}  # (else it drops the option)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config, time_cond_proj_dim=32).eval()
    return dataclasses.replace(base, unet=unet, scheduler=LCMScheduler.from_config(base.scheduler.config))


def test_a_guidance_distilled_unet_takes_the_scale_as_input_as_diffusers(sd_base, xl_base):
    """An LCM UNet with `time_cond_proj_dim` gets the guidance scale's embedding as `timestep_cond` and runs one branch
    (diffusers' every pipeline); it ran CFG on both branches without the embedding (max pixel difference 0.17)."""
    from test_img2img import photo

    base = lcm_unet_base(sd_base, 5)
    module = random_adapter(base, 1, 9)
    cond = condition(64, "L", 9)
    batches = []
    pipe = AdapterPipeline(base, [module])
    hook = base.unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    try:
        ours = pipe(PROMPT, [cond], steps=4, seed=2, size=(64, 64), guidance_scale=8.0, output_type="np",
                    progress=False).images[0]
    finally:
        hook.remove()
    assert batches == [1] * 4
    ref = sd_reference(base, as_diffusers(module))(PROMPT, image=cond, num_inference_steps=4, height=64, width=64,
                                                    guidance_scale=8.0, generator=torch.Generator().manual_seed(2),
                                                    output_type="np").images[0]
    assert np.abs(ours - ref).max() <= 1e-4
    request = pipe.request(PROMPT, [cond], steps=4, seed=2, size=(64, 64), guidance_scale=8.0)
    batched = pipe.generate_batch([request, request], output_type="np")  # the batched loop passes it too
    assert np.abs(batched[1].images[0] - ref).max() <= 1e-4
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from test_img2img import xl_kwargs
    xl = lcm_unet_base(xl_base, 6)
    image = photo(128, 3)
    ours = AdapterPipeline(xl)(PROMPT, init_image=image, strength=0.5, steps=4, seed=3, guidance_scale=6.0,
                               output_type="np", progress=False).images[0]
    ref = StableDiffusionXLImg2ImgPipeline(**xl_kwargs(xl))(PROMPT, image=image, strength=0.5, num_inference_steps=4,
                                                            guidance_scale=6.0, generator=torch.Generator().manual_seed(3),
                                                            output_type="np").images[0]
    assert np.abs(ours - ref).max() <= 1e-4
