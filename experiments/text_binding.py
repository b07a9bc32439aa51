"""Does the teacher's text conditioning say *which object is where*? Linear probes on what the UNet is given.

For two-object captions ("a red circle left of a blue square ..."), a linear classifier is fit
on 10,000 captions and scored on 2,000 others, for: the first-mentioned object's colour (word
order only) and the canonical slots (slot a = the left/top object). A bag-of-words encoder
knows both colours but not which is left: its slot probes sit near 0.5-0.6 while the
first-object probe is near 1.0.
"""
import argparse

import torch
import torch.nn.functional as F

from models.denoiser import encode_prompts
from tlcm.shapes import world as W
from tlcm.loaders.teacher_io import load_teacher

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--teacher", default="artifacts/teacher")
ap.add_argument("--n", type=int, default=12000)
a = ap.parse_args()
torch.manual_seed(0)
pipe = load_teacher(a.teacher)
specs = W.sample_specs(0, a.n, None, two_object_frac=1.0)
with torch.no_grad():
    cond = encode_prompts(pipe, [s.caption() for s in specs])
feats = {"last token": cond.prompt_embeds[:, -1], "token mean": cond.prompt_embeds.mean(1), "pooled": cond.pooled}
targets = {"first colour": [s.objects[0].colour for s in specs],
           **{k: [s.canonical()[k] for s in specs] for k in ("a_colour", "a_shape", "b_colour", "b_shape")}}
n_tr = a.n - 2000


def probe(X: torch.Tensor, y: list[str]) -> float:
    X = (X - X[:n_tr].mean(0)) / (X[:n_tr].std(0) + 1e-5)
    classes = sorted(set(y))
    yi = torch.tensor([classes.index(v) for v in y])
    lin = torch.nn.Linear(X.shape[1], len(classes))
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(400):
        opt.zero_grad()
        F.cross_entropy(lin(X[:n_tr]), yi[:n_tr]).backward()
        opt.step()
    return (lin(X[n_tr:]).argmax(1) == yi[n_tr:]).float().mean().item()


print(f"held-out linear-probe accuracy, {a.teacher}")
print("| features | " + " | ".join(targets) + " |")
print("|---" * (len(targets) + 1) + "|")
for name, X in feats.items():
    print(f"| {name} | " + " | ".join(f"{probe(X.float(), y):.3f}" for y in targets.values()) + " |", flush=True)
