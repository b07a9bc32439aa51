"""The one parameterisation wrapper that losses and samplers call.

``Cond`` is SDXL's conditioning (penultimate hidden states of both text
encoders, the pooled projection of the second, six size/crop ids), or an
SD1.5-style model's (the one text encoder's last hidden states; no pooled, no ids).
Its unconditional input is what the diffusers pipeline uses for CFG: zeros for
SDXL (``force_zeros_for_empty_prompt``), else the empty prompt's embedding
(``neg_embeds``/``neg_pooled``; SD1.5 was trained with empty-caption dropout).
``Denoiser`` wraps an ε-prediction UNet with the teacher's ``alphas_cumprod``
and gives ε̂, CFG-guided ε̃ and x̂_0 for any (z_t, t, c).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.diffusion import cfg, x0_from_eps


@dataclass(frozen=True)
class Cond:
    prompt_embeds: torch.Tensor  # (N, L, D)
    pooled: torch.Tensor | None  # (N, P); None for SD1.5-style UNets without text_time
    time_ids: torch.Tensor | None  # (N, 6)
    neg_embeds: torch.Tensor | None = None  # (N, L, D) unconditional embeddings; None = zeros (SDXL)
    neg_pooled: torch.Tensor | None = None  # (N, P) their pooled projection (SDXL without forced zeros)

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def unconditional(self) -> "Cond":
        """The pipeline's unconditional input: zero embeddings (SDXL's ``force_zeros_for_empty_prompt``),
        or the empty prompt's embeddings when ``neg_embeds`` is set (SD1.5)."""
        if self.neg_embeds is not None:
            return Cond(self.neg_embeds, self.neg_pooled, self.time_ids, self.neg_embeds, self.neg_pooled)
        z = lambda x: None if x is None else torch.zeros_like(x)  # noqa: E731
        return Cond(z(self.prompt_embeds), z(self.pooled), self.time_ids)

    def masked(self, keep: torch.Tensor) -> "Cond":
        """Rows with ``keep`` False become unconditional (caption dropout for CFG training)."""
        u = self.unconditional()

        def m(x, ux):
            if x is None:
                return None
            k = keep.to(device=x.device, dtype=torch.bool).view(-1, *([1] * (x.ndim - 1)))
            return torch.where(k, x, ux.to(x.dtype))

        return Cond(m(self.prompt_embeds, u.prompt_embeds), m(self.pooled, u.pooled), self.time_ids,
                    self.neg_embeds, self.neg_pooled)

    def take(self, idx: torch.Tensor) -> "Cond":
        """The rows ``idx`` (a sub-batch)."""
        t = lambda x: None if x is None else x[idx]  # noqa: E731
        return Cond(t(self.prompt_embeds), t(self.pooled), t(self.time_ids), t(self.neg_embeds), t(self.neg_pooled))

    def to(self, dtype: torch.dtype) -> "Cond":
        """Every tensor in ``dtype`` (the UNet's: frozen weights may be bf16 while the solver runs in float32)."""
        t = lambda x: None if x is None else x.to(dtype)  # noqa: E731
        return Cond(t(self.prompt_embeds), t(self.pooled), t(self.time_ids), t(self.neg_embeds), t(self.neg_pooled))

    def cat(self, other: "Cond") -> "Cond":
        c = lambda a, b: None if a is None or b is None else torch.cat([a, b])  # noqa: E731
        return Cond(c(self.prompt_embeds, other.prompt_embeds), c(self.pooled, other.pooled),
                    c(self.time_ids, other.time_ids), c(self.neg_embeds, other.neg_embeds),
                    c(self.neg_pooled, other.neg_pooled))


def _empty_prompt(pipe, n: int, sdxl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The empty prompt's embeddings (and pooled projection for SDXL), encoded once, expanded to ``n`` rows."""
    out = pipe.encode_prompt([""], device=pipe.unet.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    embeds, pooled = (out[0], out[2]) if sdxl else (out[0], None)
    return embeds.expand(n, *embeds.shape[1:]), None if pooled is None else pooled.expand(n, *pooled.shape[1:])


def encode_prompts(pipe, prompts: list[str]) -> Cond:
    """Encode like the diffusers pipeline does at inference (gradients flow if enabled).
    Time ids are the pipeline's defaults: (H, W, 0, 0, H, W) at its native resolution.
    SD1.5-style pipelines (one text encoder, no ``text_time``): ``Cond(embeds, None, None)`` plus
    the empty prompt's embeddings as the CFG unconditional, as ``StableDiffusionPipeline`` does."""
    if hasattr(pipe, "text_encoder_2"):
        image_size = pipe.default_sample_size * pipe.vae_scale_factor
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=pipe.unet.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        ids = torch.tensor([[image_size, image_size, 0, 0, image_size, image_size]], dtype=embeds.dtype)
        ids = ids.repeat(len(prompts), 1).to(embeds.device)
        if getattr(pipe.config, "force_zeros_for_empty_prompt", True):
            return Cond(embeds, pooled, ids)
        neg, neg_pooled = _empty_prompt(pipe, len(prompts), sdxl=True)
        return Cond(embeds, pooled, ids, neg, neg_pooled)
    embeds, _ = pipe.encode_prompt(prompts, device=pipe.unet.device, num_images_per_prompt=1,
                                   do_classifier_free_guidance=False)
    neg, _ = _empty_prompt(pipe, len(prompts), sdxl=False)
    return Cond(embeds, None, None, neg, None)


class Denoiser:
    """ε-prediction UNet + ``alphas_cumprod``: ε̂_θ(z_t, t, c), CFG ε̃ and x̂_0.

    The UNet runs in its own dtype (``teacher.dtype``: bf16 frozen weights on GPUs; a LoRA on it stays
    float32, peft casts at its input); ε̂ comes back in float32, so solvers and losses run in float32."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor):
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod

    def eps(self, z: torch.Tensor, t: torch.Tensor, c: Cond) -> torch.Tensor:
        t = torch.as_tensor(t, device=z.device).expand(z.shape[0])
        weights = getattr(self.unet, "parameters", None)  # a plain callable (tests' toy UNets) runs in z's dtype
        dtype = next(weights()).dtype if weights is not None else z.dtype  # conv_in's (a LoRA's come after the base's)
        c = c.to(dtype)
        added = None if c.pooled is None else {"text_embeds": c.pooled, "time_ids": c.time_ids}
        return self.unet(z.to(dtype), t, encoder_hidden_states=c.prompt_embeds, added_cond_kwargs=added).sample.float()

    def eps_cfg(self, z: torch.Tensor, t: torch.Tensor, c: Cond, w: float) -> torch.Tensor:
        """ε̃ = ε_u + w (ε_c − ε_u), one batched UNet call (w = 1: conditional only)."""
        if w == 1.0:
            return self.eps(z, t, c)
        t = torch.as_tensor(t, device=z.device).expand(z.shape[0])
        e = self.eps(torch.cat([z, z]), torch.cat([t, t]), c.unconditional().cat(c))
        e_u, e_c = e.chunk(2)
        return cfg(e_u, e_c, w)

    def x0(self, z: torch.Tensor, t: torch.Tensor, c: Cond, w: float = 1.0) -> torch.Tensor:
        return x0_from_eps(z, self.eps_cfg(z, t, c, w), torch.as_tensor(t, device=z.device).expand(z.shape[0]),
                           self.alphas_cumprod)
