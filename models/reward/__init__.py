"""Reward models with the MPS interface: ``score(images, prompts, condition) -> (N,)``.

Two implementations of :class:`RewardScorer`:

* :class:`ShapesReward`: the shapes world's reward model (a small CNN with spatial-pyramid
  pooling, a small transformer over the prompt tokens, a condition embedding). Trained by the
  ``reward`` stage with Bradley–Terry losses on synthetic preference pairs.
* :class:`MPSNet`: a minimal re-implementation of Kwai-Kolors MPS ("Learning
  Multi-dimensional Human Preference for Text-to-Image Generation", CVPR 2024): a HF
  ``CLIPModel`` (ViT-H/14 in the release) plus the cross-attention ``cross_model``, with the
  condition mask (prompt tokens whose similarity to the condition text is at most
  ``mask_threshold`` of the best one are hidden). Module names match the released pickled
  module (``model.*``, ``cross_model.layers.*``), so its state dict loads without unpickling.

Images are float (N, 3, H, W) in [0, 1]; scores are differentiable in the images. Pure
networks and math: tokenizers are passed in, nothing here reads or writes files.

- :mod:`models.reward.scorer`: the interface (:class:`RewardScorer`, the conditions, tokenising);
- :mod:`models.reward.shapes`: the shapes-world network;
- :mod:`models.reward.losses`: its training losses, the image degradations of the detail pairs, accuracy;
- :mod:`models.reward.mps`: the MPS network (loading and converting a release: :mod:`tlcm.loaders.reward_io`).
"""
from models.clip_image import clip_preprocess
from models.reward.losses import (DEGRADATIONS, bradley_terry_loss, centering_loss, degrade, gaussian_blur,
                                  listwise_loss, pairwise_accuracy)
from models.reward.mps import MPS_CONDITION_TEXTS, CrossModel, MPSNet, condition_mask, cross_dims_from_state
from models.reward.scorer import CONDITIONS, RewardScorer, tokenize
from models.reward.shapes import ShapesReward

__all__ = ["CONDITIONS", "DEGRADATIONS", "MPS_CONDITION_TEXTS", "CrossModel", "MPSNet", "RewardScorer", "ShapesReward",
           "bradley_terry_loss", "centering_loss", "clip_preprocess", "condition_mask", "cross_dims_from_state",
           "degrade", "gaussian_blur", "listwise_loss", "pairwise_accuracy", "tokenize"]
