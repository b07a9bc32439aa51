"""Stage `evaluator`: attribute classifiers on pixels, the independent judge (never used for training).

Trained on renders of every split (held-out prompts are held out of the *generators'*
training; the judge must know every attribute combination), with mild blur/noise/colour augmentation so that
it judges attributes rather than sharpness (sharpness is the Fréchet
distance's job). Its accuracy is reported on held-out (eval and
compositional) renders.
"""
from __future__ import annotations

import json
import logging

import torch
import torch.nn.functional as F

from models.evaluator import AttributeNet, applicable, attribute_correct, classification_loss
from tlcm.core import distributed as D
from tlcm.shapes import render as R
from tlcm.shapes import world as W
from tlcm.core.identity import checkpointer
from tlcm.core.params import Params
from tlcm.core.paths import Paths
from tlcm.core.storage import ArtifactError, atomic_dir, atomic_write_json, load_tensors, save_tensors
from tlcm.core.training import cosine_warmup, ensure_finite, optimizer_step, run_loop, step_generator

log = logging.getLogger("tlcm")


def labels_tensor(specs: list[W.Spec]) -> dict[str, torch.Tensor]:
    """The prompted labels (what the caption says) per head."""
    rows = [W.label_indices(s) for s in specs]
    return {k: torch.tensor([r[k] for r in rows]) for k in W.LABEL_SPACES}


def head_sizes() -> dict[str, int]:
    """Prompted heads (alignment) and nuisance heads (what the render drew where the caption is silent)."""
    return {k: len(v) for k, v in W.LABEL_SPACES.items()} | dict(R.NUISANCE_SPACES)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random Gaussian blur (σ ≤ 0.7 px), pixel noise and a small colour shift."""
    n = x.shape[0]
    sigma = torch.rand(n, generator=gen) * 0.7
    k = torch.arange(-2, 3, dtype=torch.float32)
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # (n, 5)
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    xh = sum(kern[:, i].view(n, 1, 1, 1) * xp[:, :, 2:-2, i:i + x.shape[3]] for i in range(5))
    xp = F.pad(xh, (0, 0, 2, 2), mode="replicate")
    xv = sum(kern[:, i].view(n, 1, 1, 1) * xp[:, :, i:i + x.shape[2], :] for i in range(5))
    noise = torch.randn(x.shape, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) * 0.04)
    shift = (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.06
    return (xv + noise + shift).clamp(0, 1)


def build(params: Params) -> AttributeNet:
    return AttributeNet(head_sizes(), params.evaluator.width, image_size=params.world.image_size)


def load_evaluator(params: Params, paths: Paths) -> AttributeNet:
    net = build(params)
    net.load_state_dict(load_tensors(paths.evaluator / "model.safetensors", what="evaluator weights"))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(net: AttributeNet, images: torch.Tensor, specs: list[W.Spec], batch: int = 256) -> dict[str, float]:
    """Per-attribute-group and all-attribute accuracy of ``net`` on images (N, 3, H, W) in [0, 1]."""
    labels = labels_tensor(specs)
    correct: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(specs), batch):
        lg = net(images[i:i + batch])
        lab = {k: v[i:i + batch] for k, v in labels.items()}
        app = applicable(lab)
        for g, ok in attribute_correct(lg, lab).items():
            correct.setdefault(g, []).append(ok[app[g]])
    return {g: torch.cat(v).float().mean().item() for g, v in correct.items()}


@torch.no_grad()
def nuisance_accuracy(net: AttributeNet, images: torch.Tensor, labels: dict, batch: int = 256) -> dict[str, float]:
    """Accuracy of each nuisance head (where it applies) on renders with known nuisance labels."""
    logits = [net(images[i:i + batch]) for i in range(0, len(images), batch)]
    out = {}
    for k in R.NUISANCE_SPACES:
        pred, y = torch.cat([lg[k].argmax(-1) for lg in logits]), torch.as_tensor(labels[k])
        out[k] = float((pred == y)[y >= 0].float().mean())
    return out


@torch.no_grad()
def aligned(net: AttributeNet, images: torch.Tensor, specs: list[W.Spec], batch: int = 256) -> torch.Tensor:
    """Per image: True when every prompted attribute of its spec is recognised (the alignment criterion)."""
    labels = labels_tensor(specs)
    return torch.cat([attribute_correct(net(images[i:i + batch]), {k: v[i:i + batch] for k, v in labels.items()})["all"]
                      for i in range(0, len(specs), batch)])


def mirror_swapped(net: AttributeNet, images: torch.Tensor, specs: list[W.Spec]) -> float:
    """Fraction of the images that fail their spec but match its mirror (:meth:`Spec.mirrored`):
    every attribute right but left/right or top/bottom exchanged (a *where* error, not a *what* one)."""
    ok = aligned(net, images, specs)
    return float((~ok & aligned(net, images, [s.mirrored() for s in specs])).float().mean())


def run(params: Params, paths: Paths) -> dict:
    p, wp = params.evaluator, params.world
    D.check_batch(p.batch_size, "evaluator.batch_size")
    torch.manual_seed(p.seed)
    net = build(params).to(D.device())
    D.broadcast_from_main(net.parameters())
    opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=1e-4)

    def step_fn(step: int) -> dict[str, float]:
        for g in opt.param_groups:
            g["lr"] = p.lr * cosine_warmup(step, 100, p.steps, floor=0.02)
        # the GLOBAL batch (renders and augmentation) on every process; this process's shard
        specs, imgs, nuisance = R.train_scenes(p.seed, step, p.batch_size, wp.two_object_frac, wp.image_size, split=None)
        x = augment(R.to_unit_tensor(imgs), step_generator(p.seed, step))
        labels = labels_tensor(specs) | {k: torch.from_numpy(v) for k, v in nuisance.items()}
        counts = {k: float((y >= 0).sum()) / D.world_size() for k, y in labels.items()}
        terms = classification_loss(net(D.shard(x).to(D.device())), {k: D.shard(y).to(D.device())
                                                                      for k, y in labels.items()}, counts)
        ensure_finite(terms, "evaluator", step)
        optimizer_step(opt, sum(terms.values()), net.parameters(), max_norm=None)
        return {"ce": sum(v.item() for v in terms.values())}

    ckpt = checkpointer("evaluator", params, paths)
    res = run_loop("evaluator", p.steps, step_fn, {"net": net, "opt": opt}, ckpt, p.checkpoint_every,
                   max_minutes=p.max_minutes)
    net.eval().to("cpu")
    metrics: dict = {"steps": res.steps_done, "train_seconds": res.seconds, "world_size": D.world_size()}
    for split in ("eval", "compositional"):  # fresh renders (other seeds than training's) of held-out prompts
        specs = W.sample_specs(p.seed + 7, p.n_test, split, wp.two_object_frac)
        imgs, nuisance = R.render_scenes(specs, p.seed + 7, wp.image_size)
        imgs = R.to_unit_tensor(imgs)
        metrics[f"accuracy_{split}"] = accuracy(net, imgs, specs)
        metrics[f"nuisance_accuracy_{split}"] = nuisance_accuracy(net, imgs, nuisance)
    if D.is_main():
        with atomic_dir(paths.evaluator) as out:
            save_tensors(out / "model.safetensors", net.state_dict())
            (out / "config.json").write_text(json.dumps({"width": p.width, "label_spaces": W.LABEL_SPACES,
                                                         "nuisance_spaces": R.NUISANCE_SPACES}, indent=2))
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        atomic_write_json(paths.metrics / "evaluator.json", metrics)
        log.info("evaluator: all-attribute accuracy on held-out renders %.4f (compositional %.4f)",
                 metrics["accuracy_eval"]["all"], metrics["accuracy_compositional"]["all"])
    D.barrier()
    return metrics


def require(paths: Paths) -> None:
    if not (paths.evaluator / "model.safetensors").is_file():
        raise ArtifactError(f"evaluator not found in {paths.evaluator}; run `tlcm stage evaluator` first")
