"""The independent evaluator: attribute classifiers on pixels (never used for training).

One small CNN with a shared trunk and one head per label space. Its
flattened trunk output is the feature space of the Fréchet distance (the FID
analogue); its prompted heads give the alignment accuracy (the CLIP-score analogue).
Nuisance heads learn what the caption leaves open (rotation, fill, background texture,
distractors; :data:`tlcm.shapes.render.NUISANCE_SPACES`): never part of alignment, they make the
features, and so the Fréchet distance, see whether those details are drawn or blurred away.
The trunk keeps the 4×4 spatial map (no global pooling) so that position and
relation stay recognisable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Attribute groups reported per caption; heads in a group are all checked.
ATTRIBUTE_GROUPS: dict[str, tuple[str, ...]] = {
    "colour": ("a_colour", "b_colour"),
    "shape": ("a_shape", "b_shape"),
    "size": ("a_size",),
    "layout": ("layout",),
    "background": ("bg",),
}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
    )


class AttributeNet(nn.Module):
    """Images in [0, 1], (N, 3, H, W) → features (N, feature_dim) and logits per head."""

    def __init__(self, head_sizes: dict[str, int], width: int = 32, feature_dim: int = 128, image_size: int = 32):
        super().__init__()
        self.head_sizes = dict(head_sizes)
        w = width
        self.trunk = nn.Sequential(
            _block(3, w), nn.MaxPool2d(2),
            _block(w, 2 * w), nn.MaxPool2d(2),
            _block(2 * w, 4 * w), nn.MaxPool2d(2),
        )
        side = image_size // 8
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * side * side, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, n) for k, n in self.head_sizes.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(images * 2 - 1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {k: head(f) for k, head in self.heads.items()}


class FeatureExtractor(nn.Module):
    """Adapter for ``torchmetrics``' ``FrechetInceptionDistance(feature=...)``: uint8 images
    (N, 3, H, W) in, evaluator features out."""

    def __init__(self, net: AttributeNet):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return self.net.features(x).double()


def classification_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                        counts: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Cross-entropy per head (unweighted, named terms); label -1 means "does not apply".

    Each term is the sum of the applicable images' cross-entropies divided by ``counts[k]``
    (default: the number of applicable labels here, i.e. the mean). A process holding a shard of
    a batch passes the batch's count divided by the number of processes, so the processes' mean
    of the terms (and of their gradients) is the whole batch's mean."""
    out = {}
    for k, lg in logits.items():
        y = labels[k]
        n = float((y >= 0).sum()) if counts is None else counts[k]
        out[k] = F.cross_entropy(lg, y, ignore_index=-1, reduction="sum") / n if n > 0 else lg.sum() * 0.0
    return out


PROMPTED_HEADS: tuple[str, ...] = tuple(h for heads in ATTRIBUTE_GROUPS.values() for h in heads)


def attribute_correct(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per image and attribute group: True when every applicable head in the group is right.
    ``all`` is the alignment criterion: every prompted attribute recognised (the heads of
    :data:`ATTRIBUTE_GROUPS`; nuisance heads, for what the caption leaves open, never count)."""
    right = {k: (logits[k].argmax(-1) == labels[k]) | (labels[k] < 0) for k in PROMPTED_HEADS}
    groups = {g: torch.stack([right[h] for h in heads]).all(0) for g, heads in ATTRIBUTE_GROUPS.items()}
    groups["all"] = torch.stack(list(right.values())).all(0)
    return groups


def applicable(labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Which images each attribute group applies to (size only for one-object captions)."""
    out = {g: torch.stack([labels[h] >= 0 for h in heads]).any(0) for g, heads in ATTRIBUTE_GROUPS.items()}
    out["all"] = torch.ones_like(labels["layout"], dtype=torch.bool)
    return out
