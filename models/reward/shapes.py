"""The shapes world's reward model (:class:`ShapesReward`), trained by the ``reward`` stage."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.reward.scorer import CONDITIONS, tokenize

SPP_GRIDS = (1, 2, 4)  # spatial-pyramid pooling of the image features: what is where, at three scales


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
