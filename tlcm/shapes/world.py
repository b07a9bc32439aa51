"""The shapes world: a small, fully synthetic text-to-image world (DESIGN §3).

Pure and deterministic: a *spec* (what the caption says) is sampled from a
seeded generator and turned into a caption by a small grammar; :mod:`tlcm.shapes.render`
turns it into an RGB image, drawing what the caption leaves open (rotation, fill,
texture, exact placement, distractors). Nothing here reads or writes files.

Captions
    one object:  "a large red circle on the left on a gray background"
    two objects: "a red circle left of a blue square on a white background"

Canonical labels (what the evaluator predicts from pixels)
    layout:  left, right, top, bottom, center (one object) or
             horizontal, vertical (two objects)
    slot a:  the left (horizontal) or top (vertical) object, or the only one
    slot b:  the right / bottom object (two objects only)
    each slot has colour, shape and size; ``bg`` is the background colour.

Held out of all training:
    * every caption that contains one of ``HELDOUT_PAIRS`` (compositional split);
    * every spec whose stable hash falls in the eval bucket (caption split).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 230),
    "yellow": (240, 215, 30),
    "purple": (148, 60, 200),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large", "medium")  # "medium" is the (unspoken) size of two-object scenes
POSITIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 30),
    "gray": (128, 128, 128),
    "white": (235, 235, 230),
}
LAYOUTS = POSITIONS + ("horizontal", "vertical")
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
MIRROR = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "center",
          "left of": "right of", "right of": "left of", "above": "below", "below": "above"}
HELDOUT_PAIRS = frozenset({("purple", "triangle"), ("green", "cross"), ("orange", "circle")})
EVAL_BUCKETS = 10  # one spec in ten (by stable hash) never appears in training

Split = Literal["train", "eval", "compositional"]


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str


@dataclass(frozen=True)
class Spec:
    """What a picture shows. ``relation``/``position`` are as spoken in the caption."""

    objects: tuple[Obj, ...]
    bg: str
    position: str | None = None  # one object
    relation: str | None = None  # two objects: objects[0] <relation> objects[1]

    # ---- caption grammar -------------------------------------------------
    def caption(self) -> str:
        if len(self.objects) == 1:
            o = self.objects[0]
            return f"a {o.size} {o.colour} {o.shape} {POSITION_PHRASE[self.position]} on a {self.bg} background"
        a, b = self.objects
        return f"a {a.colour} {a.shape} {self.relation} a {b.colour} {b.shape} on a {self.bg} background"

    def mirrored(self) -> "Spec":
        """The caption's direction words exchanged (left ↔ right, top ↔ bottom, above ↔ below): a
        picture that matches the mirrored spec but not this one got *what* right and *where* wrong."""
        if len(self.objects) == 1:
            return replace(self, position=MIRROR[self.position])
        return replace(self, relation=MIRROR[self.relation])

    # ---- canonical labels --------------------------------------------------
    def canonical(self) -> dict[str, str | None]:
        """Labels in the evaluator's canonical frame (slot a = left/top object)."""
        if len(self.objects) == 1:
            a, b, layout = self.objects[0], None, self.position
        else:
            first, second = self.objects
            layout = "horizontal" if self.relation in ("left of", "right of") else "vertical"
            a, b = (first, second) if self.relation in ("left of", "above") else (second, first)
        return {
            "layout": layout,
            "bg": self.bg,
            "a_colour": a.colour,
            "a_shape": a.shape,
            "a_size": a.size,
            "b_colour": b.colour if b else None,
            "b_shape": b.shape if b else None,
        }

    def key(self) -> str:
        return "|".join(f"{k}={v}" for k, v in sorted(self.canonical().items()))

    def split(self) -> Split:
        if any((o.colour, o.shape) in HELDOUT_PAIRS for o in self.objects):
            return "compositional"
        bucket = int(hashlib.sha256(self.key().encode()).hexdigest(), 16) % EVAL_BUCKETS
        return "eval" if bucket == 0 else "train"


LABEL_SPACES: dict[str, tuple[str, ...]] = {
    "layout": LAYOUTS,
    "bg": tuple(BACKGROUNDS),
    "a_colour": tuple(COLOURS),
    "a_shape": SHAPES,
    "a_size": SIZES,
    "b_colour": tuple(COLOURS),
    "b_shape": SHAPES,
}


def label_indices(spec: Spec) -> dict[str, int]:
    """Class index per evaluator head; -1 where the head does not apply (no second object)."""
    return {k: (-1 if v is None else LABEL_SPACES[k].index(v)) for k, v in spec.canonical().items()}


def words() -> list[str]:
    """Every word the grammar can say (the tokenizer's vocabulary)."""
    text = " ".join(
        [Spec((Obj("red", "circle", s),), "gray", position=p).caption() for s in SIZES for p in POSITIONS]
        + list(RELATIONS)
        + list(COLOURS)
        + list(SHAPES)
        + list(BACKGROUNDS)
    )
    return sorted(set(text.split()))


def sample_spec(rng: np.random.Generator, two_object_frac: float = 0.5) -> Spec:
    colours, bgs = list(COLOURS), list(BACKGROUNDS)

    def obj(size: str) -> Obj:
        return Obj(colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))], size)

    bg = bgs[rng.integers(len(bgs))]
    if rng.random() < two_object_frac:
        a, b = obj("medium"), obj("medium")
        while (a.colour, a.shape) == (b.colour, b.shape):
            b = obj("medium")
        return Spec((a, b), bg, relation=RELATIONS[rng.integers(len(RELATIONS))])
    return Spec((obj(SIZES[rng.integers(2)]),), bg, position=POSITIONS[rng.integers(len(POSITIONS))])


def sample_specs(seed: int, n: int, split: Split | None, two_object_frac: float = 0.5) -> list[Spec]:
    """``n`` specs of one split (``None``: any), deterministic in ``seed`` (rejection sampling)."""
    rng = np.random.default_rng([seed, ("train", "eval", "compositional", None).index(split)])
    out: list[Spec] = []
    while len(out) < n:
        s = sample_spec(rng, two_object_frac)
        if split is None or s.split() == split:
            out.append(s)
    return out
