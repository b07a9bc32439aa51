"""Stage `world`: the shapes world's tokenizer and prompt sets (train / eval / compositional)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tlcm.shapes import world as W
from tlcm.core.params import Params
from tlcm.core.paths import Paths
from tlcm.core.storage import atomic_dir
from tlcm.shapes.tokenizer import write_tokenizer
from tlcm.loaders.world_io import read_prompts, spec_to_json  # noqa: F401 - read_prompts: tasks.evaluate/distill import it here

log = logging.getLogger("tlcm")


def run(params: Params, paths: Paths) -> dict:
    p = params.world
    sizes = {"train": p.n_train_prompts, "eval": p.n_eval_prompts, "compositional": p.n_compositional_prompts}
    with atomic_dir(paths.world) as out:
        tok = write_tokenizer(W.words(), out / "tokenizer", params.teacher.text.max_length)
        for split, n in sizes.items():
            specs = W.sample_specs(p.seed, n, split, p.two_object_frac)
            Path(out / f"prompts_{split}.jsonl").write_text("".join(json.dumps(spec_to_json(s)) + "\n" for s in specs))
        summary = {
            "vocab_size": len(tok), "words": W.words(), "prompts": sizes,
            "heldout_pairs": sorted(map(list, W.HELDOUT_PAIRS)), "label_spaces": W.LABEL_SPACES,
        }
        (out / "world.json").write_text(json.dumps(summary, indent=2))
    log.info("world: %d words, prompts %s -> %s", len(W.words()), sizes, paths.world)
    return {"vocab_size": len(tok), **{f"n_{k}": v for k, v in sizes.items()}}
