"""A training-only caption-parsing head on the teacher's text conditioning.

The shapes-world teacher trains its CLIP text encoders from nothing, jointly with
the UNet. Linear probes on the trained encoders (``experiments/text_binding.py``)
showed they learn a bag of words: the last token knows both objects' colours but
not which one is left (slot a), so "a red circle left of a blue square" and "a blue
square left of a red circle" condition the UNet almost alike. Real SDXL gets its
encoders pretrained (CLIP); the stand-in here is an auxiliary loss: linear heads
read the label of every canonical slot (the world's ``LABEL_SPACES``: layout,
background, slot a/b colour and shape, size) from what the UNet is given, i.e.
the last token of the per-token embeddings (it attends to the whole caption under
CLIP's causal mask) and the pooled embedding. The head is discarded after training;
the saved pipeline is unchanged in shape.
"""
from __future__ import annotations

import torch
from torch import nn


class CaptionHead(nn.Module):
    """(prompt_embeds (N, L, D), pooled (N, P)) → logits per label space."""

    def __init__(self, embed_dim: int, pooled_dim: int, head_sizes: dict[str, int]):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(embed_dim + pooled_dim, n) for k, n in head_sizes.items()})

    def forward(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.cat([prompt_embeds[:, -1], pooled], dim=-1)
        return {k: head(x) for k, head in self.heads.items()}
