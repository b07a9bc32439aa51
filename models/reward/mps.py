"""MPS (Kwai-Kolors, CVPR 2024) as a network: a HF ``CLIPModel`` plus the cross-attention
``cross_model``, with the condition mask. Module names match the released pickled module
(``model.*``, ``cross_model.layers.*``), so its state dict loads without unpickling
(:mod:`tlcm.loaders.reward_io`). Pixels are preprocessed as CLIP's image processor does (:mod:`models.clip_image`)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.clip_image import ImageTransform
from models.reward.scorer import tokenize

# MPS's default condition (its README and eval scripts) is the "overall" condition. The release is trained
# on overall preference only; the other two are the alignment / detail words of that same text (its
# aesthetics words are the first seven), as a best guess for multi-condition checkpoints.
MPS_CONDITION_TEXTS: dict[str, str] = {
    "overall": "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
               "instance, texture, quantity, attributes, position, number, location, word, things.",
    "detail": "shape, face, hair, hands, limbs, structure, instance, texture.",
    "alignment": "quantity, attributes, position, number, location, word, things.",
}


class _LayerNorm(nn.Module):
    """LayerNorm with a fixed zero bias (a buffer, as in MPS's ``cross_modeling.LayerNorm``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *args) + x


class _SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class _Rotary(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, n: int) -> torch.Tensor:
        freqs = torch.outer(torch.arange(n, device=self.inv_freq.device, dtype=self.inv_freq.dtype), self.inv_freq)
        return torch.cat((freqs, freqs), dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (2, -1)).unbind(-2)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(pos: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t * pos.cos().to(t.dtype) + _rotate_half(t) * pos.sin().to(t.dtype)


class _ParallelBlock(nn.Module):
    """PaLM-style parallel self-attention + SwiGLU feed-forward, multi-query (one key/value head), rotary."""

    def __init__(self, dim: int, dim_head: int, heads: int, ff_mult: int):
        super().__init__()
        self.norm = _LayerNorm(dim)
        self.heads, self.scale = heads, dim_head ** -0.5
        self.fused_dims = (dim_head * heads, dim_head, dim_head, dim * ff_mult * 2)
        self.rotary_emb = _Rotary(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(dim_head * heads, dim, bias=False)
        self.ff_out = nn.Sequential(_SwiGLU(), nn.Linear(dim * ff_mult, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)
        q = q.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # b h n d
        pos = self.rotary_emb(x.shape[1])
        q, k = _apply_rotary(pos, q), _apply_rotary(pos, k)
        sim = torch.einsum("bhid,bjd->bhij", q * self.scale, k)
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).flatten(2)
        return self.attn_out(out) + self.ff_out(ff)


class _CrossAttention(nn.Module):
    """Image tokens attend to prompt tokens (one key/value head), an additive mask, parallel SwiGLU FF."""

    def __init__(self, dim: int, dim_head: int, heads: int, ff_mult: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = _LayerNorm(dim)
        self.context_norm = nn.Identity()
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, dim * ff_mult * 2, bias=False), _SwiGLU(),
                                nn.Linear(dim * ff_mult, dim, bias=False))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) * self.scale
        k, v = self.to_kv(self.context_norm(context)).chunk(2, dim=-1)
        sim = torch.einsum("bhid,bjd->bhij", q, k) + mask[:, None]
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).flatten(2)
        return self.to_out(out) + self.ff(x)


class CrossModel(nn.Module):
    """MPS's ``Cross_model``: ``layer_num`` × (residual cross-attention, residual parallel block)."""

    def __init__(self, dim: int = 1024, layer_num: int = 4, dim_head: int = 64, heads: int = 16, ff_mult: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([_Residual(_CrossAttention(dim, dim_head, heads, ff_mult)),
                           _Residual(_ParallelBlock(dim, dim_head, heads, ff_mult))])
            for _ in range(layer_num))

    def forward(self, query: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for cross, block in self.layers:
            query = block(cross(query, context, mask))
        return query


def cross_dims_from_state(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """``CrossModel`` hyper-parameters read off its weights (keys ``cross_model.layers.*``)."""
    layers = {int(k.split(".")[2]) for k in state if k.startswith("cross_model.layers.")}
    if not layers:
        raise KeyError("no cross_model.layers.* weights in this state dict (not an MPS checkpoint?)")
    to_q, to_kv = state["cross_model.layers.0.0.fn.to_q.weight"], state["cross_model.layers.0.0.fn.to_kv.weight"]
    dim_head, dim = to_kv.shape[0] // 2, to_q.shape[1]
    ff_out = state["cross_model.layers.0.1.fn.ff_out.1.weight"]
    return {"dim": dim, "layer_num": max(layers) + 1, "dim_head": dim_head, "heads": to_q.shape[0] // dim_head,
            "ff_mult": ff_out.shape[1] // dim}


def condition_mask(text_f: torch.Tensor, cond_f: torch.Tensor, threshold: float) -> torch.Tensor:
    """MPS's condition mask: additive (N, 1, L), 0 for prompt tokens whose best similarity to a
    condition token is above ``threshold`` times the best one, −inf for the rest.
    (MPS normalises by the batch maximum at batch size 1; here per prompt, so that a score does
    not depend on the other images of the batch.)"""
    sim = torch.einsum("bid,bjd->bji", text_f, cond_f).amax(dim=1, keepdim=True)
    sim = sim / sim.amax(dim=-1, keepdim=True)
    return torch.where(sim > threshold, 0.0, float("-inf")).to(text_f.dtype)


class MPSNet(nn.Module):
    """MPS: CLIP (``model``) + ``cross_model``; score = exp(logit_scale) · cos(text EOS feature,
    cross-attended image CLS feature). Built from a transformers ``CLIPConfig``."""

    def __init__(self, clip_config: Any, cross: dict[str, int] | None = None, mask_threshold: float = 0.3,
                 tokenizer: Any = None):
        super().__init__()
        from transformers import CLIPModel

        cross = cross or {"dim": clip_config.projection_dim, "layer_num": 4, "dim_head": 64, "heads": 16, "ff_mult": 4}
        self.cross_dims, self.mask_threshold, self.tokenizer = dict(cross), mask_threshold, tokenizer
        self.model = CLIPModel(clip_config)
        self.cross_model = CrossModel(**cross)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def text_features(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected features of every token (N, L, D) and of the EOS token (N, D)."""
        out = self.model.text_model(input_ids=input_ids)
        proj = self.model.text_projection
        return proj(out.last_hidden_state), proj(out.pooler_output)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, condition_ids: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels (N, 3, S, S), prompt ids (N, L), condition ids (N or 1, Lc) → scores (N,)."""
        text_f, text_eos = self.text_features(input_ids)
        cond_f, _ = self.text_features(condition_ids)
        image_f = self.model.visual_projection(self.model.vision_model(pixel_values=pixel_values).last_hidden_state)
        mask = condition_mask(text_f, cond_f.expand(text_f.shape[0], -1, -1), self.mask_threshold)
        image_cls = self.cross_model(image_f, text_f, mask.expand(-1, image_f.shape[1], -1))[:, 0]
        cos = (F.normalize(image_cls, dim=-1) * F.normalize(text_eos, dim=-1)).sum(-1)
        return self.logit_scale.exp() * cos

    def score(self, images: torch.Tensor, prompts: list[str], condition: str) -> torch.Tensor:
        """``condition``: a name in :data:`MPS_CONDITION_TEXTS` or a condition text of its own."""
        if self.tokenizer is None:
            raise RuntimeError("MPSNet.score needs a tokenizer (load it with load_reward / load_mps)")
        dev = self.logit_scale.device
        dtype = self.model.visual_projection.weight.dtype
        max_len = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        ids, _ = tokenize(self.tokenizer, prompts, max_len)
        cond, _ = tokenize(self.tokenizer, [MPS_CONDITION_TEXTS.get(condition, condition)], max_len)
        pixels = ImageTransform(self.model.config.vision_config.image_size)(images).to(dtype)
        return self(pixels.to(dev), ids.to(dev), cond.to(dev)).float()
