"""Stage `lcm_baseline`: the comparison row: data-free LCD over the whole range in one segment
(the paper's L_lcd-s ablation; an LCM-LoRA trained with the same loop, LoRA, batches and budget as `mlcd`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.distill import distill
from tasks.mlcd import batches
from tlcm.core.paths import Paths

if TYPE_CHECKING:  # the params classes need pydantic; these modules run without it (tlcm check-gpu)
    from tlcm.core.params import Params


def run(params: Params, paths: Paths) -> dict:
    if params.lcm_baseline.num_segments != 1:
        raise ValueError("lcm_baseline.num_segments must be 1 (one segment over [0, T] is what makes it LCD)")
    return distill(params, paths, "lcm_baseline", batches, init_from=None)
