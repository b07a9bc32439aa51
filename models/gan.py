"""The data-free adversarial term (paper Eq. 13): a discriminator built on the teacher UNet's encoder.

``D(z_t', t', c)`` = a small trainable head on the mid-block features of the teacher
UNet (time, text and ``text_time`` embeddings, ``conv_in``, down blocks, mid block),
run with its adapters off (``frozen``) or with a critic adapter (``lora``). The
encoder is the generator's UNet itself (one UNet in memory); which adapter is live
is chosen by the caller, never by a flag inside ``forward``.

Real inputs are ``FD(ẑ_0, t')`` with ẑ_0 the q-step student sample (Eq. 9's multistep
path); fake inputs are ``FD(z̃_0, t')`` with z̃_0 one student step from ẑ_t.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.denoiser import Cond


def unet_encoder_features(unet, z: torch.Tensor, t: torch.Tensor, c: Cond) -> torch.Tensor:
    """Mid-block feature map of ``unet`` for (z_t, t, c): the first half of ``UNet2DConditionModel.forward``."""
    t = torch.as_tensor(t, device=z.device).expand(z.shape[0])
    dtype = next(unet.parameters()).dtype  # the UNet's, as in Denoiser.eps
    z, c = z.to(dtype), c.to(dtype)
    emb = unet.time_embedding(unet.get_time_embed(sample=z, timestep=t), None)
    added = None if c.pooled is None else {"text_embeds": c.pooled, "time_ids": c.time_ids}
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=c.prompt_embeds, added_cond_kwargs=added)
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    h = unet.conv_in(z)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=c.prompt_embeds)
        else:
            h, _ = block(hidden_states=h, temb=emb)
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=c.prompt_embeds)
        else:
            h = unet.mid_block(h, emb)
    return h


class DiscriminatorHead(nn.Module):
    """Trainable head: conv → SiLU → spatial mean → linear, plus a projection term ⟨φ(pooled text), h⟩
    so the critic judges image–prompt pairs (projection discriminator, Miyato & Koyama 2018)."""

    def __init__(self, channels: int, text_dim: int | None, hidden: int = 64):
        super().__init__()
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
        self.norm = nn.GroupNorm(min(32, hidden), hidden)
        self.out = nn.Linear(hidden, 1)
        self.text = nn.Linear(text_dim, hidden, bias=False) if text_dim else None

    def forward(self, features: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        h = F.silu(self.norm(self.conv(features))).mean(dim=(2, 3))
        logit = self.out(h).squeeze(-1)
        if self.text is not None and text is not None:
            logit = logit + (self.text(text) * h).sum(-1) / h.shape[-1] ** 0.5
        return logit


def text_summary(c: Cond) -> torch.Tensor:
    """The prompt vector the head projects: SDXL's pooled embedding, else the mean token embedding (SD1.5)."""
    return c.pooled if c.pooled is not None else c.prompt_embeds.mean(dim=1)


def head_for(unet, c_dim: int) -> DiscriminatorHead:
    return DiscriminatorHead(unet.config.block_out_channels[-1], c_dim)


def discriminator_logits(unet, head: DiscriminatorHead, z: torch.Tensor, t: torch.Tensor, c: Cond) -> torch.Tensor:
    """D(z_t', t', c) before the sigmoid (the caller picks the UNet's live adapter)."""
    return head(unet_encoder_features(unet, z, t, c), text_summary(c))


def d_nonsaturating(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Critic loss −log D(real) − log(1 − D(fake)) (D = σ(logit))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator side of Eq. 13, non-saturating: −log D(fake)."""
    return F.softplus(-fake_logits).mean()


def d_hinge(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge critic loss: max(0, 1 − D(real)) + max(0, 1 + D(fake)) on the logits."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def g_hinge(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator side of Eq. 13, hinge: −D(fake) on the logit."""
    return -fake_logits.mean()


# ``dmgan.gan_loss`` → (critic loss, generator loss)
GAN_LOSSES = {"nonsaturating": (d_nonsaturating, g_nonsaturating), "hinge": (d_hinge, g_hinge)}


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, name: str) -> torch.Tensor:
    """The critic loss of the GAN loss ``name`` (:data:`GAN_LOSSES`)."""
    return GAN_LOSSES[name][0](real_logits, fake_logits)


def g_loss(fake_logits: torch.Tensor, name: str) -> torch.Tensor:
    """The generator loss of the GAN loss ``name`` (:data:`GAN_LOSSES`)."""
    return GAN_LOSSES[name][1](fake_logits)


def accuracy(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[float, float]:
    """(fraction of real inputs called real, fraction of fake inputs called fake)."""
    return float((real_logits > 0).float().mean()), float((fake_logits < 0).float().mean())
