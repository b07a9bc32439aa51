"""Training the shapes-world reward model: Bradley–Terry / listwise losses, the centring term, the
image degradations of the detail pairs, and pairwise accuracy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(s_preferred: torch.Tensor, s_rejected: torch.Tensor) -> torch.Tensor:
    """Mean −log σ(s_w − s_l)."""
    return -F.logsigmoid(s_preferred - s_rejected).mean()


def listwise_loss(scores: torch.Tensor) -> torch.Tensor:
    """Plackett–Luce top-1 loss, rows = [preferred, rejected...]: mean −log softmax(row)[0]
    (Bradley–Terry when a row has one rejected item; −inf entries are left out)."""
    return F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))


def centering_loss(s_preferred: torch.Tensor, s_rejected: torch.Tensor) -> torch.Tensor:
    """(mean of all scores)²: BT fixes differences only; this puts the preferred/rejected
    boundary at 0, so that ``max(s(x, c_neg), 0)`` (TLCM Eq. 11) has a meaning."""
    return torch.cat([s_preferred, s_rejected]).mean() ** 2


# ---- degradations (detail pairs): pure tensor ops on (N, 3, H, W) in [0, 1] -------------

def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image ``sigma`` (N,) in pixels (replicate padding)."""
    n, r = x.shape[0], 4
    k = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).view(n, 1, 1, 1, -1)
    xp = F.pad(x, (r, r, 0, 0), mode="replicate")
    xh = sum(kern[..., i] * xp[..., i:i + x.shape[3]] for i in range(2 * r + 1))
    xp = F.pad(xh, (0, 0, r, r), mode="replicate")
    return sum(kern[..., i] * xp[..., i:i + x.shape[2], :] for i in range(2 * r + 1))


# Each degradation: (x (N, 3, H, W) in [0, 1], u ~ U[0, 1) per image (N,), gen) -> a clearly worse x; strengths well
# beyond the evaluator's training augmentation, further draws from ``gen``.

def blur(x: torch.Tensor, u: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gaussian blur, σ in [0.9, 2.0) px."""
    return gaussian_blur(x, 0.9 + 1.1 * u)


def noise(x: torch.Tensor, u: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise, σ in [0.06, 0.2), clamped to [0, 1]."""
    sigma = (0.06 + 0.14 * u).view(-1, 1, 1, 1)
    return (x + sigma * torch.randn(x.shape, generator=gen).to(x)).clamp(0, 1)


def pixelate(x: torch.Tensor, u: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Average-pool by 2 or 4 (one draw for the batch), then nearest upsampling."""
    f = 2 if torch.rand((), generator=gen) < 0.5 else 4
    return F.interpolate(F.avg_pool2d(x, f), scale_factor=f, mode="nearest")


def washout(x: torch.Tensor, u: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Colours pulled towards a flat grey (kept fraction in [0.25, 0.6))."""
    a = (0.25 + 0.35 * u).view(-1, 1, 1, 1)
    grey = x.mean(1, keepdim=True)
    target = 0.5 * grey + 0.5 * grey.mean((2, 3), keepdim=True)
    return target + a * (x - target)


def ghost(x: torch.Tensor, u: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A shifted copy blended in (weight in [0.3, 0.5), shift 2–5 px each way, one draw for the batch)."""
    a = (0.3 + 0.2 * u).view(-1, 1, 1, 1)
    dx, dy = (int(v) * (1 if torch.rand((), generator=gen) < 0.5 else -1)
              for v in torch.randint(2, 6, (2,), generator=gen))
    return (1 - a) * x + a * torch.roll(x, (dy, dx), (2, 3))


DEGRADE = {"blur": blur, "noise": noise, "pixelate": pixelate, "washout": washout, "ghost": ghost}
DEGRADATIONS: tuple[str, ...] = tuple(DEGRADE)


def degrade(x: torch.Tensor, name: str, gen: torch.Generator) -> torch.Tensor:
    """A clearly worse version of ``x`` that shows the same thing: degradation ``name`` of :data:`DEGRADE`, with
    per-image strengths u drawn from ``gen`` first (for every degradation, so the stream does not depend on it)."""
    if name not in DEGRADE:
        raise ValueError(f"unknown degradation '{name}' (one of {', '.join(DEGRADATIONS)})")
    u = torch.rand(x.shape[0], generator=gen).to(x)
    return DEGRADE[name](x, u, gen)


def pairwise_accuracy(s_preferred: torch.Tensor, s_rejected: torch.Tensor) -> float:
    """Fraction of pairs ranked right (ties count half)."""
    d = s_preferred - s_rejected
    return ((d > 0).float() + 0.5 * (d == 0).float()).mean().item()
