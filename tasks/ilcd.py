"""Stage `ilcd`: improved data-free LCD across the segment milestones (paper §4.2, Algorithm 2, Eq. 9–10).

Continues the LoRA that `mlcd` trained (one unified LoRA through all stages)."""
from __future__ import annotations

from tasks.distill import distill
from tlcm.params import Params
from tlcm.paths import Paths


def run(params: Params, paths: Paths) -> dict:
    return distill(params, paths, "ilcd", "ilcd", init_from="mlcd")
