"""Stage `mlcd`: data-free multistep latent consistency distillation (paper §4.1, Algorithm 1, Eq. 7–8)."""
from __future__ import annotations

from tasks.distill import distill
from tlcm.params import Params
from tlcm.paths import Paths


def run(params: Params, paths: Paths) -> dict:
    return distill(params, paths, "mlcd", "mlcd", init_from=None)
