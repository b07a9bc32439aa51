"""Stage `bapps`: the 2AFC triplets the latent LPIPS learns from (TLCM §4.3; BAPPS, Zhang et al. 2018).

``bapps.source: synthetic`` (default) writes a shapes-world BAPPS in the real
BAPPS layout to ``<artifacts>/bapps`` (see :mod:`tlcm.shapes.synthetic_bapps`); any other value
is the root of a real BAPPS copy, whose 2AFC layout is checked (nothing is
copied).
"""
from __future__ import annotations

import logging
import time

from tlcm.loaders.bapps_io import SPLITS, bapps_root, summarize
from tlcm.core.params import Params
from tlcm.core.paths import Paths
from tlcm.core.storage import atomic_write_json
from tlcm.shapes.synthetic_bapps import SYNTHETIC_SET, write_synthetic

log = logging.getLogger("tlcm")


def run(params: Params, paths: Paths) -> dict:
    bp = params.bapps
    root = bapps_root(params, paths)
    t0 = time.monotonic()
    if bp.source == "synthetic":
        summary = write_synthetic(root, bp, params.world)
        counts = {s: {SYNTHETIC_SET: summary[s]["triplets"]} for s in SPLITS}
    else:
        counts = summarize(root)
        summary = {"sets": sorted({n for c in counts.values() for n in c})}
    metrics = {
        "source": bp.source,
        "root": str(root),
        "triplets": counts,
        "n_train": sum(counts["train"].values()),
        "n_val": sum(counts["val"].values()),
        "seconds": time.monotonic() - t0,
        **{k: v for k, v in summary.items() if k not in counts},
    }
    atomic_write_json(paths.metrics / "bapps.json", metrics)
    log.info("bapps: %d train / %d val 2AFC triplets (%s) in %s", metrics["n_train"], metrics["n_val"], bp.source, root)
    return metrics
