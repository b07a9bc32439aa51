"""Latent LPIPS: a perceptual distance computed directly on diffusion latents (no I/O).

TLCM (arXiv 2406.05768, §4.3 "Latent LPIPS") replaces the MSE of latent
consistency distillation with a *latent* LPIPS: LPIPS (Zhang et al. 2018,
"The Unreasonable Effectiveness of Deep Features as a Perceptual Metric")
rebuilt on a VGG network "by changing the input to 4 channels and removing the
3 max-pooling layers, as the latent space in LDM is already 8x downsampled",
trained from scratch on BAPPS 2AFC judgements of VAE-encoded patches.

Pieces:

* :class:`LatentVGG`: VGG-16's 13 convolutions in 5 blocks, first conv on the
  latent's channels, the first three max-pools removed (the fourth kept),
  channel widths divided by ``width_divisor``; taps after each block (LPIPS's
  relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
* :class:`NetLinLayer`: LPIPS's per-layer 1x1 linear head with weights kept
  non-negative by construction (``weight = softplus(raw)``), so a distance is
  a non-negative weighted sum of squared feature differences.
* :class:`LatentLPIPS`: ``forward(x, y) -> (N,)`` distances; the loss ``d`` of
  Eq. 7/10 on latents ``(N, C, H, W)``.
* :class:`RankingHead` + :func:`ranking_loss`: LPIPS's ``Dist2LogitLayer`` /
  ``BCERankingLoss``: a small MLP on (d0, d1, d0-d1, d0/(d1+eps), d1/(d0+eps))
  gives the logit that a human prefers p1; BCE against the judge fraction.
* :func:`two_afc_score`: BAPPS's 2AFC agreement of a distance with the judges.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# VGG-16 convolutions per block (widths before ``width_divisor``); LPIPS taps the last ReLU of each block.
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
TAP_NAMES: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
# VGG-16 max-pools sit before blocks 2..5; the latent net keeps only the last (pool4, before block 5).
POOL_BEFORE_BLOCK: tuple[bool, ...] = (False, False, False, False, True)


class LatentVGG(nn.Module):
    """VGG-16-style feature net on latents; ``forward`` returns the 5 block taps.

    With the first three pools removed, blocks 1-4 run at the latent's own
    resolution and block 5 at half of it (for a 16x16 latent: 16, 16, 16, 16, 8).
    """

    def __init__(self, in_channels: int = 4, width_divisor: int = 8):
        super().__init__()
        self.in_channels, self.width_divisor = in_channels, width_divisor
        blocks, cin = [], in_channels
        for i, widths in enumerate(VGG16_BLOCKS):
            layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if POOL_BEFORE_BLOCK[i] else []
            for w in widths:
                cout = max(1, w // width_divisor)
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=False)]
                cin = cout
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.channels: tuple[int, ...] = tuple(max(1, ws[-1] // width_divisor) for ws in VGG16_BLOCKS)
        for m in self.modules():  # from scratch: He init suits a plain ReLU stack
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for block in self.blocks:
            z = block(z)
            taps.append(z)
        return taps


def unit_normalize(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Normalise each spatial feature vector to unit length over channels (LPIPS's ``normalize_tensor``).
    ``sqrt(sum + eps^2)`` keeps the gradient finite where a feature vector is exactly zero."""
    return feat / torch.sqrt(feat.pow(2).sum(1, keepdim=True) + eps * eps)


class NetLinLayer(nn.Module):
    """LPIPS's 1x1 linear layer over channels with non-negative weights.

    The weights are parameterised as ``softplus(raw)``, so they are non-negative
    after any optimiser step (LPIPS clamps after each step instead).
    """

    def __init__(self, channels: int, init: float = 0.2):
        super().__init__()
        self.raw = nn.Parameter(torch.full((1, channels, 1, 1), math.log(math.expm1(init))))

    @property
    def weight(self) -> torch.Tensor:
        """The effective (non-negative) 1x1 weights, shape (1, C, 1, 1)."""
        return F.softplus(self.raw)

    def forward(self, sq_diff: torch.Tensor) -> torch.Tensor:
        return (sq_diff * self.weight).sum(1, keepdim=True)


class LatentLPIPS(nn.Module):
    """Latent LPIPS distance (TLCM §4.3; LPIPS, Zhang et al. 2018) on latents ``(N, C, H, W)``.

    ``forward(x, y)`` returns ``(N,)`` non-negative distances: for each tap,
    unit-normalise features over channels, take the squared difference, weight
    the channels with the non-negative 1x1 layer, average over space; sum over
    the 5 taps. Symmetric in ``x, y``; zero when ``x == y``. Use it frozen
    (``requires_grad_(False)``) as the distillation loss ``d(pred, target)``:
    gradients still flow into ``x`` (and ``y``). Works for any ``H, W >= 2``.
    """

    def __init__(self, in_channels: int = 4, width_divisor: int = 8):
        super().__init__()
        self.net = LatentVGG(in_channels, width_divisor)
        self.lins = nn.ModuleList(NetLinLayer(c) for c in self.net.channels)

    def config(self) -> dict:
        return {"in_channels": self.net.in_channels, "width_divisor": self.net.width_divisor}

    def _distance(self, fx: Sequence[torch.Tensor], fy: Sequence[torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for lin, a, b in zip(self.lins, fx, fy):
            diff = (unit_normalize(a) - unit_normalize(b)).pow(2)
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"latent LPIPS needs inputs of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        n = x.shape[0]
        feats = self.net(torch.cat([x, y]))  # one pass for both inputs
        return self._distance([f[:n] for f in feats], [f[n:] for f in feats])

    def triplet_distances(self, ref: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d(ref, p0), d(ref, p1)) with one feature pass over the three inputs (training on 2AFC)."""
        n = ref.shape[0]
        feats = self.net(torch.cat([ref, p0, p1]))
        fr, f0, f1 = ([f[i * n:(i + 1) * n] for f in feats] for i in range(3))
        return self._distance(fr, f0), self._distance(fr, f1)


class RankingHead(nn.Module):
    """LPIPS's ``Dist2LogitLayer``: (d0, d1) -> logit that p1 is preferred (i.e. judged closer to ref)."""

    def __init__(self, hidden: int = 32, eps: float = 0.1):
        super().__init__()
        self.eps = eps
        self.mlp = nn.Sequential(
            nn.Linear(5, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, d0: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
        e = self.eps
        x = torch.stack([d0, d1, d0 - d1, d0 / (d1 + e), d1 / (d0 + e)], dim=-1)
        return self.mlp(x).squeeze(-1)


def ranking_loss(head: RankingHead, d0: torch.Tensor, d1: torch.Tensor, judge: torch.Tensor) -> torch.Tensor:
    """LPIPS's ``BCERankingLoss``: BCE of the head's preference for p1 against ``judge`` in [0, 1]
    (the fraction of judges who preferred p1)."""
    return F.binary_cross_entropy_with_logits(head(d0, d1), judge.to(d0.dtype))


def two_afc_score(d0, d1, judge) -> torch.Tensor:
    """Per-triplet 2AFC agreement (BAPPS, Zhang et al. 2018): a distance that calls p1 closer
    (``d1 < d0``) agrees with the fraction ``judge`` of humans who preferred p1, one that calls p0
    closer with ``1 - judge``; ties score 0.5. The mean is the 2AFC score (1.0 = every judge agrees)."""
    d0, d1, judge = (torch.as_tensor(v, dtype=torch.float64) for v in (d0, d1, judge))
    return torch.where(d1 < d0, judge, torch.where(d1 > d0, 1.0 - judge, torch.full_like(judge, 0.5)))
