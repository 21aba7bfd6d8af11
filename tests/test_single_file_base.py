"""Single-file bases: an LDM-layout checkpoint (the layout most users download) loads offline with config_dir.

The file is made here from the tiny base by inverting diffusers' own single-file key mapping
(`diffusers.loaders.single_file_utils`: DIFFUSERS_TO_LDM_MAPPING, the resnet/attention renames and the block
numbering of `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`), so loading it runs diffusers'
forward conversion; every UNet, VAE and text-encoder tensor must come back equal.
"""
import re
import warnings

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, LDM_CLIP_PREFIX_TO_REMOVE, LDM_UNET_KEY
from safetensors.torch import save_file

from t2iadapter.bases import load_base
from t2iadapter.pipeline import AdapterPipeline

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(sd: dict, config) -> dict:
    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    step = config.layers_per_block + 1
    out = {}
    for key, value in sd.items():
        if key in top:
            new = top[key]
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key):
            side, i, part, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            rest = _rename(rest, _RESNET) if part == "resnets" else rest
            if part == "downsamplers":
                new = f"input_blocks.{(i + 1) * step}.0.op.{rest.removeprefix('conv.')}"
            elif part == "upsamplers":
                attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd)
                new = f"output_blocks.{i * step + step - 1}.{2 if attn else 1}.{rest}"
            elif side == "down":
                new = f"input_blocks.{1 + i * step + j}.{0 if part == 'resnets' else 1}.{rest}"
            else:
                new = f"output_blocks.{i * step + j}.{0 if part == 'resnets' else 1}.{rest}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_rename(m[2], _RESNET)}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        else:
            raise AssertionError(f"no LDM name for UNet key {key}")
        out[LDM_UNET_KEY + new] = value
    return out


def vae_to_ldm(sd: dict, config) -> dict:
    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(config.up_block_types)
    out = {}
    for key, value in sd.items():
        if key in top:
            new = top[key]
        elif m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", key):
            coder, side, i, part, j, rest = m[1], m[2], int(m[3]), m[4], m[5], m[6]
            i = n_up - 1 - i if side == "up" else i  # LDM numbers the decoder's levels from the bottom
            if part == "resnets":
                new = f"{coder}.{side}.{i}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"{coder}.{side}.{i}.{'downsample' if side == 'down' else 'upsample'}.{rest}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            new = f"{m[1]}.mid.attn_1.{_rename(m[2], _VAE_ATTN)}"
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        else:
            raise AssertionError(f"no LDM name for VAE key {key}")
        out["first_stage_model." + new] = value
    return out


def write_ldm_checkpoint(base, folder):
    """`base` as diffusers configs (folder/configs) and one LDM-layout file (folder/model.safetensors)."""
    base.save_pretrained(folder / "configs")
    ckpt = {**unet_to_ldm(base.unet.state_dict(), base.unet.config), **vae_to_ldm(base.vae.state_dict(), base.vae.config)}
    # LDM keeps transformers' `text_model.` level, which newer transformers flatten out of CLIPTextModel.
    ckpt.update({LDM_CLIP_PREFIX_TO_REMOVE[0] + ("" if k.startswith("text_model.") else "text_model.") + k: v
                 for k, v in base.text_encoder.state_dict().items()})
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(folder / "model.safetensors"))


def test_ldm_single_file_loads_offline_with_config_dir(tmp_path):
    base = load_base("tiny")
    write_ldm_checkpoint(base, tmp_path)

    pipe = AdapterPipeline.from_pretrained(tmp_path / "model.safetensors", config_dir=tmp_path / "configs")
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe.base, name).state_dict(), getattr(base, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), f"{name}: {k}"
    assert pipe.base.source == str(tmp_path / "model.safetensors")


def test_a_single_file_named_in_upper_case_loads_as_the_lower_case_one(tmp_path):
    """`MODEL.SAFETENSORS` was refused by the suffix check, and diffusers alone reads it with torch.load."""
    base = load_base("tiny")
    write_ldm_checkpoint(base, tmp_path)
    upper = (tmp_path / "model.safetensors").rename(tmp_path / "MODEL.SAFETENSORS")
    loaded = load_base(upper, config_dir=tmp_path / "configs")
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    assert loaded.source == str(upper) and sorted(p.name for p in tmp_path.iterdir()) == ["MODEL.SAFETENSORS", "configs"]


def test_a_dtype_loads_folders_and_single_files_without_deprecation_warnings(tmp_path):
    """diffusers ≥ 0.40 warns on `torch_dtype`: the keyword follows the installed version; the weights come cast."""
    base = load_base("tiny")
    write_ldm_checkpoint(base, tmp_path)
    for source, extra in ((tmp_path / "configs", {}), (tmp_path / "model.safetensors", {"config_dir": tmp_path / "configs"})):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*torch_dtype.*")
            loaded = load_base(source, dtype=torch.float16, **extra)
        for name in ("unet", "vae", "text_encoder"):
            ours, theirs = getattr(loaded, name).state_dict(), getattr(base, name).state_dict()
            assert all(torch.equal(ours[k], theirs[k].half()) for k in theirs), (source, name)
