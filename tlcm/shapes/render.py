"""The shapes world's renderer: a spec (what the caption says) → an RGB image, plus what the caption leaves open.

A caption fixes the objects' colour, shape and size, where they are (roughly) and the background
colour. It leaves open much of the picture, as a real prompt does (DESIGN §6, "the strongest
baseline is a sampler"): every render draws, from its own generator,

* each object's **orientation** (one of two, a half symmetry period apart: square or diamond, "+" or
  "×", triangle pointing up or down; ±5° jitter), exact **placement** (wide ranges inside the spoken
  region) and radius jitter;
* a **background texture** over the spoken colour (a gradient, wide stripes, a soft spot or a
  checker, each at a random angle/phase/place);
* 0-3 unmentioned grey **distractor** specks at random places.

So the mean image of a caption (what a denoiser's x̂_0 is at high noise) is a blur: the two
orientations average to a rounded blob, the textures to flat colour, the specks to nothing, the
placements to a smear. Samplers that stop early show that blur; the evaluator's nuisance heads
(:data:`NUISANCE_SPACES`) make its Fréchet features see it.

Vectorised: per-image parameters come from ``np.random.default_rng([seed, i])`` (image i depends
only on (seed, i, spec)); pixels are computed for the whole batch with torch on a 3× supersampled
grid (anti-aliased edges) and box-filtered down.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from tlcm.core.seeds import mix_seed
from tlcm.shapes.world import BACKGROUNDS, COLOURS, Spec, Split, sample_specs

SS = 3  # supersampling factor
TEXTURES = ("gradient", "stripes", "spot", "checks")
MAX_DISTRACTORS = 3
SYMMETRY = {"square": 90.0, "cross": 90.0, "triangle": 120.0, "circle": 0.0}  # degrees; circles have no orientation
NUISANCE_SPACES: dict[str, int] = {  # unspoken labels the evaluator also learns (features, never alignment)
    "a_rot": 2, "b_rot": 2, "bg_texture": len(TEXTURES), "distractors": MAX_DISTRACTORS + 1,
}
_RADIUS = {"small": (5.5, 6.5), "large": (8.5, 10.5), "medium": (5.8, 6.8)}  # ≥ 5.5 px: a shape spans ≥ 3 latent
# pixels, so its two orientations survive the autoencoder (at 4-5 px its round trips judged shape 0.949)
_REGION = {  # single-object centre ranges (x, y) in canvas units per spoken position; disjoint after the
    "left": ((0.12, 0.32), (0.38, 0.62)), "right": ((0.68, 0.88), (0.38, 0.62)),  # radius clip, so the
    "top": ((0.38, 0.62), (0.12, 0.32)), "bottom": ((0.38, 0.62), (0.68, 0.88)),  # position is never
    "center": ((0.43, 0.57), (0.43, 0.57)),                                         # ambiguous
}
_SHAPE_ID = {"circle": 0, "square": 1, "triangle": 2, "cross": 3}


def _object_params(rng: np.random.Generator, shape: str, colour: str, cx: float, cy: float, r: float) -> dict:
    period = SYMMETRY[shape]
    turned = int(rng.integers(2)) if period else -1  # the orientation mode (-1: a circle has none)
    angle = (turned * period / 2 + rng.uniform(-5, 5)) if period else 0.0
    base = np.array(COLOURS[colour], float) + rng.normal(0, 8, 3)
    return {"shape": _SHAPE_ID[shape], "cx": cx, "cy": cy, "r": r, "angle": math.radians(angle),
            "rgb": np.clip(base, 0, 255), "rot_bin": turned}


def scene_params(spec: Spec, rng: np.random.Generator, size: int) -> dict:
    """Every number the render of ``spec`` needs, drawn from ``rng`` (the caption's unspoken freedom)."""
    u = float(size)
    objs = []
    if len(spec.objects) == 1:
        o = spec.objects[0]
        r = rng.uniform(*_RADIUS[o.size])
        (x0, x1), (y0, y1) = _REGION[spec.position]
        cx, cy = (float(np.clip(rng.uniform(lo, hi) * u, r + 0.5, u - r - 0.5)) for lo, hi in ((x0, x1), (y0, y1)))
        objs.append(_object_params(rng, o.shape, o.colour, cx, cy, r))
    else:
        first, second = spec.objects
        a, b = (first, second) if spec.relation in ("left of", "above") else (second, first)
        along = (rng.uniform(0.12, 0.30), rng.uniform(0.70, 0.88))  # along the relation: ≥ 0.4 apart
        mid = rng.uniform(0.32, 0.68)
        across = mid + rng.uniform(-0.1, 0.1, 2)  # across it: < 0.2 apart, so the relation is never ambiguous
        horizontal = spec.relation in ("left of", "right of")
        for o, p, q in ((a, along[0], across[0]), (b, along[1], across[1])):
            r = rng.uniform(*_RADIUS["medium"])
            cx, cy = (p * u, q * u) if horizontal else (q * u, p * u)
            objs.append(_object_params(rng, o.shape, o.colour, cx, cy, r))
    texture = int(rng.integers(len(TEXTURES)))
    n_dis = int(rng.choice(MAX_DISTRACTORS + 1, p=[0.4, 0.3, 0.2, 0.1]))
    specks = []
    while len(specks) < n_dis:
        x, y = rng.uniform(0.06, 0.94, 2) * u
        if all(math.hypot(x - o["cx"], y - o["cy"]) > o["r"] + 2.5 for o in objs):
            specks.append((x, y, rng.uniform(1.0, 1.5)))
    bg = np.array(BACKGROUNDS[spec.bg], float)
    speck_level = (70.0 if bg.mean() > 128 else 185.0) if spec.bg != "gray" else (60.0 if rng.random() < 0.5 else 200.0)
    return {"objects": objs, "texture": texture, "tex_angle": rng.uniform(0, 2 * math.pi),
            "tex_phase": rng.uniform(0, 2 * math.pi), "tex_period": rng.uniform(8.0, 12.0),
            "tex_amp": rng.uniform(10, 24) * (1 if rng.random() < 0.5 else -1),
            "tex_centre": rng.uniform(0.2, 0.8, 2) * u, "tex_sigma": rng.uniform(6.0, 10.0),
            "bg": bg, "specks": specks, "speck_level": speck_level}


def _rot(px: torch.Tensor, py: torch.Tensor, angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c, s = torch.cos(angle), torch.sin(angle)
    return c * px + s * py, -s * px + c * py


def _signed_distance(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels; < 0 inside) to circle / square / triangle / cross (``shape`` 0..3) in the
    object's own frame (u, v); exact inside the convex shapes, a bound outside (enough for edges)."""
    au, av = u.abs(), v.abs()
    circle = torch.sqrt(u * u + v * v) - r
    square = torch.maximum(au, av) - 0.85 * r
    tri = v - 0.8 * r  # base edge, then the two slanted edges of the triangle (0, -r), (±0.95r, 0.8r)
    for sx in (1.0, -1.0):
        nx, ny = 1.8, sx * -0.95  # normal of the edge from the apex to (sx·0.95r, 0.8r), outward
        n = math.hypot(nx, ny)
        tri = torch.maximum(tri, (sx * u * nx + (v + r) * ny * sx) / n)
    w = 0.36 * r
    cross = torch.minimum(torch.maximum(au - w, av - r), torch.maximum(au - r, av - w))
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, torch.where(shape == 2, tri, cross)))


def _stack(scenes: list[dict]) -> dict[str, torch.Tensor]:
    """Per-image parameters as (N, ...) tensors; objects padded to 2, specks to MAX_DISTRACTORS."""
    f = lambda xs: torch.tensor(np.asarray(xs, dtype=np.float64), dtype=torch.float32)  # noqa: E731
    obj = lambda key, pad: f([[o[key] for o in sc["objects"]] + [pad] * (2 - len(sc["objects"]))  # noqa: E731
                              for sc in scenes])
    specks = [sc["specks"] + [(-100.0, -100.0, 0.0)] * (MAX_DISTRACTORS - len(sc["specks"])) for sc in scenes]
    return {
        "bg": f([sc["bg"] for sc in scenes]), "texture": f([sc["texture"] for sc in scenes]),
        "tex_angle": f([sc["tex_angle"] for sc in scenes]), "tex_phase": f([sc["tex_phase"] for sc in scenes]),
        "tex_period": f([sc["tex_period"] for sc in scenes]), "tex_amp": f([sc["tex_amp"] for sc in scenes]),
        "tex_centre": f([sc["tex_centre"] for sc in scenes]), "tex_sigma": f([sc["tex_sigma"] for sc in scenes]),
        "specks": f(specks), "speck_level": f([sc["speck_level"] for sc in scenes]),
        "present": obj("r", 0.0) > 0, "shape": obj("shape", 0), "cx": obj("cx", -100.0), "cy": obj("cy", -100.0),
        "r": obj("r", 0.0), "angle": obj("angle", 0.0), "rgb": obj("rgb", [0.0] * 3),
    }


def _paint(p: dict[str, torch.Tensor], X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """The whole batch's (N, 3, S, S) float canvas; X, Y (S, S) are coordinates in output pixels."""
    e = lambda t: t.view(-1, 1, 1)  # noqa: E731  (N,) -> (N, 1, 1)
    half = X.shape[-1] / SS / 2
    u, v = _rot(X - half, Y - half, e(p["tex_angle"]))
    k, ph = 2 * math.pi / e(p["tex_period"]), e(p["tex_phase"])
    spot = torch.exp(-((X - e(p["tex_centre"][:, 0])) ** 2 + (Y - e(p["tex_centre"][:, 1])) ** 2)
                     / (2 * e(p["tex_sigma"]) ** 2)) * 1.4 - 0.2
    textures = torch.stack([(u / half).clamp(-1, 1), torch.tanh(2 * torch.sin(k * u + ph)) * 0.8, spot,
                            torch.tanh(3 * torch.sin(k * u + ph) * torch.sin(k * v)) * 0.6], 1)
    tex = textures.gather(1, p["texture"].long().view(-1, 1, 1, 1).expand(-1, 1, *X.shape)).squeeze(1)
    canvas = p["bg"].view(-1, 3, 1, 1) + (e(p["tex_amp"]) * tex).unsqueeze(1)
    for j in range(MAX_DISTRACTORS):
        x, y, r = (e(p["specks"][:, j, i]) for i in range(3))
        inside = (((X - x) ** 2 + (Y - y) ** 2) <= r * r).unsqueeze(1)
        canvas = torch.where(inside, p["speck_level"].view(-1, 1, 1, 1), canvas)
    for j in range(2):
        o = {k: v[:, j] for k, v in p.items() if v.ndim >= 2 and v.shape[1] == 2}
        du, dv = X - e(o["cx"]), Y - e(o["cy"])
        ou, ov = _rot(du, dv, e(o["angle"]))
        d = _signed_distance(e(o["shape"]), ou, ov, e(o["r"]))
        rgb = o["rgb"].view(-1, 3, 1, 1)
        hr = (0.16 * o["r"]).clamp(min=0.5)
        highlight = ((du + e(0.35 * o["r"])) ** 2 + (dv + e(0.35 * o["r"])) ** 2 <= e(hr) ** 2).unsqueeze(1)
        colour = torch.where(highlight, rgb + 70, rgb.expand(-1, -1, *X.shape))
        colour = torch.where((d > -1.0).unsqueeze(1), rgb * 0.55, colour)
        canvas = torch.where(((d <= 0) & e(o["present"])).unsqueeze(1), colour, canvas)
    return canvas


def render_scenes(specs: list[Spec], seed: int, size: int = 32) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(N, size, size, 3)`` uint8 renders and their nuisance labels (:data:`NUISANCE_SPACES`; -1 = n/a).
    Image i depends only on (seed, i, specs[i])."""
    scenes = [scene_params(s, np.random.default_rng([seed, i]), size) for i, s in enumerate(specs)]
    coords = (torch.arange(size * SS, dtype=torch.float32) + 0.5) / SS
    Y, X = torch.meshgrid(coords, coords, indexing="ij")
    with torch.no_grad():
        canvas = torch.cat([_paint(_stack(scenes[i:i + 64]), X, Y) for i in range(0, len(scenes), 64)]) \
            if scenes else torch.zeros(0, 3, size * SS, size * SS)
    img = F.avg_pool2d(canvas.clamp(0, 255), SS).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    labels = {k: np.full(len(specs), -1, dtype=np.int64) for k in NUISANCE_SPACES}
    for i, sc in enumerate(scenes):
        for slot, o in zip("ab", sc["objects"]):
            labels[f"{slot}_rot"][i] = o["rot_bin"]
        labels["bg_texture"][i], labels["distractors"][i] = sc["texture"], len(sc["specks"])
    return np.ascontiguousarray(img), labels


def render_batch(specs: list[Spec], seed: int, size: int = 32) -> np.ndarray:
    """``(N, size, size, 3)`` uint8; image i depends only on (seed, i, specs[i])."""
    return render_scenes(specs, seed, size)[0]


def render(spec: Spec, seed: int, size: int = 32) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 render (image 0 of ``seed``)."""
    return render_batch([spec], seed, size)[0]


def train_scenes(seed: int, step: int, n: int, two_object_frac: float = 0.5, size: int = 32,
                 split: Split | None = "train") -> tuple[list[Spec], np.ndarray, dict[str, np.ndarray]]:
    """Training data for ``step``: specs of ``split`` (generators: "train" only), renders and nuisance
    labels, a pure function of (seed, step)."""
    s = mix_seed(seed, step)  # renders and specs are a pure function of it
    specs = sample_specs(s, n, split, two_object_frac)
    return (specs, *render_scenes(specs, s, size))


def train_batch(seed: int, step: int, n: int, two_object_frac: float = 0.5, size: int = 32,
                split: Split | None = "train") -> tuple[list[Spec], np.ndarray]:
    """(specs, renders) of :func:`train_scenes`."""
    specs, imgs, _ = train_scenes(seed, step, n, two_object_frac, size, split)
    return specs, imgs


def to_unit_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float tensor (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
