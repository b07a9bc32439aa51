"""Stage `reward`: the shapes world's reward model with the MPS interface (DESIGN §3).

Trained with a Bradley–Terry loss −log σ(s_w − s_l) (plus a small centring term that puts
the preferred/rejected boundary at 0) on synthetic preference pairs made on the fly, a pure
function of (seed, step):

* ``detail``: preferred = a clean render of the prompt's spec, rejected = the same render
  degraded (blur, noise, pixelation, colour wash-out, ghosting);
* ``alignment``: one attribute of the spec changed (colour, shape, size, position/relation,
  background); rejected = a render of the changed spec under the prompt (image side) or the
  clean render under the changed spec's caption (text side, what Eq. 11's c_neg needs);
* ``overall``: either kind.

Training pairs use "train" specs (and only "train" changed specs); the held-out pairwise
accuracy is measured on "eval" and "compositional" specs. ``margin_auto`` (per condition)
is the mean score of clean aligned renders of held-out prompts: the `mps` stage's s0.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from models.reward.losses import (DEGRADATIONS, bradley_terry_loss, centering_loss, degrade, listwise_loss,
                                  pairwise_accuracy)
from models.reward.scorer import CONDITIONS, tokenize
from models.reward.shapes import ShapesReward
from tlcm.core import distributed as D
from tlcm.shapes import render as R
from tlcm.shapes import world as W
from tlcm.core.identity import checkpointer
from tlcm.core.params import Params
from tlcm.core.paths import Paths
from tlcm.loaders.reward_io import TRAIN_HINT, check_mps_source, load_reward, load_tokenizer, save_shapes_reward  # noqa: F401
from tlcm.core.seeds import mix_seed
from tlcm.core.storage import ArtifactError, atomic_dir, atomic_write_json
from tlcm.core.training import cosine_warmup, ensure_finite, optimizer_step, run_loop, step_generator

log = logging.getLogger("tlcm")

CENTERING_WEIGHT = 0.01
TEXT_NEGATIVES = 3  # one-attribute-off captions per training image in the listwise term
ALIGNMENT_CONDITIONS = [CONDITIONS.index("overall"), CONDITIONS.index("alignment")]


def _recoloured_or_reshaped(spec: W.Spec, field: str, values) -> list[W.Spec]:
    """Every spec with one object's ``field`` (colour or shape) changed, no two objects looking the same."""
    objs, out = spec.objects, []
    for i, o in enumerate(objs):
        for v in values:
            new = replace(o, **{field: v})
            others = [(q.colour, q.shape) for j, q in enumerate(objs) if j != i]
            if v != getattr(o, field) and (new.colour, new.shape) not in others:
                out.append(replace(spec, objects=objs[:i] + (new,) + objs[i + 1:]))
    return out


def _resized(spec: W.Spec) -> list[W.Spec]:
    """A one-object spec with the other size (two-object captions name no size)."""
    objs = spec.objects
    if len(objs) != 1:
        return []
    return [replace(spec, objects=(replace(objs[0], size=s),)) for s in ("small", "large") if s != objs[0].size]


def _moved(spec: W.Spec) -> list[W.Spec]:
    """Another position (one object) or another relation (two objects)."""
    if len(spec.objects) == 1:
        return [replace(spec, position=p) for p in W.POSITIONS if p != spec.position]
    return [replace(spec, relation=r) for r in W.RELATIONS if r != spec.relation]


# what an alignment pair changes -> every spec that differs from a spec in exactly that
ALTERNATIVES: dict[str, Callable[[W.Spec], list[W.Spec]]] = {
    "colour": lambda spec: _recoloured_or_reshaped(spec, "colour", tuple(W.COLOURS)),
    "shape": lambda spec: _recoloured_or_reshaped(spec, "shape", W.SHAPES),
    "size": _resized,
    "position": _moved,
    "background": lambda spec: [replace(spec, bg=b) for b in W.BACKGROUNDS if b != spec.bg],
}
ALIGNMENT_KINDS: tuple[str, ...] = tuple(ALTERNATIVES)


def alternatives(spec: W.Spec, kind: str) -> list[W.Spec]:
    """Every spec that differs from ``spec`` in exactly one attribute of ``kind`` (:data:`ALTERNATIVES`; a valid
    spec of the grammar: two objects never look the same)."""
    return ALTERNATIVES[kind](spec)


def misalign(spec: W.Spec, rng: np.random.Generator, train_only: bool) -> tuple[str, W.Spec]:
    """One attribute changed at random (kind uniform over the kinds that apply); with
    ``train_only`` the changed spec is itself a training spec (held-out combinations stay unseen)."""
    options = {k: [s for s in alternatives(spec, k) if not train_only or s.split() == "train"] for k in ALIGNMENT_KINDS}
    kinds = [k for k in ALIGNMENT_KINDS if options[k]]
    if not kinds:  # no training spec is one attribute away: fall back to any spec
        return misalign(spec, rng, train_only=False)
    kind = kinds[rng.integers(len(kinds))]
    return kind, options[kind][rng.integers(len(options[kind]))]


@dataclass
class Pairs:
    """Preference pairs: (preferred image, prompt) over (rejected image, prompt), under a condition."""

    preferred: torch.Tensor
    rejected: torch.Tensor
    prompts_w: list[str]
    prompts_l: list[str]
    conditions: torch.Tensor  # (N,) indices into CONDITIONS
    kinds: list[str]  # "blur", ..., "colour/image", "colour/text", ...
    specs: list[W.Spec]  # what the preferred images show

    def __len__(self) -> int:
        return len(self.kinds)

    def part(self, a: int, b: int) -> Pairs:
        return Pairs(self.preferred[a:b], self.rejected[a:b], self.prompts_w[a:b], self.prompts_l[a:b],
                     self.conditions[a:b], self.kinds[a:b], self.specs[a:b])

    @staticmethod
    def concat(parts: list[Pairs]) -> Pairs:
        return Pairs(torch.cat([q.preferred for q in parts]), torch.cat([q.rejected for q in parts]),
                     sum((q.prompts_w for q in parts), []), sum((q.prompts_l for q in parts), []),
                     torch.cat([q.conditions for q in parts]), sum((q.kinds for q in parts), []),
                     sum((q.specs for q in parts), []))


def make_pairs(seed: int, n: int, split: W.Split, two_object_frac: float, size: int,
               conditions: list[int] | None = None) -> Pairs:
    """``n`` pairs on specs of ``split``, a pure function of ``seed``. Conditions are drawn
    uniformly unless given; an ``overall`` pair is a detail or an alignment pair (even odds)."""
    rng = np.random.default_rng([seed, 17])
    gen = step_generator(seed, 17)
    specs = W.sample_specs(seed, n, split, two_object_frac)
    clean = R.to_unit_tensor(R.render_batch(specs, seed, size))
    conds = conditions if conditions is not None else [int(c) for c in rng.integers(len(CONDITIONS), size=n)]
    rejected, prompts_l, kinds, to_render = clean.clone(), [s.caption() for s in specs], [""] * n, []
    for i, (spec, c) in enumerate(zip(specs, conds)):
        detail = CONDITIONS[c] == "detail" or (CONDITIONS[c] == "overall" and rng.random() < 0.5)
        if detail:
            kinds[i] = DEGRADATIONS[rng.integers(len(DEGRADATIONS))]
            continue
        kind, wrong = misalign(spec, rng, train_only=split == "train")
        if rng.random() < 0.5:
            kinds[i] = f"{kind}/image"
            to_render.append((i, wrong))
        else:
            kinds[i], prompts_l[i] = f"{kind}/text", wrong.caption()
    if to_render:
        imgs = R.to_unit_tensor(R.render_batch([s for _, s in to_render], seed + 1, size))
        rejected[[i for i, _ in to_render]] = imgs
    for k in DEGRADATIONS:
        idx = [i for i, kd in enumerate(kinds) if kd == k]
        if idx:
            rejected[idx] = degrade(clean[idx], k, gen)
    return Pairs(clean, rejected, [s.caption() for s in specs], prompts_l, torch.tensor(conds), kinds, specs)


def text_negatives(specs: list[W.Spec], seed: int, k: int) -> list[str]:
    """Per spec, ``k`` captions one attribute away (training specs): ``len(specs) * k`` captions, spec-major."""
    rng = np.random.default_rng([seed, 29])
    return [misalign(spec, rng, train_only=True)[1].caption() for spec in specs for _ in range(k)]


def train_scores(net: ShapesReward, tok, pairs: Pairs, negatives: list[str], text_conditions: torch.Tensor
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Scores of the preferred and rejected side of ``pairs``, and text-side lists: per clean
    image (under ``text_conditions``, one per image), the scores of its own caption, of its
    ``negatives`` (one attribute off) and of the other images' captions (irrelevant prompts,
    Eq. 11's c_neg; −inf where a caption equals its own), shape (n, 1 + k + n − 1).
    Every image and caption is encoded once."""
    n, k = len(pairs), len(negatives) // len(pairs)
    # the listwise and centering terms couple the whole batch: on N processes each encodes its shard
    # of the 2n images and all gather the embeddings (with autograd), then every process computes the
    # whole batch's scores (the text side is small and encoded whole everywhere)
    dev = next(net.parameters()).device
    emb, quality = net.encode_images(D.shard(torch.cat([pairs.preferred, pairs.rejected])).to(dev))
    images = (D.all_gather_cat(emb), D.all_gather_cat(quality))
    ids, mask = tokenize(tok, pairs.prompts_w + pairs.prompts_l + negatives, net.config["max_length"])
    texts = net.encode_texts(ids.to(dev), mask.to(dev))
    i = torch.arange(n, device=dev)
    s = net.fuse(images, texts, torch.cat([i, i + n]), torch.cat([i, i + n]), pairs.conditions.to(dev).repeat(2))
    captions = torch.cat([i, 2 * n + torch.arange(n * k, device=dev)])  # own captions (all images), then negatives
    grid = net.fuse(images, texts, i.repeat_interleave(len(captions)), captions.repeat(n),
                    text_conditions.to(dev).repeat_interleave(len(captions))).view(n, len(captions))
    own_negatives = grid[:, n:].view(n, n, k)[i, i]
    same = torch.tensor([[a == b for b in pairs.prompts_w] for a in pairs.prompts_w], device=dev)
    others = grid[:, :n].masked_fill(same, float("-inf"))
    return s.chunk(2), torch.cat([grid[i, i][:, None], own_negatives, others], 1)


def build(params: Params, vocab_size: int) -> ShapesReward:
    """A fresh shapes-world reward model for ``params``."""
    p = params.reward
    return ShapesReward(vocab_size, params.teacher.text.max_length, p.width, params.world.image_size)


def pair_scores(net: ShapesReward, tok, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the preferred and the rejected side, one forward pass over both."""
    ids, mask = tokenize(tok, pairs.prompts_w + pairs.prompts_l, net.config["max_length"])
    s = net(torch.cat([pairs.preferred, pairs.rejected]), ids, mask, pairs.conditions.repeat(2))
    return s.chunk(2)


def validation_pairs(params: Params) -> Pairs:
    """Held-out pairs: half on "eval", half on "compositional" specs; conditions in turn."""
    p, wp = params.reward, params.world
    halves = [(p.n_val_pairs + 1) // 2, p.n_val_pairs // 2]
    parts = [make_pairs(p.seed + 7 + k, n, split, wp.two_object_frac, wp.image_size,
                        [i % len(CONDITIONS) for i in range(n)])
             for k, (split, n) in enumerate(zip(("eval", "compositional"), halves)) if n]
    return Pairs.concat(parts)


@torch.no_grad()
def evaluate(net: ShapesReward, tok, pairs: Pairs, batch: int = 256) -> dict:
    """Held-out pairwise accuracy per condition and over all pairs, by kind, and margin_auto."""
    net.eval()
    sw, sl, clean = [], [], {c: [] for c in CONDITIONS}
    for i in range(0, len(pairs), batch):
        part = pairs.part(i, i + batch)
        w, l_ = pair_scores(net, tok, part)
        sw.append(w), sl.append(l_)
        ids, mask = tokenize(tok, part.prompts_w, net.config["max_length"])
        for c in CONDITIONS:
            clean[c].append(net(part.preferred, ids, mask, net.condition_ids(c, len(part))))
    sw, sl = torch.cat(sw), torch.cat(sl)
    acc = {c: pairwise_accuracy(sw[pairs.conditions == k], sl[pairs.conditions == k])
           for k, c in enumerate(CONDITIONS) if (pairs.conditions == k).any()}
    acc["all"] = pairwise_accuracy(sw, sl)
    kinds = np.array(pairs.kinds)
    by_kind = {k: pairwise_accuracy(sw[torch.from_numpy(kinds == k)], sl[torch.from_numpy(kinds == k)])
               for k in sorted(set(pairs.kinds))}
    return {"accuracy": acc, "accuracy_by_kind": by_kind, "n_val_pairs": len(pairs),
            "margin_auto": {c: torch.cat(v).mean().item() for c, v in clean.items()},
            "mean_score_rejected": sl.mean().item()}


def run(params: Params, paths: Paths) -> dict:
    p, wp = params.reward, params.world
    if p.source.pretrained:  # a real MPS checkpoint: check it (cheaply), train nothing
        found = check_mps_source(p.source.location, p.trust_pickled)
        metrics = {"source": p.source.location, "found": found, "margin_auto": None}
        with atomic_dir(paths.reward) as out:  # the DVC out: a record of which checkpoint the stages use
            (out / "source.json").write_text(json.dumps(metrics, indent=2))
        atomic_write_json(paths.metrics / "reward.json", metrics)
        log.info("reward: reward.source = %s (%s); nothing to train", p.source, found)
        return metrics
    tok = load_tokenizer(paths.tokenizer, "world", "run `tlcm stage world` first")
    D.check_batch(p.batch_size, "reward.batch_size")
    torch.manual_seed(p.seed)
    net = build(params, len(tok)).to(D.device())
    D.broadcast_from_main(net.parameters())
    opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=1e-4)
    log.info("reward: %d weights, %d steps of %d pairs", sum(q.numel() for q in net.parameters()), p.steps,
             p.batch_size)

    def step_fn(step: int) -> dict[str, float]:
        for g in opt.param_groups:
            g["lr"] = p.lr * cosine_warmup(step, min(50, p.steps // 10 + 1), p.steps, floor=0.05)
        net.train()
        seed = mix_seed(p.seed, step)  # the data seed of the step (as render.train_batch)
        pairs = make_pairs(seed, p.batch_size, "train", wp.two_object_frac, wp.image_size)
        negatives = text_negatives(pairs.specs, seed, TEXT_NEGATIVES)
        text_conditions = torch.from_numpy(np.random.default_rng([seed, 31]).choice(ALIGNMENT_CONDITIONS, p.batch_size))
        (sw, sl), lists = train_scores(net, tok, pairs, negatives, text_conditions)
        terms = {"bt": bradley_terry_loss(sw, sl), "listwise": listwise_loss(lists),
                 "center": CENTERING_WEIGHT * centering_loss(sw, sl)}
        ensure_finite(terms, "reward", step)
        optimizer_step(opt, sum(terms.values()), net.parameters(), max_norm=None)  # the whole batch's loss on
        # every process (see train_scores): averaging leaves its gradient as it is
        return {k: v.item() for k, v in terms.items()} | {"acc": pairwise_accuracy(sw.detach(), sl.detach())}

    ckpt = checkpointer("reward", params, paths)
    res = run_loop("reward", p.steps, step_fn, {"net": net, "opt": opt}, ckpt, p.checkpoint_every,
                   log_every=max(1, min(50, p.steps // 4)), max_minutes=p.max_minutes)
    net.to("cpu")
    metrics = {"steps": res.steps_done, "train_seconds": res.seconds, "world_size": D.world_size(),
               **evaluate(net, tok, validation_pairs(params))}
    if D.is_main():
        with atomic_dir(paths.reward) as out:
            save_shapes_reward(net, out, paths.tokenizer, {"conditions": list(CONDITIONS),
                                                           "margin_auto": metrics["margin_auto"]})
        atomic_write_json(paths.metrics / "reward.json", metrics)
    D.barrier()
    acc = metrics["accuracy"]
    log.info("reward: held-out pairwise accuracy %.4f (overall %.4f, alignment %.4f, detail %.4f); margin_auto %s",
             acc["all"], acc.get("overall", float("nan")), acc.get("alignment", float("nan")),
             acc.get("detail", float("nan")), {k: round(v, 3) for k, v in metrics["margin_auto"].items()})
    return metrics


def require(paths: Paths) -> None:
    """Stop with what to do when the trained reward model is missing."""
    if not (paths.reward / "model.safetensors").is_file():
        raise ArtifactError(f"reward model not found in {paths.reward}; {TRAIN_HINT}")
