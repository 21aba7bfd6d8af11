"""Parity: our pipeline equals diffusers' adapter pipelines with the same tiny components, seed and weights."""
import numpy as np
import torch
from diffusers import MultiAdapter, StableDiffusionAdapterPipeline, StableDiffusionXLAdapterPipeline

from t2iadapter.pipeline import AdapterPipeline
from tiny_models import PROMPT, as_diffusers, condition, random_adapter


def sd_reference(base, adapter):
    return StableDiffusionAdapterPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                                          adapter=adapter, scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)


def xl_reference(base, adapter):
    return StableDiffusionXLAdapterPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                                            tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
                                            adapter=adapter, scheduler=base.scheduler)




def test_sd_single_adapter_matches_diffusers(sd_base):
    ours_ad = random_adapter(sd_base, 1, 1)
    cond = condition(64, "L", 0)
    ours = AdapterPipeline(sd_base, [ours_ad])(PROMPT, [cond], steps=4, seed=0, size=(64, 64), weights=[0.8],
                                                output_type="np", progress=False).images[0]
    ref = sd_reference(sd_base, as_diffusers(ours_ad))(PROMPT, image=cond, num_inference_steps=4, height=64, width=64,
                                                        generator=torch.Generator().manual_seed(0),
                                                        adapter_conditioning_scale=0.8, output_type="np").images[0]
    plain = sd_base.diffusers_pipeline()(PROMPT, num_inference_steps=4, height=64, width=64,
                                         generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.abs(ours - plain).max() > 1e-2  # the adapter really acts


def test_sd_two_adapters_with_weights_match_diffusers(sd_base):
    a, b = random_adapter(sd_base, 1, 2), random_adapter(sd_base, 3, 3)
    conds = [condition(64, "L", 1), condition(64, "RGB", 2)]
    ours = AdapterPipeline(sd_base, {"sketch": a, "depth": b})(PROMPT, conds, steps=3, seed=5, size=(64, 64),
                                                                weights=[0.6, 1.3], output_type="np", progress=False).images[0]
    multi = MultiAdapter([as_diffusers(a), as_diffusers(b)])
    ref = sd_reference(sd_base, multi)(PROMPT, image=conds, num_inference_steps=3, height=64, width=64,
                                       generator=torch.Generator().manual_seed(5), adapter_conditioning_scale=[0.6, 1.3],
                                       output_type="np").images[0]
    assert np.abs(ours - ref).max() <= 1e-4


def test_sdxl_single_adapter_and_window_match_diffusers(xl_base):
    ad = random_adapter(xl_base, 3, 4)
    cond = condition(128, "RGB", 3)
    pipe = AdapterPipeline(xl_base, [ad])
    ref_pipe = xl_reference(xl_base, as_diffusers(ad))
    for factor in (1.0, 0.5):
        ours = pipe(PROMPT, [cond], steps=4, seed=1, size=(128, 128), guidance_scale=5.0, windows=[(0, factor)],
                    output_type="np", progress=False).images[0]
        ref = ref_pipe(PROMPT, image=cond, num_inference_steps=4, height=128, width=128, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(1), adapter_conditioning_factor=factor,
                       output_type="np").images[0]
        assert np.abs(ours - ref).max() <= 1e-4


def test_sdxl_two_adapters_with_weights_match_diffusers(xl_base):
    a, b = random_adapter(xl_base, 3, 6), random_adapter(xl_base, 3, 7)
    conds = [condition(128, "RGB", 4), condition(128, "RGB", 5)]
    ours = AdapterPipeline(xl_base, [a, b])(PROMPT, conds, steps=3, seed=2, size=(128, 128), weights=[1.0, 0.5],
                                            guidance_scale=6.0, negative_prompt="blurry", output_type="np", progress=False).images[0]
    ref = xl_reference(xl_base, MultiAdapter([as_diffusers(a), as_diffusers(b)]))(
        PROMPT, image=conds, negative_prompt="blurry", guidance_scale=6.0, num_inference_steps=3, height=128, width=128,
        generator=torch.Generator().manual_seed(2), adapter_conditioning_scale=[1.0, 0.5], output_type="np").images[0]
    assert np.abs(ours - ref).max() <= 1e-4


def test_sd_adapter_acts_at_every_evaluation_of_higher_order_schedulers(sd_base):
    # Heun evaluates the UNet 2N − 1 times and PNDM N + 1; the windows were measured against N, so past the N-th
    # evaluation the adapter fell silent (max diff 3e-3 to diffusers, which adds the features at every evaluation)
    from diffusers import HeunDiscreteScheduler, PNDMScheduler

    ad = random_adapter(sd_base, 1, 1)
    cond = condition(64, "L", 0)
    for name, scheduler in (("heun", HeunDiscreteScheduler.from_config(sd_base.scheduler.config)),
                            ("pndm", PNDMScheduler.from_config(sd_base.scheduler.config, skip_prk_steps=True))):
        ours = AdapterPipeline(sd_base, [ad])(PROMPT, [cond], steps=5, seed=0, size=(64, 64), scheduler=name,
                                              output_type="np", progress=False).images[0]
        ref_pipe = sd_reference(sd_base, as_diffusers(ad))
        ref_pipe.scheduler = scheduler
        ref = ref_pipe(PROMPT, image=cond, num_inference_steps=5, height=64, width=64,
                       generator=torch.Generator().manual_seed(0), output_type="np").images[0]
        assert np.abs(ours - ref).max() <= 1e-4, name


def test_sd_no_size_takes_the_conditions_as_diffusers(sd_base):
    # with no height/width, diffusers' adapter pipelines take the condition's size (rounded down to the adapter's
    # pixel-unshuffle factor); ours took the base's default and squashed a 128x64 condition into 64x64
    ad = random_adapter(sd_base, 1, 1)
    cond = condition(128, "L", 0).resize((128, 64))
    ref = sd_reference(sd_base, as_diffusers(ad))(PROMPT, image=cond, num_inference_steps=2,
                                                  generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    pipe = AdapterPipeline(sd_base, [ad])
    for sizes in ({}, {"height": None, "width": None}):
        ours = pipe(PROMPT, [cond], steps=2, seed=0, output_type="np", progress=False, **sizes).images[0]
        assert ours.shape == ref.shape == (64, 128, 3)
        assert np.abs(ours - ref).max() <= 1e-4
    # 141 wide → 136 (rounded down to the unshuffle's 8, diffusers' size; ours pads the canvas and crops back)
    odd = pipe(PROMPT, [cond.resize((141, 64))], steps=1, seed=0, output_type="np", progress=False).images[0]
    assert odd.shape == (64, 136, 3)
