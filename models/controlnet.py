"""A ControlNet on the teacher (paper §A.2: the TLCM LoRA with a ControlNet made for the base model).

``ControlNetModel.from_unet`` copies the teacher UNet's encoder and mid block and adds zero-initialised
output convolutions, so training starts from the teacher itself. The control signal is an edge map of
the picture (``edge_map``), computed from pixels alone: it does not depend on how a world draws its
scenes. No I/O.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.denoiser import Cond


def edge_map(images: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Binary edges of images (N, 3, H, W) in [0, 1]: Sobel gradient magnitude, the largest over the colour
    channels, above ``threshold``; returned as a 3-channel image in {0, 1} (what a ControlNet pipeline takes)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device) / 4
    k = torch.stack([kx, kx.T]).unsqueeze(1)  # (2, 1, 3, 3)
    n, c, h, w = images.shape
    g = F.conv2d(F.pad(images.reshape(n * c, 1, h, w).float(), (1, 1, 1, 1), mode="replicate"), k)
    mag = g.pow(2).sum(1).sqrt().reshape(n, c, h, w).amax(1, keepdim=True)
    return (mag > threshold).float().expand(n, 3, h, w).contiguous()


def build_controlnet(unet, vae_scale_factor: int):
    """A ControlNet from the teacher UNet; its conditioning embedding downsamples by the VAE's factor
    (SDXL: 8, the shapes-world VAE: 2), so the control image has the pipeline's image size."""
    from diffusers import ControlNetModel

    levels = max(1, int(vae_scale_factor).bit_length())  # 1 + log2(factor) convolution widths
    widths = tuple(min(256, 16 * 2**i) for i in range(levels))
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths)


def controlled_eps(unet, controlnet, z_t: torch.Tensor, t: torch.Tensor, c: Cond, control: torch.Tensor,
                   scale: float = 1.0) -> torch.Tensor:
    """ε̂(z_t, t, c | control): the ControlNet's residuals added to the UNet's skip connections and mid block
    (as ``StableDiffusionXLControlNetPipeline`` does; CFG off)."""
    t = torch.as_tensor(t, device=z_t.device).expand(z_t.shape[0])
    added = None if c.pooled is None else {"text_embeds": c.pooled, "time_ids": c.time_ids}
    down, mid = controlnet(z_t, t, encoder_hidden_states=c.prompt_embeds, controlnet_cond=control,
                           conditioning_scale=scale, added_cond_kwargs=added, return_dict=False)
    return unet(z_t, t, encoder_hidden_states=c.prompt_embeds, added_cond_kwargs=added,
                down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
