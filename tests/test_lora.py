"""LoRAs (issue 15): a tiny peft LoRA saved in diffusers' format gives the same image through us and through diffusers."""
import numpy as np
import pytest
import torch

from t2iadapter.bases import load_base
from t2iadapter.errors import ConfigError
from t2iadapter.pipeline import AdapterPipeline

pytest.importorskip("peft")

PROMPT = "a red star on a blue square"


def make_lora(folder, seed, *, rank=4):
    """A random LoRA for the tiny SD base's UNet and text encoder, written as diffusers' training scripts write it."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    base = load_base("tiny")
    torch.manual_seed(seed)
    base.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,  # peft itself: transformers'
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),  # add_adapter wants
                            base.text_encoder)  # a newer peft than the registry has
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(base.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(base.text_encoder)))
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    (root / "a").mkdir()
    (root / "b").mkdir()
    return make_lora(root / "a", 1), make_lora(root / "b", 2)


def ours(pipe, **options):
    return pipe(PROMPT, steps=3, seed=4, output_type="np", progress=False, **options).images[0]


def theirs(base, files_scales):
    pipe = base.diffusers_pipeline()
    for i, (path, _) in enumerate(files_scales):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
    pipe.set_adapters([f"l{i}" for i in range(len(files_scales))], adapter_weights=[s for _, s in files_scales])
    return pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(4), output_type="np").images[0]


def test_lora_matches_diffusers_and_unloads(loras):
    a, b = loras
    pipe = AdapterPipeline(load_base("tiny"))
    plain = ours(pipe)
    assert pipe.load_lora(a, scale=0.7) == "pytorch_lora_weights"
    one = ours(pipe)
    assert np.abs(one - theirs(load_base("tiny"), [(a, 0.7)])).max() <= 1e-4
    assert np.abs(one - plain).max() > 1e-3  # the LoRA really acts
    pipe.load_lora(b, scale=0.4, name="second")
    two = ours(pipe)
    assert np.abs(two - theirs(load_base("tiny"), [(a, 0.7), (b, 0.4)])).max() <= 1e-4
    assert pipe.generate(pipe.request(PROMPT, steps=1, seed=0), progress=False).parameters["loras"] == \
        {"pytorch_lora_weights": 0.7, "second": 0.4}
    pipe.unload_lora("pytorch_lora_weights")
    pipe.unload_lora("second")
    assert np.abs(ours(pipe) - plain).max() <= 1e-5


def test_lora_then_fast_mode_fuses(loras):
    a, _ = loras
    eager = AdapterPipeline(load_base("tiny"))
    eager.load_lora(a, scale=0.7)
    fast = AdapterPipeline(load_base("tiny"))
    fast.load_lora(a, scale=0.7)
    fast.optimize(compile=False, dtype=torch.float32)  # fuses the LoRA, then q/k/v
    assert np.abs(ours(fast) - ours(eager)).max() <= 1e-4
    with pytest.raises(ConfigError, match="before optimize"):
        fast.load_lora(a, name="late")


def test_a_lora_after_fast_mode_is_refused(loras):
    """optimize() without LoRAs, then load_lora: the fused q/k/v projections (copies) ignored the LoRA's attention
    layers while its text-encoder part acted, an image neither plain nor the LoRA's (0.13 off), without a word."""
    a, _ = loras
    fast = AdapterPipeline(load_base("tiny")).optimize(compile=False, dtype=torch.float32)
    plain = ours(fast)
    with pytest.raises(ConfigError, match="load LoRAs before optimize"):
        fast.load_lora(a, scale=0.7)
    assert fast.loras.scales == {} and np.abs(ours(fast) - plain).max() == 0


def test_lora_for_another_family_is_refused(loras):
    a, _ = loras
    pipe = AdapterPipeline(load_base("tiny-xl"))
    with pytest.raises(ConfigError, match="does not fit this base"):
        pipe.load_lora(a)
    assert not pipe.loras.scales
    with pytest.raises(ConfigError, match="no LoRA named"):
        pipe.unload_lora("nothing")


def test_parse_lora():
    from t2iadapter.generation.lora import parse_lora

    assert parse_lora("x.safetensors:0.5") == ("x.safetensors", 0.5)
    assert parse_lora("latent-consistency/lcm-lora-sdv1-5") == ("latent-consistency/lcm-lora-sdv1-5", 1.0)
    assert parse_lora("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", 1.0)


def test_kohya_lora_loads_through_diffusers(loras, tmp_path):
    """The same UNet LoRA written with kohya's key names (lora_unet_..., lora_down/lora_up, alpha) gives the same image
    as the diffusers file: diffusers' own conversion reads it (the renaming here is the test's, not the library's)."""
    from safetensors.torch import load_file, save_file

    a, _ = loras
    unet_only = {k: v for k, v in load_file(a).items() if k.startswith("unet.")}
    kohya = {}
    for key, value in unet_only.items():
        path, _, kind = key[len("unet."):].rpartition(".lora.")
        name = "lora_unet_" + path.replace(".", "_")
        kohya[f"{name}.lora_{kind.split('.')[0]}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(float(value.shape[0] if kind.startswith("down") else value.shape[1]))
    save_file(unet_only, tmp_path / "diffusers.safetensors")
    save_file(kohya, tmp_path / "kohya.safetensors")
    images = []
    for name in ("diffusers", "kohya"):
        pipe = AdapterPipeline(load_base("tiny"))
        pipe.load_lora(tmp_path / f"{name}.safetensors", scale=0.8)
        images.append(ours(pipe))
    plain = ours(AdapterPipeline(load_base("tiny")))
    assert np.abs(images[0] - images[1]).max() <= 1e-5
    assert np.abs(images[0] - plain).max() > 1e-3


def test_a_text_encoder_lora_with_the_text_model_level_loads(loras, tmp_path):
    """LoRAs made before transformers 5 name the text encoder's modules `text_model.encoder...` (every SD1.x/SDXL
    LoRA on the hub); diffusers strips that level where the model lost it, our fit check counted them missing and
    refused a text-encoder LoRA as one "for another base"."""
    from safetensors.torch import load_file, save_file

    a, _ = loras
    old = {k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in load_file(a).items()
           if k.startswith("text_encoder.")}
    save_file(old, tmp_path / "te.safetensors")
    pipe = AdapterPipeline(load_base("tiny"))
    plain = ours(pipe)
    pipe.load_lora(tmp_path / "te.safetensors", scale=0.6)
    got = ours(pipe)
    assert np.abs(got - theirs(load_base("tiny"), [(tmp_path / "te.safetensors", 0.6)])).max() <= 1e-4
    assert np.abs(got - plain).max() > 1e-3


@pytest.mark.parametrize("scale", [None, "0.5", float("nan"), float("inf"), True])
def test_a_bad_scale_is_refused_before_anything_loads(loras, scale):
    """It was checked after loading: the LoRA stayed active yet unlisted (unload could not reach it), or NaN images."""
    a, _ = loras
    pipe = AdapterPipeline(load_base("tiny"))
    plain = ours(pipe)
    with pytest.raises(ConfigError, match="finite number"):
        pipe.load_lora(a, scale=scale)
    assert pipe.loras.scales == {} and pipe.load_lora(a, scale=0.7) == "pytorch_lora_weights"  # nothing left behind
    pipe.unload_lora("pytorch_lora_weights")
    assert np.abs(ours(pipe) - plain).max() <= 1e-5


def test_unnamed_loras_get_free_peft_names(loras, tmp_path):
    """Names come from the file's stem: two `pytorch_lora_weights.safetensors` (as the CLI loads them, unnamed) and a
    dotted stem (peft refuses dots in adapter names) used to be refused; a state dict's default name could collide."""
    import shutil

    from safetensors.torch import load_file

    a, b = loras
    dotted = tmp_path / "detail_v1.5.safetensors"
    shutil.copy(a, dotted)
    pipe = AdapterPipeline(load_base("tiny"))
    assert [pipe.load_lora(p, scale=0.5) for p in (a, b, dotted)] == \
        ["pytorch_lora_weights", "pytorch_lora_weights_2", "detail_v1_5"]
    mixed = ours(pipe)
    assert np.abs(mixed - theirs(load_base("tiny"), [(a, 0.5), (b, 0.5), (a, 0.5)])).max() <= 1e-4
    sd = load_file(str(b))
    assert [pipe.load_lora(sd, scale=0.1) for _ in range(2)] == ["lora", "lora_2"]
    pipe.unload_lora("lora")
    assert pipe.load_lora(sd, scale=0.1) == "lora"
    with pytest.raises(ConfigError, match="without dots"):
        pipe.load_lora(a, name="my.lora")


def test_a_file_that_is_not_a_lora_says_so(tmp_path):
    """An adapter checkpoint given as a LoRA was reported as a LoRA for another base ("does not fit this base")."""
    from t2iadapter.bases import tiny_adapter_config
    from t2iadapter.errors import CheckpointError
    from t2iadapter.models import build_adapter

    path = tmp_path / "sketch.safetensors"
    base = load_base("tiny")
    build_adapter(tiny_adapter_config(base, 1)).save_file(path)
    pipe = AdapterPipeline(base)
    with pytest.raises(CheckpointError, match="is not a LoRA: none of its .* tensors is a LoRA weight"):
        pipe.load_lora(path)
    assert pipe.loras.scales == {}
