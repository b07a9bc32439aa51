"""Save the teacher stage's latest checkpoint (its EMA weights) as a pipeline folder, while it trains.

    python experiments/teacher_snapshot.py --artifacts artifacts --out /tmp/teacher_at_N

Lets the benchmark (reference + training-free baselines) run on a teacher before its training ends:
point a scratch artifacts folder's ``teacher`` at ``--out`` and run ``tlcm stage evaluate`` there.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from models.caption_head import CaptionHead
from tasks.teacher import build_pipeline
from tlcm.shapes import world as W
from tlcm.core.params import load_params
from tlcm.core.paths import Paths
from tlcm.core.identity import checkpointer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    params, paths = load_params(a.params, a.preset), Paths(Path(a.artifacts))
    p = params.teacher
    pipe = build_pipeline(params, paths)
    trainable = [*pipe.unet.parameters(), *pipe.text_encoder.parameters(), *pipe.text_encoder_2.parameters()]
    if p.parse_weight > 0:
        head = CaptionHead(pipe.unet.config.cross_attention_dim, pipe.text_encoder_2.config.projection_dim,
                           {k: len(v) for k, v in W.LABEL_SPACES.items()})
        trainable += list(head.parameters())
    found = checkpointer("teacher", params, paths).load_latest()  # the checkpoints of the current run identity
    if found is None:
        raise SystemExit("no teacher checkpoint of this run identity (params, inputs, code)")
    step, state = found
    ema = EMAModel(trainable, decay=p.ema_decay)
    ema.load_state_dict(state["ema"])
    ema.copy_to(trainable)
    pipe.save_pretrained(a.out, safe_serialization=True)
    print(f"teacher EMA at step {step} -> {a.out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
