"""The before/after picture of the shapes world (README "The shapes world"): renders of the same
captions by the old renderer (commit fa79dbc, read from git) and the current one, and each caption's
mean over 256 renders, which is what a denoiser's x̂_0 at t = T − 1 approximates.

    python experiments/world_pictures.py --out docs/world_before_after.png
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tlcm.shapes import render as R
from tlcm.shapes import world as W

OLD_COMMIT = "fa79dbc"


def old_renderer():
    src = subprocess.run(["git", "show", f"{OLD_COMMIT}:tlcm/world.py"], capture_output=True, text=True, check=True).stdout
    f = Path(tempfile.mkdtemp()) / "world_fa79dbc.py"
    f.write_text(src)
    spec = importlib.util.spec_from_file_location("world_fa79dbc", f)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["world_fa79dbc"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/world_before_after.png")
    ap.add_argument("--n", type=int, default=6)
    a = ap.parse_args()
    old = old_renderer()
    specs = W.sample_specs(11, a.n, "eval")
    to_old = [old.Spec(tuple(old.Obj(o.colour, o.shape, o.size) for o in s.objects), s.bg, s.position, s.relation)
              for s in specs]
    rows = {
        "before: renders": np.concatenate([old.render_batch(to_old, 1), old.render_batch(to_old, 2)]),
        "before: caption mean": np.stack([old.render_batch([s] * 256, 3).astype(float).mean(0) for s in to_old]),
        "after: renders": np.concatenate([R.render_batch(specs, 1), R.render_batch(specs, 2)]),
        "after: caption mean": np.stack([R.render_batch([s] * 256, 3).astype(float).mean(0) for s in specs]),
    }
    scale, pad, label_w = 4, 4, 170
    side = 32 * scale
    width = label_w + 2 * a.n * (side + pad)
    canvas = Image.new("RGB", (width, len(rows) * (side + pad) + 20 + 14 * 0), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, imgs) in enumerate(rows.items()):
        y = r * (side + pad)
        draw.text((4, y + side // 2 - 6), label, fill="black")
        for i, im in enumerate(imgs.round().astype(np.uint8)):
            canvas.paste(Image.fromarray(im).resize((side, side), Image.Resampling.NEAREST), (label_w + i * (side + pad), y))
    draw.text((4, len(rows) * (side + pad) + 4), " | ".join(s.caption() for s in specs[:3]), fill="black")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(a.out)
    print(a.out)


if __name__ == "__main__":
    main()
