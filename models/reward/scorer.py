"""What every reward model offers (the MPS interface) and what its callers share: the conditions a
score is asked for, and tokenising prompts to a fixed length."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

CONDITIONS: tuple[str, ...] = ("overall", "alignment", "detail")


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
