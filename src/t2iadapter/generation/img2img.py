"""img2img and inpainting: start the denoising from an image instead of pure noise (issue 15).

Follows diffusers' `StableDiffusion(XL)Img2ImgPipeline` and `StableDiffusion(XL)InpaintPipeline` step for
step, so with the same components and seed the images agree:
- img2img: the schedule of `steps` is cut to its last `int(steps·strength)` timesteps (`get_timesteps`);
  the image's latents (one posterior draw) are noised to the first of them.
- inpainting, ordinary 4-channel UNet: after every step the kept region (mask 0) is replaced by the
  image's latents noised to the next timestep (latent blending).
- inpainting UNet (9 input channels, sd-1.5-inpainting / SDXL inpainting layout): the UNet input is
  `[latents, mask, masked-image latents]` along channels; no blending.
The generator is drawn in diffusers' order (image encode, noise, masked-image encode), so schedulers
that draw during the steps (DDPM, Euler a, LCM) also agree. Adapters are untouched: their features are
computed once and reach the UNet exactly as in text-to-image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from t2iadapter.bases import placement
from t2iadapter.errors import ConditionError, ConfigError
from t2iadapter.generation import latents as latent_space
from t2iadapter.generation.conditions import load_condition

INPAINT_UNET_CHANNELS = 9  # latents 4 + mask 1 + masked-image latents 4 (sd-1.5-inpainting, SDXL inpainting)


def _size_of(item: Any) -> tuple[int, int]:
    return item.size if hasattr(item, "size") and not isinstance(item, torch.Tensor) else (item.shape[-1], item.shape[-2])


def _as_batch(item: Any, what: str) -> Any:
    """PIL images in RGB (diffusers' processor keeps L/RGBA as they are), tensors [1, C, H, W] with C 1 or 3: an
    alpha channel is dropped, as for PIL images (diffusers' processor would take 4 channels for latents)."""
    if isinstance(item, torch.Tensor):
        if item.ndim not in (3, 4) or (item.ndim == 4 and item.shape[0] != 1):
            raise ConditionError(f"{what} tensor must be [C, H, W] or [1, C, H, W], got {tuple(item.shape)}")
        item = item[None] if item.ndim == 3 else item
        if item.shape[1] not in (1, 3, 4):
            raise ConditionError(f"{what} has {item.shape[1]} channels; give 1 (grey), 3 (RGB) or 4 (RGBA)")
        return item[:, :3]
    return item if item.mode == "RGB" else item.convert("RGB")


def image_size(init_image: Any, vae_scale_factor: int, what: str = "init_image") -> tuple[int, int]:
    """(w, h) of an init image (or a condition), rounded down to `vae_scale_factor` (diffusers' default height/width).
    A tensor's shape is enough: its range is checked once, where it is loaded (a scan waits on a GPU)."""
    sized = init_image if isinstance(init_image, torch.Tensor) and init_image.ndim >= 2 else \
        load_condition(init_image, what)
    w, h = _size_of(sized)
    return max(w - w % vae_scale_factor, vae_scale_factor), max(h - h % vae_scale_factor, vae_scale_factor)


@dataclass
class Source:
    """The image (and mask) a call starts from, on the canvas; `start()` fills in the latents the loop needs."""

    pixels: torch.Tensor  # [1, 3, H, W] in [-1, 1], float32, zero-padded to the canvas
    mask: torch.Tensor | None  # [1, 1, H, W] in {0, 1} (1 = repaint); None: img2img
    strength: float
    schedule_steps: int  # the steps of the full schedule (the request's `steps`)
    inpaint_unet: bool = False  # a 9-channel inpainting UNet
    # set by start()
    image_latents: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    mask_latents: torch.Tensor | None = None  # [B(·2), 1, h, w]
    masked_latents: torch.Tensor | None = None  # [B(·2), 4, h, w]

    def start(self, d: Any, dtype: torch.dtype) -> torch.Tensor:
        """Cut the schedule (`d.run_timesteps`) and return the initial latents; `d` is the loop's `Denoise`."""
        sched, g, base = d.scheduler, d.generator, d.base
        n = self.schedule_steps
        t_start = max(n - min(int(n * self.strength), n), 0)
        d.run_timesteps = sched.timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        batch, device = d.shape[0], placement(base.unet)[0]
        first = d.run_timesteps[:1].repeat(batch)
        full = self.mask is not None and self.strength == 1.0  # inpainting from pure noise, as diffusers
        if self.mask is None or not self.inpaint_unet or not full:
            self.image_latents = self._encode(base, self.pixels, g, dtype).repeat(batch, 1, 1, 1)
        self.noise = torch.randn(d.shape, generator=g, device=g.device, dtype=dtype).to(device)
        if full:
            latents = self.noise * sched.init_noise_sigma
        else:
            latents = sched.add_noise(self.image_latents, self.noise, first)
        if self.mask is not None:
            cfg = 2 if d.prompts.cfg else 1
            m = F.interpolate(self.mask, size=d.shape[2:]).to(device, dtype)
            self.mask_latents = torch.cat([m.repeat(batch, 1, 1, 1)] * cfg)
            masked = self.pixels * (self.mask < 0.5)
            if self.inpaint_unet:
                self.masked_latents = torch.cat([self._encode(base, masked, g, dtype).repeat(batch, 1, 1, 1)] * cfg)
            else:  # diffusers encodes the masked image here too; draw the same numbers so later draws agree
                torch.randn((1, *d.shape[1:]), generator=g, device=g.device)
        return latents

    @staticmethod
    def _encode(base: Any, pixels: torch.Tensor, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        return latent_space.encode(base.vae, pixels, g, upcast=base.is_sdxl).to(placement(base.unet)[0], dtype)

    def unet_input(self, x: torch.Tensor) -> torch.Tensor:
        """An inpainting UNet's input: the scaled latents with the mask and masked-image latents appended."""
        if not self.inpaint_unet:
            return x
        return torch.cat([x, self.mask_latents.to(x.dtype), self.masked_latents.to(x.dtype)], dim=1)

    def blend(self, i: int, latents: torch.Tensor, scheduler: Any, timesteps: Any) -> torch.Tensor:
        """After step i: keep the unmasked region at the image's latents noised to the next timestep (4-ch UNets)."""
        if self.mask is None or self.inpaint_unet:
            return latents
        kept = self.image_latents
        if i < len(timesteps) - 1:
            kept = scheduler.add_noise(kept, self.noise, torch.as_tensor(timesteps[i + 1]).reshape(1))
        m = self.mask_latents[: latents.shape[0]].to(latents.dtype)
        return (1 - m) * kept.to(latents.dtype) + m * latents

    def paste(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded images [B, 3, H, W] in [0, 1] with the kept pixels (mask 0) of the init image put back exactly."""
        m = self.mask.to(images.device, images.dtype)
        original = (self.pixels.to(images.device, images.dtype) / 2 + 0.5).clamp(0, 1)
        return m * images + (1 - m) * original


def prepare(init_image: Any, mask_image: Any, strength: float, steps: int, size: tuple[int, int],
            canvas: tuple[int, int], vae_scale_factor: int, unet_channels: int) -> Source:
    """A `Source` from the request's images: resized to `size` (w, h) as diffusers' VaeImageProcessor does,
    zero-padded to `canvas`; the mask binarised at 0.5 (white = repaint)."""
    from diffusers.image_processor import VaeImageProcessor

    inpaint_unet = unet_channels == INPAINT_UNET_CHANNELS
    if inpaint_unet and mask_image is None:
        raise ConfigError("this base has an inpainting UNet (9 input channels); give mask_image (white = repaint)")
    image = _as_batch(load_condition(init_image, "init_image"), "init_image")
    w, h = size
    pad = (0, canvas[0] - w, 0, canvas[1] - h)
    pixels = VaeImageProcessor(vae_scale_factor=vae_scale_factor).preprocess(image, height=h, width=w)
    if pixels.shape[1] == 1:
        pixels = pixels.repeat(1, 3, 1, 1)
    pixels = F.pad(pixels.float(), pad)  # (3 channels: RGB images, tensors without alpha, grey repeated above)
    mask = None
    if mask_image is not None:
        mask_item = _as_batch(load_condition(mask_image, "mask_image"), "mask_image")
        if _size_of(mask_item) != _size_of(image):
            raise ConditionError(f"mask_image is {'x'.join(map(str, _size_of(mask_item)))} but init_image is "
                                 f"{'x'.join(map(str, _size_of(image)))}; give a mask of the image's size")
        processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_normalize=False, do_binarize=True,
                                      do_convert_grayscale=True)
        mask = F.pad(processor.preprocess(mask_item, height=h, width=w).float()[:, :1], pad)
        if not mask.any():
            raise ConditionError("mask_image has nothing to repaint: white (over half) = repaint, black = keep; 8-bit "
                                 "masks are 0/255 (a 0/1 label array: multiply it by 255)")
    return Source(pixels, mask, strength, steps, inpaint_unet)
