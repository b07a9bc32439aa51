"""MPS preference optimisation (paper Eq. 11). Pure math; the scorer is passed in.

L_mps = max(s_0 − s(x̂_0, c_pos), 0) + max(s(x̂_0, c_neg), 0)

``c_pos`` is the prompt of the image, ``c_neg`` an irrelevant prompt. s_0 is a margin
on the scorer's own scale (MPS: 16).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mps_terms(s_pos: torch.Tensor, s_neg: torch.Tensor, s0: float) -> dict[str, torch.Tensor]:
    """Eq. 11 as named, unweighted terms (batch means): ``mps_pos`` + ``mps_neg`` = L_mps."""
    return {"mps_pos": F.relu(s0 - s_pos).mean(), "mps_neg": F.relu(s_neg).mean()}


def irrelevant_prompts(prompts: list[str], pool: list[str], gen: torch.Generator) -> list[str]:
    """c_neg: for each prompt, a prompt from ``pool`` that differs from it (deterministic with ``gen``)."""
    out = []
    for p in prompts:
        for _ in range(16):
            cand = pool[int(torch.randint(len(pool), (1,), generator=gen))]
            if cand != p:
                break
        out.append(cand)
    return out
