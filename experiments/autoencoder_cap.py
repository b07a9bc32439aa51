"""The alignment a teacher of an autoencoder can reach at most: the evaluator on held-out renders and on their
autoencoder round trips (encode → mean latent → decode).

    python experiments/autoencoder_cap.py --autoencoder artifacts/autoencoder --prompts 512
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from tasks.evaluator import accuracy, load_evaluator
from tlcm.core.params import load_params
from tlcm.core.paths import Paths
from tlcm.loaders.world_io import read_prompts
from tlcm.shapes import render as R


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--autoencoder", required=True, help="an AutoencoderKL folder (artifacts/autoencoder, <teacher>/vae)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--artifacts", default="artifacts", help="holds world/ (the prompts) and evaluator/")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--seed", type=int, default=11, help="render seed")
    a = ap.parse_args()
    params, paths = load_params(a.params), Paths(Path(a.artifacts))
    net, specs = load_evaluator(params, paths), read_prompts(paths, "eval")[: a.prompts]
    x = R.to_unit_tensor(R.render_batch(specs, a.seed, params.world.image_size))
    vae = AutoencoderKL.from_pretrained(a.autoencoder).eval()
    rec = torch.cat([vae.decode(vae.encode(x[i:i + 64] * 2 - 1).latent_dist.mean).sample for i in range(0, len(x), 64)])
    print(json.dumps({"autoencoder": a.autoencoder, "prompts": len(specs), "renders": accuracy(net, x, specs),
                      "round_trips": accuracy(net, ((rec + 1) / 2).clamp(0, 1), specs)}))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
