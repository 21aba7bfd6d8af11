"""ControlNets beside the adapters (issue 16): parity with diffusers' ControlNet pipelines, composition with an
adapter, loading, checks, and the parameter count the paper's trade-off rests on (DESIGN.md §8)."""
import json

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline, T2IAdapter
from PIL import Image

from t2iadapter.bases import load_base, tiny_adapter_config
from t2iadapter.errors import ConfigError
from t2iadapter.formats import ours_to_diffusers
from t2iadapter.generation.controlnet import controlnet_from_unet
from t2iadapter.generation.request import AdapterUse, ControlNetUse, GenerationRequest
from t2iadapter.models import build_adapter
from t2iadapter.pipeline import AdapterPipeline
from tiny_models import PROMPT



def random_controlnet(base, seed):
    """A ControlNet initialised from the base UNet (as the paper does), its zero convs given random weights so it acts."""
    torch.manual_seed(seed)
    cn = controlnet_from_unet(base.unet, base.vae_scale_factor).eval()
    with torch.no_grad():
        zero = list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]
        for conv in zero:
            conv.weight.normal_(0, 0.3)
            conv.bias.normal_(0, 0.1)
    return cn


def condition(size, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def sd_reference(base, cn):
    return StableDiffusionControlNetPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                             unet=base.unet, controlnet=cn, scheduler=base.scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)


def xl_reference(base, cn):
    return StableDiffusionXLControlNetPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                                               tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
                                               controlnet=cn, scheduler=base.scheduler)


def test_sd_controlnet_matches_diffusers(sd_base):
    cn = random_controlnet(sd_base, 0)
    cond = condition(64, 0)
    pipe = AdapterPipeline(sd_base, controlnets={"pose": cn})
    ref_pipe = sd_reference(sd_base, cn)
    # (5 steps: windows whose ends fall between steps, where diffusers keeps one step fewer than the adapters' rule)
    for steps, scale, (start, end) in ((4, 0.7, (0.0, 1.0)), (4, 1.0, (0.0, 0.5)), (4, 1.2, (0.5, 1.0)),
                                       (5, 1.0, (0.0, 0.5)), (5, 0.8, (0.3, 0.9))):
        ours = pipe(PROMPT, {"pose": cond}, steps=steps, seed=0, size=(64, 64), weights={"pose": scale},
                    windows={"pose": (start, end)}, output_type="np", progress=False).images[0]
        ref = ref_pipe(PROMPT, image=cond, num_inference_steps=steps, height=64, width=64,
                       generator=torch.Generator().manual_seed(0), controlnet_conditioning_scale=scale,
                       control_guidance_start=start, control_guidance_end=end, output_type="np").images[0]
        assert np.abs(ours - ref).max() <= 1e-4, (steps, scale, start, end)
    plain = sd_base.diffusers_pipeline()(PROMPT, num_inference_steps=5, height=64, width=64,
                                         generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.abs(ours - plain).max() > 1e-2  # the ControlNet really acts


def test_sdxl_controlnet_matches_diffusers(xl_base):
    cn = random_controlnet(xl_base, 1)
    cond = condition(128, 1)
    ours = AdapterPipeline(xl_base, controlnets=[cn])(PROMPT, [cond], steps=3, seed=1, size=(128, 128), guidance_scale=5.0,
                                                      weights=[0.8], output_type="np", progress=False).images[0]
    ref = xl_reference(xl_base, cn)(PROMPT, image=cond, num_inference_steps=3, height=128, width=128, guidance_scale=5.0,
                                    generator=torch.Generator().manual_seed(1), controlnet_conditioning_scale=0.8,
                                    output_type="np").images[0]
    plain = xl_base.diffusers_pipeline()(PROMPT, num_inference_steps=3, height=128, width=128, guidance_scale=5.0,
                                         generator=torch.Generator().manual_seed(1), output_type="np").images[0]
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.abs(ours - plain).max() > 1e-2


def pooled(cn):
    """The same ControlNet with `global_pool_conditions` (as shuffle's): diffusers runs it in guess mode."""
    config = {k: v for k, v in cn.config.items() if not k.startswith("_")}
    out = ControlNetModel(**{**config, "global_pool_conditions": True}).eval()
    out.load_state_dict(cn.state_dict())
    return out


def test_a_pooled_controlnet_runs_in_guess_mode_as_in_diffusers(sd_base, xl_base):
    """diffusers forces guess mode for it: the conditional CFG half alone, zeros for the unconditional (it ran on
    both halves here: 0.54 apart). Eager and fast-mode loops, SD and SDXL."""
    for base, size, reference in ((sd_base, 64, sd_reference), (xl_base, 128, xl_reference)):
        cn, cond = pooled(random_controlnet(base, 0)), condition(size, 0)
        kwargs = dict(steps=3, seed=0, size=(size, size), guidance_scale=5.0, output_type="np", progress=False)
        ref = reference(base, cn)(PROMPT, image=cond, num_inference_steps=3, height=size, width=size, guidance_scale=5.0,
                                  generator=torch.Generator().manual_seed(0), output_type="np").images[0]
        assert np.abs(AdapterPipeline(base, controlnets={"shuffle": cn})(PROMPT, {"shuffle": cond}, **kwargs).images[0]
                      - ref).max() <= 1e-4
        fast = AdapterPipeline(load_base(base.source), controlnets={"shuffle": cn})  # optimize() takes its base over
        fast.optimize(compile=False, dtype=torch.float32)  # the fast loop: static ControlNet inputs
        assert np.abs(fast(PROMPT, {"shuffle": cond}, **kwargs).images[0] - ref).max() <= 1e-4


def test_adapter_and_controlnet_compose_as_diffusers_unet_with_both_residuals(sd_base):
    """Reference: diffusers' ControlNet pipeline whose UNet also gets diffusers' T2IAdapter features every step."""
    torch.manual_seed(3)
    adapter = build_adapter(tiny_adapter_config(sd_base, 1)).eval()
    with torch.no_grad():
        for p in adapter.parameters():
            p.mul_(3.0)
    cn = random_controlnet(sd_base, 2)
    sketch, pose = Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64), dtype=np.uint8), "L"), condition(64, 5)
    pipe = AdapterPipeline(sd_base, {"sketch": adapter}, controlnets={"pose": cn})
    ours = pipe(PROMPT, {"sketch": sketch, "pose": pose}, steps=3, seed=7, size=(64, 64), weights={"sketch": 0.9, "pose": 0.6},
                output_type="np", progress=False).images[0]
    only_cn = pipe(PROMPT, {"pose": pose}, steps=3, seed=7, size=(64, 64), weights={"pose": 0.6}, output_type="np",
                   progress=False).images[0]

    d_adapter = T2IAdapter(in_channels=1, channels=list(adapter.config.channels), num_res_blocks=adapter.config.num_res_blocks,
                           downscale_factor=adapter.config.downscale_factor, adapter_type="full_adapter").eval()
    d_adapter.load_state_dict(ours_to_diffusers(adapter.state_dict(), adapter.config))
    x = torch.from_numpy(np.asarray(sketch, dtype=np.float32) / 255.0)[None, None]
    with torch.no_grad():
        features = [f * 0.9 for f in d_adapter(x)]
    unet = sd_base.unet
    forward = unet.forward

    def with_adapter(*args, **kwargs):
        batch = args[0].shape[0]
        kwargs["down_intrablock_additional_residuals"] = [f.repeat(batch, 1, 1, 1) for f in features]
        return forward(*args, **kwargs)

    unet.forward = with_adapter
    try:
        ref = sd_reference(sd_base, cn)(PROMPT, image=pose, num_inference_steps=3, height=64, width=64,
                                        generator=torch.Generator().manual_seed(7), controlnet_conditioning_scale=0.6,
                                        output_type="np").images[0]
    finally:
        del unet.forward
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.abs(ours - only_cn).max() > 1e-2  # the adapter acts too


def test_controlnet_loads_from_folder_and_single_file(sd_base, tmp_path):
    cn = random_controlnet(sd_base, 5)
    cn.save_pretrained(tmp_path / "cn")
    pipe = AdapterPipeline.from_pretrained(sd_base, controlnets={"edge": tmp_path / "cn"})
    loaded = pipe.controlnets["edge"]
    assert all(torch.equal(a, b) for a, b in zip(cn.state_dict().values(), loaded.state_dict().values()))
    assert loaded is not cn and not any(p.requires_grad for p in loaded.parameters())
    pipe2 = AdapterPipeline(sd_base, controlnets=[str(tmp_path / "cn")])
    assert list(pipe2.controlnets) == ["cn"]
    # one ControlNet without a list, as `adapters=` takes one (a path was walked letter by letter)
    assert list(AdapterPipeline(sd_base, controlnets=str(tmp_path / "cn")).controlnets) == ["cn"]
    assert list(AdapterPipeline(sd_base, controlnets=cn).controlnets) == ["controlnet0"]


def test_controlnet_checks(sd_base, xl_base, tmp_path):
    with pytest.raises(ConfigError, match="does not fit"):
        AdapterPipeline(sd_base, controlnets={"x": random_controlnet(xl_base, 0)})
    with pytest.raises(ConfigError, match="given twice"):
        AdapterPipeline(sd_base, {"a": build_adapter(tiny_adapter_config(sd_base, 3))}, controlnets={"a": random_controlnet(sd_base, 0)})
    from t2iadapter.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no such file"):
        AdapterPipeline(sd_base, controlnets={"x": str(tmp_path / "missing")})
    # beside an inpainting UNet (9 input channels) a ControlNet still takes the 4 latent channels, as in diffusers'
    # StableDiffusionControlNetInpaintPipeline: one made from the 9-channel UNet failed mid-run
    import dataclasses

    from diffusers import UNet2DConditionModel

    inpaint = dataclasses.replace(sd_base, unet=UNet2DConditionModel.from_config({**sd_base.unet.config, "in_channels": 9}))
    with pytest.raises(ConfigError, match="from a 4-channel UNet, not an inpainting one"):
        controlnet_from_unet(inpaint.unet)
    nine = ControlNetModel.from_config({**random_controlnet(sd_base, 0).config, "in_channels": 9})
    with pytest.raises(ConfigError, match="in_channels 9 .*4 latent channels; an inpainting UNet's ControlNets"):
        AdapterPipeline(inpaint, controlnets={"x": nine})
    assert list(AdapterPipeline(inpaint, controlnets={"x": random_controlnet(sd_base, 0)}).controlnets) == ["x"]
    pipe = AdapterPipeline(sd_base, controlnets={"pose": random_controlnet(sd_base, 0)})
    from t2iadapter.errors import ConditionError

    with pytest.raises(ConditionError, match="one image for the whole call .* one call per prompt"):  # diffusers' habit
        pipe([PROMPT, PROMPT], {"pose": [condition(64, 0), condition(64, 1)]}, steps=1, size=(64, 64), progress=False)
    with pytest.raises(ConfigError, match="unknown adapters"):
        pipe(PROMPT, {"pose": condition(64, 0)}, weights={"posse": 1.0}, steps=1, size=(64, 64), progress=False)


def test_fast_mode_with_controlnet_equals_eager_and_windows_never_recompile():
    """Fast mode: every ControlNet runs every step (scale 0 outside its window), the compiled UNet keeps one graph."""
    import torch._dynamo.testing

    base = load_base("tiny")  # optimize() takes the base over: not the shared fixture
    torch.manual_seed(0)
    adapter = build_adapter(tiny_adapter_config(base, 1))
    pipe = AdapterPipeline(base, {"sketch": adapter}, controlnets={"pose": random_controlnet(base, 6)})
    sketch = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8), "L")
    calls = [dict(windows={"pose": (0, 0.5)}, weights={"pose": 0.8}), dict(windows={"pose": (0.34, 1)}, weights={"pose": 1.1})]

    def gen(**kw):
        return pipe(PROMPT, {"sketch": sketch, "pose": condition(64, 2)}, steps=3, seed=0, size=(64, 64), output_type="np",
                    progress=False, **kw).images[0]

    eager = [gen(**c) for c in calls]
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    try:
        pipe.optimize(dtype=torch.float32, backend=counter)
        first = gen(**calls[0])
        graphs = counter.frame_count
        second = gen(**calls[1])
        assert counter.frame_count == graphs, "a ControlNet's window or weight recompiled the UNet"
    finally:
        torch._dynamo.reset()
    assert np.abs(first - eager[0]).max() < 1e-4 and np.abs(second - eager[1]).max() < 1e-4


def test_warm_up_compiles_the_controlnet_graph_before_the_first_request():
    """A server's fast-mode warm-up ran the adapters only: the first request with a ControlNet (another UNet graph,
    with its residuals) compiled while its user waited."""
    import torch._dynamo.testing

    base = load_base("tiny")  # optimize() takes the base over: not the shared fixture
    torch.manual_seed(0)
    pipe = AdapterPipeline(base, {"sketch": build_adapter(tiny_adapter_config(base, 1))},
                           controlnets={"pose": random_controlnet(base, 6)})
    sketch = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8), "L")
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    try:
        pipe.optimize(dtype=torch.float32, backend=counter)
        pipe.warm_up([(64, 64)], [1], batched=True, steps=1)
        warmed = counter.frame_count
        sketched = GenerationRequest(PROMPT, (AdapterUse("sketch", sketch),), steps=2, size=(64, 64))
        posed = GenerationRequest(PROMPT, controlnets=(ControlNetUse("pose", condition(64, 2), 0.8),), steps=2,
                                  size=(64, 64))
        for batch in ([sketched], [posed]):
            pipe.generate_batch(batch)  # as a server's worker runs them
        assert counter.frame_count == warmed, "a request after the warm-up compiled"
    finally:
        torch._dynamo.reset()


def test_controlnet_parameters_vs_adapter_on_meta_device():
    """DESIGN.md §8: SD1.5's ControlNet has ~361M parameters, the full adapter ~77M (no memory allocated)."""
    from diffusers import UNet2DConditionModel

    from t2iadapter.models import FullAdapterConfig

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)  # diffusers' defaults are SD1.5's UNet
        cn = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        adapter = build_adapter(FullAdapterConfig(in_channels=1))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"ControlNet {count(cn) / 1e6:.1f}M, adapter {count(adapter) / 1e6:.2f}M, UNet {count(unet) / 1e6:.1f}M")
    assert 355e6 < count(cn) < 365e6
    assert 76e6 < count(adapter) < 78e6
    assert 855e6 < count(unet) < 865e6


def test_cli_generate_with_controlnet_and_adapter(sd_base, tmp_path, capsys):
    """`--controlnet NAME=PATH` and `--adapter` pair with `--condition` in command-line order; the PNG equals the API's."""
    import json

    from t2iadapter.cli import main as cli

    torch.manual_seed(8)
    adapter = build_adapter(tiny_adapter_config(sd_base, 1))
    adapter.save_file(tmp_path / "sketch.safetensors")
    random_controlnet(sd_base, 9).save_pretrained(tmp_path / "pose-cn")
    condition(64, 1).save(tmp_path / "pose.png")
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8), "L").save(tmp_path / "sketch.png")
    out = tmp_path / "out.png"
    args = ["generate", "--base", "tiny", "--controlnet", f"pose={tmp_path / 'pose-cn'}", "--condition", str(tmp_path / "pose.png"),
            "--adapter", str(tmp_path / "sketch.safetensors"), "--condition", str(tmp_path / "sketch.png"),
            "--controlnet-weight", "0.7", "--controlnet-window", "0:0.5", "--prompt", PROMPT, "--steps", "2", "--seed", "4",
            "--size", "64x64", "--out", str(out)]
    assert cli(args) == 0
    capsys.readouterr()
    assert cli(["info", str(out), "--json"]) == 0
    params = json.loads(capsys.readouterr().out)
    assert params["adapters"] == ["sketch"] and params["controlnets"] == [{"name": "pose", "weight": 0.7, "window": [0.0, 0.5]}]
    pipe = AdapterPipeline.from_pretrained("tiny", [tmp_path / "sketch.safetensors"], controlnets={"pose": tmp_path / "pose-cn"})
    ref = pipe(PROMPT, {"sketch": tmp_path / "sketch.png", "pose": tmp_path / "pose.png"}, steps=2, seed=4, size=(64, 64),
               weights={"pose": 0.7}, windows={"pose": (0, 0.5)}, progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(ref))
    assert cli(args[:-2] + ["--controlnet-weight", "1", "--out", str(tmp_path / "o2.png")]) == 2
    assert "2 --controlnet-weight for 1 ControlNets" in capsys.readouterr().err
    assert cli(["generate", "--base", "tiny", "--controlnet", str(tmp_path / "pose-cn"), "--prompt", "p",
                "--out", str(tmp_path / "o3.png")]) == 2
    assert "give one condition per adapter and ControlNet" in capsys.readouterr().err


def test_server_takes_controlnet_conditions_weights_and_windows(sd_base, tmp_path):
    pytest.importorskip("fastapi")
    import base64
    import io
    import json

    from fastapi.testclient import TestClient

    from t2iadapter.pngmeta import CHUNK
    from t2iadapter.server import Limits, create_app

    torch.manual_seed(0)
    pipe = AdapterPipeline(sd_base, {"sketch": build_adapter(tiny_adapter_config(sd_base, 1))},
                           controlnets={"pose": random_controlnet(sd_base, 3)})

    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    req = {"prompt": PROMPT, "steps": 2, "seed": 3, "conditions": {"pose": png(condition(64, 0)), "sketch": png(condition(64, 1).convert("L"))},
           "controlnets": {"pose": {"weight": 0.5, "window": "0.5:1"}}}
    with TestClient(create_app(pipe, limits=Limits(max_steps=4, max_side=128))) as client:
        assert client.get("/v1/models").json()["controlnets"] == ["pose"]
        r = client.post("/v1/generate", json=req)
        assert r.status_code == 200, r.text
        params = json.loads(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["png"]))).text[CHUNK])
        assert params["adapters"] == ["sketch"] and params["controlnets"] == [{"name": "pose", "weight": 0.5, "window": [0.5, 1.0]}]
        assert client.post("/v1/generate", json=dict(req, controlnets={"nope": {"weight": 1}})).status_code == 404
        r = client.post("/v1/generate", json=dict(req, conditions={"sketch": req["conditions"]["sketch"]}))
        assert r.status_code == 422 and "ControlNet 'pose' has options but no condition image" in r.text, r.text


def test_serve_registers_controlnets(tmp_path):
    import argparse

    from t2iadapter.commands import serve

    sub = argparse.ArgumentParser().add_subparsers()
    serve.register(sub)
    args = sub.choices["serve"].parse_args(["--base", "tiny", "--adapter", "a=x.safetensors", "--controlnet", "pose=cn-folder"])
    settings, _ = serve.settings_from(args)
    assert settings.controlnets == {"pose": "cn-folder"} and settings.adapters == {"a": "x.safetensors"}


def test_controlnet_beside_an_inpainting_unet_matches_diffusers(sd_base):
    """The ControlNet gets the 4 latent channels, the 9-channel UNet latents + mask + masked image, as in
    diffusers' StableDiffusionControlNetInpaintPipeline."""
    from diffusers import StableDiffusionControlNetInpaintPipeline
    from test_img2img import inpaint_unet_base, mask_of, photo, sd_kwargs

    base, cn = inpaint_unet_base(sd_base), random_controlnet(sd_base, 0)
    image, mask, cond = photo(64, 1), mask_of(64), condition(64, 2)
    ours = AdapterPipeline(base, controlnets={"c": cn})(PROMPT, {"c": cond}, init_image=image, mask_image=mask, steps=4,
                                                         seed=3, output_type="np", progress=False).images[0]
    ref = StableDiffusionControlNetInpaintPipeline(**sd_kwargs(base), controlnet=cn)(
        PROMPT, image=image, mask_image=mask, control_image=cond, num_inference_steps=4, height=64, width=64,
        generator=torch.Generator().manual_seed(3), controlnet_conditioning_scale=1.0, output_type="np").images[0]
    assert np.abs(ours - ref).max() <= 1e-4


def test_info_shows_a_controlnet_and_adapter_loaders_name_it(sd_base, tmp_path, capsys):
    """`info`/`convert` on our ControlNet file said "input width 4 is not channels x 8^2 …; not a T2I-Adapter?"."""
    from t2iadapter import load_adapter
    from t2iadapter.cli import main
    from t2iadapter.errors import CheckpointError
    from t2iadapter.train.controlnet import TrainableControlNet

    cn = random_controlnet(sd_base, 3)
    TrainableControlNet(cn).save_file(tmp_path / "cn.safetensors")
    cn.save_pretrained(tmp_path / "cn-folder")
    for path in (tmp_path / "cn.safetensors", tmp_path / "cn-folder"):
        assert main(["info", str(path), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["kind"] == "controlnet" and shown["parameters"] == sum(p.numel() for p in cn.parameters())
        assert shown["block_out_channels"] == list(cn.config.block_out_channels)
        with pytest.raises(CheckpointError, match="is a ControlNet, not an adapter: give it as one"):
            load_adapter(path)


def test_controlnet_windows_count_every_evaluation_of_heun(sd_base):
    # diffusers keeps a ControlNet by its place among all the timesteps run (2N − 1 for Heun), not among N
    from diffusers import HeunDiscreteScheduler

    cn = random_controlnet(sd_base, 0)
    cond = condition(64, 0)
    pipe = AdapterPipeline(sd_base, controlnets={"pose": cn})
    ref_pipe = sd_reference(sd_base, cn)
    ref_pipe.scheduler = HeunDiscreteScheduler.from_config(sd_base.scheduler.config)
    for start, end in ((0.0, 1.0), (0.0, 0.6), (0.3, 1.0)):
        ours = pipe(PROMPT, {"pose": cond}, steps=4, seed=0, size=(64, 64), scheduler="heun",
                    windows={"pose": (start, end)}, output_type="np", progress=False).images[0]
        ref = ref_pipe(PROMPT, image=cond, num_inference_steps=4, height=64, width=64,
                       generator=torch.Generator().manual_seed(0), control_guidance_start=start,
                       control_guidance_end=end, output_type="np").images[0]
        assert np.abs(ours - ref).max() <= 1e-4, (start, end)


def test_a_controlnet_call_without_a_size_takes_its_condition_size_as_diffusers(sd_base):
    """diffusers' ControlNet pipelines default height/width to the control image's (rounded down to the VAE's
    factor); the keyword call gave the base's size (64² here, diffusers 128²). A spatial adapter's condition still
    decides where there is one (diffusers' adapter pipelines)."""
    cn, cond = random_controlnet(sd_base, 1), condition(128, 3)
    ours = AdapterPipeline(sd_base, controlnets={"pose": cn})(PROMPT, image=cond, num_inference_steps=2, seed=0,
                                                              output_type="np", progress=False).images[0]
    ref = sd_reference(sd_base, cn)(PROMPT, image=cond, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                                    output_type="np").images[0]
    assert ours.shape == ref.shape == (128, 128, 3) and np.abs(ours - ref).max() <= 1e-4
    both = AdapterPipeline(sd_base, {"sketch": build_adapter(tiny_adapter_config(sd_base, 1))}, controlnets={"pose": cn})
    out = both(PROMPT, [condition(64, 4).convert("L"), cond], steps=1, seed=0, progress=False).images[0]
    assert out.size == (64, 64)


def test_a_request_takes_one_controlnet_use_or_a_list_of_them_as_its_adapters():
    """`controlnets=` as `adapters=`: one use or a list; anything else is a ConfigError (a bare use raised TypeError,
    a (name, image) pair AttributeError)."""
    from t2iadapter.generation.request import ControlNetUse, GenerationRequest

    use = ControlNetUse("pose", condition(64, 0), 0.5)
    assert GenerationRequest(PROMPT, controlnets=use).controlnets == (use,)
    with pytest.raises(ConfigError, match=r"controlnets must be ControlNetUse\(name, condition, ...\) items"):
        GenerationRequest(PROMPT, controlnets=[("pose", condition(64, 0))])
    with pytest.raises(ConfigError, match="controlnets must be a list of ControlNetUse, not int"):
        GenerationRequest(PROMPT, controlnets=3)


def test_diffusers_scale_names_weigh_their_own_kind_of_model(sd_base):
    """adapter_conditioning_scale weighs the adapters only (it scaled the ControlNets too, and a list of one per
    adapter was refused beside a ControlNet); controlnet_conditioning_scale, diffusers' name, weighs the ControlNets."""
    cn, pose, sketch = random_controlnet(sd_base, 1), condition(64, 2), condition(64, 1).convert("L")
    pipe = AdapterPipeline(sd_base, {"sketch": build_adapter(tiny_adapter_config(sd_base, 1))}, controlnets={"pose": cn})
    for scale in (0.5, [0.5]):
        req = pipe.request(PROMPT, [sketch, pose], adapter_conditioning_scale=scale)
        assert [u.weight for u in req.adapters] == [0.5] and [u.weight for u in req.controlnets] == [1.0]
    req = pipe.request(PROMPT, [sketch, pose], adapter_conditioning_scale=0.5, controlnet_conditioning_scale=[0.7])
    assert [u.weight for u in req.adapters] == [0.5] and [u.weight for u in req.controlnets] == [0.7]
    with pytest.raises(ConfigError, match="not both"):
        pipe.request(PROMPT, [sketch, pose], weights=1.0, controlnet_conditioning_scale=0.7)
    ours = AdapterPipeline(sd_base, controlnets={"pose": cn})(PROMPT, image=pose, num_inference_steps=2, height=64, width=64,
                                                             seed=0, controlnet_conditioning_scale=0.6, output_type="np",
                                                             progress=False).images[0]
    ref = sd_reference(sd_base, cn)(PROMPT, image=pose, num_inference_steps=2, height=64, width=64,
                                    generator=torch.Generator().manual_seed(0), controlnet_conditioning_scale=0.6,
                                    output_type="np").images[0]
    assert np.abs(ours - ref).max() <= 1e-4


def test_an_adapter_given_as_a_controlnet_is_named_so(sd_base, tmp_path, capsys):
    """An adapter file or folder given as a ControlNet: one line saying so (diffusers read a T2IAdapter folder as a
    ControlNet of default config, "does not fit this base", and our adapter file sent it looking for SD1.5 online)."""
    from t2iadapter.cli import main as cli
    from t2iadapter.errors import CheckpointError
    from tiny_models import as_diffusers

    adapter = build_adapter(tiny_adapter_config(sd_base, 1))
    adapter.save_file(tmp_path / "sketch.safetensors")
    adapter.save_pretrained(tmp_path / "ours")
    as_diffusers(adapter).save_pretrained(tmp_path / "theirs")
    for source in ("sketch.safetensors", "ours", "theirs"):
        with pytest.raises(CheckpointError, match="is a T2I-Adapter, not a ControlNet: give it as one"):
            AdapterPipeline(sd_base, controlnets={"x": tmp_path / source})
    condition(64, 0).save(tmp_path / "c.png")
    assert cli(["generate", "--base", "tiny", "--controlnet", f"x={tmp_path / 'theirs'}", "--condition", str(tmp_path / "c.png"),
                "--prompt", PROMPT, "--out", str(tmp_path / "o.png")]) == 2
    assert "is a T2I-Adapter, not a ControlNet" in capsys.readouterr().err
