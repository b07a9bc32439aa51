"""CLIP's image preprocessing as differentiable tensor ops (the one implementation: the Table 1
scorers, FID-CLIP and MPS use it). Matches ``CLIPImageProcessor`` (tests/test_suite.py): shortest side
to ``size`` with antialiased bicubic (like PIL), the long side truncated, centre crop, clamp to [0, 1]
(as 8-bit output would be), mean/std normalisation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Shortest side to ``size`` (antialiased bicubic, like PIL's), then the central ``size``×``size``.
    ``x``: float (N, C, H, W); differentiable."""
    h, w = x.shape[-2:]
    # the long side is truncated, as torchvision's Resize(int) and CLIPImageProcessor do
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size]


@dataclass(frozen=True)
class ImageTransform:
    """CLIP-style preprocessing as tensor ops: resize + centre crop to ``size``, clamp to [0, 1]
    (as 8-bit PIL output would be), normalise with ``mean``/``std``."""

    size: int
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_center_crop(images, self.size).clamp(0.0, 1.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def clip_preprocess(images: torch.Tensor, size: int, mean: tuple[float, ...] = CLIP_MEAN,
                    std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """:class:`ImageTransform` as a function: images (N, 3, H, W) in [0, 1] → CLIP-normalised (N, 3, size, size)."""
    return ImageTransform(size, mean, std)(images)
