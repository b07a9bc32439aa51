"""Per-step seeds: every random draw of a training step is a pure function of (seed, step), so a
resumed or relaunched run (any number of processes) draws exactly what an uninterrupted one would."""
from __future__ import annotations

MULTIPLIER = 1_000_003  # a prime: distinct (seed, step) pairs of a run never share a seed


def mix_seed(seed: int, step: int, modulus: int = 2**32) -> int:
    """``(seed · 1_000_003 + step) mod modulus``: 2**32 for NumPy's generators (the default), 2**63 − 1 for torch's."""
    return (seed * MULTIPLIER + step) % modulus
