"""Reward models with the MPS interface: ``score(images, prompts, condition) -> (N,)``.

Two implementations of :class:`RewardScorer`:

* :class:`ShapesReward`: the shapes world's reward model (a small CNN with spatial-pyramid
  pooling, a small transformer over the prompt tokens, a condition embedding). Trained by the
  ``reward`` stage with Bradley–Terry losses on synthetic preference pairs.
* :class:`MPSNet`: a minimal re-implementation of Kwai-Kolors MPS ("Learning
  Multi-dimensional Human Preference for Text-to-Image Generation", CVPR 2024): a HF
  ``CLIPModel`` (ViT-H/14 in the release) plus the cross-attention ``cross_model``, with the
  condition mask (prompt tokens whose similarity to the condition text is at most
  ``mask_threshold`` of the best one are hidden). Module names match the released pickled
  module (``model.*``, ``cross_model.layers.*``), so its state dict loads without unpickling.

Images are float (N, 3, H, W) in [0, 1]; scores are differentiable in the images. Pure
networks and math: tokenizers are passed in, nothing here reads or writes files.
"""
from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

CONDITIONS: tuple[str, ...] = ("overall", "alignment", "detail")

# MPS's default condition (its README and eval scripts) is the "overall" condition. The release is trained
# on overall preference only; the other two are the alignment / detail words of that same text (its
# aesthetics words are the first seven), as a best guess for multi-condition checkpoints.
MPS_CONDITION_TEXTS: dict[str, str] = {
    "overall": "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
               "instance, texture, quantity, attributes, position, number, location, word, things.",
    "detail": "shape, face, hair, hands, limbs, structure, instance, texture.",
    "alignment": "quantity, attributes, position, number, location, word, things.",
}
SPP_GRIDS = (1, 2, 4)  # spatial-pyramid pooling of the image features: what is where, at three scales
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@runtime_checkable
class RewardScorer(Protocol):
    """What the preference-optimisation stage needs from a reward model (frozen, eval mode)."""

    def score(self, images: torch.Tensor, prompts: list[str], condition: str) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1], one prompt per image, a condition name → scores (N,)."""
        ...


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (both (N, max_length), long), padded to ``max_length``."""
    enc = tokenizer(texts, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


# ---- the shapes-world reward model ----------------------------------------------------

def _conv_block(cin: int, cout: int) -> nn.Sequential:
    """Two 3×3 convs with GroupNorm and SiLU."""
    g = math.gcd(4, cout)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(g, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(g, cout), nn.SiLU())


def _encoder(d: int, heads: int, depth: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class ShapesReward(nn.Module):
    """Image, prompt tokens and a condition → one scalar per (image, prompt).

    score = a_c · <image embedding, prompt embedding> / √e + q_c · quality(image) + b_c

    * image: three conv blocks (full, 1/2, 1/4 resolution; widths width/2, width, 2·width),
      average-pooled on 1×1, 2×2 and 4×4 grids (what is where) → MLP → embedding (e = 4·width);
      the *quality* term is an MLP on the globally pooled features (image only);
    * prompt: token embeddings + positions, ``depth`` transformer layers, the token features
      flattened in order (word and slot) → MLP → embedding;
    * condition c: learned (a_c, q_c, b_c), initialised to (1, 1, 0).

    Factorised (a dual encoder) so that the stage can score every image against many prompts
    at the cost of a dot product each.
    """

    def __init__(self, vocab_size: int, max_length: int, width: int = 32, image_size: int = 32, depth: int = 2,
                 heads: int = 4, tokenizer: Any = None):
        super().__init__()
        self.config = {"vocab_size": vocab_size, "max_length": max_length, "width": width, "image_size": image_size,
                       "depth": depth, "heads": heads}
        self.tokenizer = tokenizer
        d = 2 * width
        self.stem = nn.Sequential(_conv_block(3, width // 2), nn.AvgPool2d(2), _conv_block(width // 2, width),
                                  nn.AvgPool2d(2), _conv_block(width, d))
        self.quality = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 1))
        self.token_emb = nn.Embedding(vocab_size, d)
        self.token_pos = nn.Parameter(torch.randn(max_length, d) * 0.02)
        self.text_encoder = _encoder(d, heads, depth) if depth else nn.Identity()
        self.image_proj = nn.Sequential(nn.Linear(sum(g * g for g in SPP_GRIDS) * d, 2 * d), nn.SiLU(),
                                        nn.Linear(2 * d, 2 * d))
        self.text_proj = nn.Sequential(nn.LayerNorm(d), nn.Flatten(), nn.Linear(max_length * d, 2 * d), nn.SiLU(),
                                       nn.Linear(2 * d, 2 * d))
        self.condition_emb = nn.Embedding(len(CONDITIONS), 3)  # (alignment weight, quality weight, bias)
        with torch.no_grad():
            self.condition_emb.weight.copy_(torch.tensor([1.0, 1.0, 0.0]).expand(len(CONDITIONS), 3))

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3, H, W) in [0, 1] → embeddings (N, e) and the quality term (N,)."""
        f = self.stem(images * 2 - 1)
        pyramid = torch.cat([F.adaptive_avg_pool2d(f, g).flatten(1) for g in SPP_GRIDS], 1)
        return self.image_proj(pyramid), self.quality(f.mean((2, 3))).squeeze(-1)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids and attention mask (M, L ≤ max_length) → prompt embeddings (M, e)."""
        used = int(attention_mask.sum(1).max())
        ids, mask = input_ids[:, :used], attention_mask[:, :used].bool()
        x = self.token_emb(ids) + self.token_pos[:used]
        x = self.text_encoder(x, src_key_padding_mask=~mask) if self.config["depth"] else x
        x = F.pad(x * mask[..., None], (0, 0, 0, self.config["max_length"] - used))
        return self.text_proj(x)

    def fuse(self, images: tuple[torch.Tensor, torch.Tensor], texts: torch.Tensor,
             image_idx: torch.Tensor, text_idx: torch.Tensor, condition_ids: torch.Tensor) -> torch.Tensor:
        """Scores (K,) of the combinations (image ``image_idx[k]``, prompt ``text_idx[k]``, condition
        ``condition_ids[k]``) of encoded ``images`` (:meth:`encode_images`) and ``texts`` (:meth:`encode_texts`)."""
        emb, quality = images[0][image_idx], images[1][image_idx]
        alignment = (emb * texts[text_idx]).sum(-1) / math.sqrt(emb.shape[-1])
        w = self.condition_emb(condition_ids)
        return w[:, 0] * alignment + w[:, 1] * quality + w[:, 2]

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                condition_ids: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) in [0, 1], token ids and mask (N, L), condition indices (N,) → scores (N,)."""
        idx = torch.arange(images.shape[0], device=images.device)
        return self.fuse(self.encode_images(images), self.encode_texts(input_ids, attention_mask), idx, idx,
                         condition_ids)

    def condition_ids(self, condition: str, n: int) -> torch.Tensor:
        if condition not in CONDITIONS:
            raise ValueError(f"unknown reward condition '{condition}' (conditions: {', '.join(CONDITIONS)})")
        return torch.full((n,), CONDITIONS.index(condition), dtype=torch.long, device=self.token_pos.device)

    def score(self, images: torch.Tensor, prompts: list[str], condition: str) -> torch.Tensor:
        """The :class:`RewardScorer` interface; ``condition`` in :data:`CONDITIONS`."""
        if self.tokenizer is None:
            raise RuntimeError("ShapesReward.score needs a tokenizer (pass tokenizer= or load it with load_reward)")
        ids, mask = tokenize(self.tokenizer, prompts, self.config["max_length"])
        dev = self.token_pos.device
        return self(images, ids.to(dev), mask.to(dev), self.condition_ids(condition, len(prompts)))


def bradley_terry_loss(s_preferred: torch.Tensor, s_rejected: torch.Tensor) -> torch.Tensor:
    """Mean −log σ(s_w − s_l)."""
    return -F.logsigmoid(s_preferred - s_rejected).mean()


def listwise_loss(scores: torch.Tensor) -> torch.Tensor:
    """Plackett–Luce top-1 loss, rows = [preferred, rejected...]: mean −log softmax(row)[0]
    (Bradley–Terry when a row has one rejected item; −inf entries are left out)."""
    return F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))


def centering_loss(s_preferred: torch.Tensor, s_rejected: torch.Tensor) -> torch.Tensor:
    """(mean of all scores)²: BT fixes differences only; this puts the preferred/rejected
    boundary at 0, so that ``max(s(x, c_neg), 0)`` (TLCM Eq. 11) has a meaning."""
    return torch.cat([s_preferred, s_rejected]).mean() ** 2


# ---- degradations (detail pairs): pure tensor ops on (N, 3, H, W) in [0, 1] -------------

DEGRADATIONS: tuple[str, ...] = ("blur", "noise", "pixelate", "washout", "ghost")


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image ``sigma`` (N,) in pixels (replicate padding)."""
    n, r = x.shape[0], 4
    k = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).view(n, 1, 1, 1, -1)
    xp = F.pad(x, (r, r, 0, 0), mode="replicate")
    xh = sum(kern[..., i] * xp[..., i:i + x.shape[3]] for i in range(2 * r + 1))
    xp = F.pad(xh, (0, 0, r, r), mode="replicate")
    return sum(kern[..., i] * xp[..., i:i + x.shape[2], :] for i in range(2 * r + 1))


def degrade(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A clearly worse version of ``x`` that shows the same thing: ``kind`` in :data:`DEGRADATIONS`.
    Strengths are drawn from ``gen``, well beyond the evaluator's training augmentation."""
    n = x.shape[0]
    u = torch.rand(n, generator=gen).to(x)
    if kind == "blur":
        return gaussian_blur(x, 0.9 + 1.1 * u)
    if kind == "noise":
        sigma = (0.06 + 0.14 * u).view(n, 1, 1, 1)
        return (x + sigma * torch.randn(x.shape, generator=gen).to(x)).clamp(0, 1)
    if kind == "pixelate":
        f = 2 if torch.rand((), generator=gen) < 0.5 else 4
        return F.interpolate(F.avg_pool2d(x, f), scale_factor=f, mode="nearest")
    if kind == "washout":
        a = (0.25 + 0.35 * u).view(n, 1, 1, 1)
        grey = x.mean(1, keepdim=True)
        target = 0.5 * grey + 0.5 * grey.mean((2, 3), keepdim=True)
        return target + a * (x - target)
    if kind == "ghost":
        a = (0.3 + 0.2 * u).view(n, 1, 1, 1)
        dx, dy = (int(v) * (1 if torch.rand((), generator=gen) < 0.5 else -1)
                  for v in torch.randint(2, 6, (2,), generator=gen))
        return (1 - a) * x + a * torch.roll(x, (dy, dx), (2, 3))
    raise ValueError(f"unknown degradation '{kind}' (one of {', '.join(DEGRADATIONS)})")


def pairwise_accuracy(s_preferred: torch.Tensor, s_rejected: torch.Tensor) -> float:
    """Fraction of pairs ranked right (ties count half)."""
    d = s_preferred - s_rejected
    return ((d > 0).float() + 0.5 * (d == 0).float()).mean().item()


# ---- MPS (Kwai-Kolors) -----------------------------------------------------------------

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


def clip_preprocess(images: torch.Tensor, size: int, mean: tuple[float, ...] = CLIP_MEAN,
                    std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """CLIPImageProcessor as differentiable tensor ops: bicubic resize of the short side to
    ``size``, centre crop, mean/std normalisation. Images (N, 3, H, W) in [0, 1]."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=scale < 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


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
        pixels = clip_preprocess(images, self.model.config.vision_config.image_size).to(dtype)
        return self(pixels.to(dev), ids.to(dev), cond.to(dev)).float()
