"""The paper's Table 1 scorers as networks with differentiable preprocessing (no I/O).

- **CLIP score** (CLIP ViT-g/14): ``100 * max(cos(image, text), 0)`` on CLIP's projected
  embeddings (the torchmetrics / Hessel et al. definition).
- **LAION aesthetic score**: the improved-aesthetic-predictor MLP
  (``sac+logos+ava1-l14-linearMSE``: Linear 768→1024, Dropout, 1024→128, Dropout, 128→64,
  Dropout, 64→16, 16→1, no activations) on L2-normalised CLIP ViT-L/14 image embeddings.
- **ImageReward** (Xu et al. 2023): BLIP ViT-L/16 image tokens, a BERT text encoder with
  cross-attention to them, the same MLP layout on the [CLS] feature, normalised by the
  released mean/std. Built from transformers' ``BlipVisionModel`` / ``BlipTextModel``;
  :func:`imagereward_state_dicts` maps the released checkpoint's keys onto them.
- **FID features** for ``torchmetrics``' ``FrechetInceptionDistance(feature=...)``: the
  TorchScript Inception of StyleGAN2-ADA / clean-fid (:class:`InceptionFidFeatures`), or
  L2-normalised CLIP image embeddings (:class:`ClipFidFeatures`, reported as "FID-CLIP").

Images enter every scorer as float (N, 3, H, W) in [0, 1]; resizing, centre-cropping and
normalising are tensor ops (:mod:`models.clip_image`), so every score is differentiable in the pixels.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from models.clip_image import ImageTransform

IMAGEREWARD_MEAN = 0.16717362830052426  # the released model's reward normalisation (ImageReward.py)
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_TOKENS = 35


# ---- images ----------------------------------------------------------------------------

def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float() / 255.0



# ---- CLIP score --------------------------------------------------------------------------

def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """``100 * max(cos, 0)`` per row of two (N, D) embedding batches."""
    cos = F.cosine_similarity(image_embeds, text_embeds, dim=-1)
    return 100.0 * cos.clamp(min=0.0)


class ClipImageEmbedder(nn.Module):
    """L2-normalised projected image embeddings of a CLIP model (``CLIPModel`` or
    ``CLIPVisionModelWithProjection``: anything with ``vision_model`` and ``visual_projection``)."""

    def __init__(self, clip: nn.Module, transform: ImageTransform):
        super().__init__()
        self.clip = clip
        self.transform = transform

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.clip.vision_model(pixel_values=self.transform(images)).pooler_output
        return F.normalize(self.clip.visual_projection(pooled), dim=-1)


class ClipScorer(nn.Module):
    """CLIP score of (image, prompt) pairs with a ``CLIPModel``; prompts arrive tokenised."""

    def __init__(self, clip: nn.Module, transform: ImageTransform):
        super().__init__()
        self.image = ClipImageEmbedder(clip, transform)

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        clip = self.image.clip
        pooled = clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(clip.text_projection(pooled), dim=-1)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return clip_score(self.image(images), self.text_embeds(input_ids, attention_mask))


# ---- LAION aesthetic score ---------------------------------------------------------------

class AestheticMLP(nn.Module):
    """improved-aesthetic-predictor's MLP (also ImageReward's head); the key layout
    ``layers.{0,2,4,6,7}.{weight,bias}`` matches the released ``.pth`` state dicts."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


class AestheticScorer(nn.Module):
    """LAION aesthetic score: the MLP on L2-normalised CLIP ViT-L/14 image embeddings."""

    def __init__(self, embedder: ClipImageEmbedder, head: AestheticMLP):
        super().__init__()
        self.embedder = embedder
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedder(images))


# ---- ImageReward -------------------------------------------------------------------------

class ImageRewardNet(nn.Module):
    """ImageReward's ``score_gard`` path: BLIP image tokens → BERT text encoder with cross-attention
    → MLP on the [CLS] feature → ``(r - mean) / std``."""

    def __init__(self, vision: nn.Module, text: nn.Module, head: AestheticMLP, transform: ImageTransform):
        super().__init__()
        self.vision = vision
        self.text = text
        self.head = head
        self.transform = transform

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=self.transform(images)).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask,
                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        reward = self.head(out.last_hidden_state[:, 0, :])
        return (reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


_VIT_RENAMES = [  # BLIP's timm-style ViT -> transformers' BlipVisionModel (as in transformers' BLIP conversion)
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]
IMAGEREWARD_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def _rename_vit_key(key: str) -> str:
    for pattern, repl in _VIT_RENAMES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise KeyError(f"unexpected BLIP ViT key '{key}'")


def imagereward_state_dicts(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split a released ``ImageReward.pt`` state dict into ``{"vision", "text", "head"}`` state dicts
    keyed for ``BlipVisionModel``, ``BlipTextModel(add_pooling_layer=False)`` and :class:`AestheticMLP`.
    The contrastive projections (``blip.vision_proj``/``text_proj``) are not used by the reward and
    are dropped; any other key raises ``KeyError``."""
    out: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "head": {}}
    for key, value in state_dict.items():
        if key.startswith(IMAGEREWARD_UNUSED):
            continue
        if key.startswith("blip.visual_encoder."):
            out["vision"][_rename_vit_key(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder."):
            out["text"][key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            out["head"][key.removeprefix("mlp.")] = value
        else:
            raise KeyError(f"unexpected ImageReward key '{key}'")
    return out


def blip_vision_shape(vision_sd: dict[str, torch.Tensor], head_dim: int = 64) -> dict[str, int]:
    """``BlipVisionConfig`` sizes read off a (renamed) BLIP ViT state dict. The head count is not in
    the weights: ``hidden_size // head_dim`` (ViT-L/16: 1024 / 64 = 16 heads, as BLIP builds it)."""
    hidden = vision_sd["embeddings.class_embedding"].shape[-1]
    patch = vision_sd["embeddings.patch_embedding.weight"].shape[-1]
    n_pos = vision_sd["embeddings.position_embedding"].shape[1]
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid != n_pos - 1:
        raise ValueError(f"BLIP ViT position embedding of {n_pos} tokens is not 1 + a square grid")
    layers = 1 + max(int(k.split(".")[2]) for k in vision_sd if k.startswith("encoder.layers."))
    return {"hidden_size": hidden, "intermediate_size": vision_sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
            "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // head_dim),
            "image_size": grid * patch, "patch_size": patch}


# ---- FID feature extractors --------------------------------------------------------------

class InceptionFidFeatures(nn.Module):
    """The TorchScript Inception-v3 of StyleGAN2-ADA / clean-fid (``inception-2015-12-05.pt``, a
    translation of the TF graph standard FID uses): uint8 (N, 3, H, W) in, its 2048 pool features
    out (it resizes to 299 itself). For ``FrechetInceptionDistance(feature=self)``."""

    def __init__(self, detector: nn.Module, num_features: int):
        super().__init__()
        self.detector = detector
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.detector(images, return_features=True).double()


class ClipFidFeatures(nn.Module):
    """FID-CLIP features: L2-normalised CLIP image embeddings of uint8 (N, 3, H, W) images
    (Kynkäänniemi et al. 2023, "The Role of ImageNet Classes in Fréchet Inception Distance").
    Not comparable with Inception FID numbers; reported under its own name."""

    def __init__(self, embedder: ClipImageEmbedder, num_features: int):
        super().__init__()
        self.embedder = embedder
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder(images.float() / 255.0).double()
