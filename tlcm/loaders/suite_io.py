"""Loaders for the Table 1 suite's assets: local paths, or hub ids already in the Hugging Face cache.

Nothing here downloads: a hub id is resolved from the local cache (:mod:`tlcm.loaders.hub`), and a missing
file stops with an :class:`ArtifactError` naming it and where to get it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from models.clip_image import CLIP_MEAN, CLIP_STD, ImageTransform, resize_center_crop
from models.scorers import (AestheticMLP, AestheticScorer, ClipImageEmbedder, ClipScorer, ImageRewardNet,
                            InceptionFidFeatures, blip_vision_shape, imagereward_state_dicts)
from tlcm.loaders.hub import resolve_file, resolve_folder
from tlcm.core.storage import ArtifactError, read_json

CLIP_G_HUB = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"
CLIP_L_HUB = "openai/clip-vit-large-patch14"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac%2Blogos%2Bava1-l14-linearMSE.pth")
IMAGEREWARD_HUB = "THUDM/ImageReward"
IMAGEREWARD_FILES = ("ImageReward.pt", "med_config.json")
BERT_HUB = "google-bert/bert-base-uncased"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
COCO_IMAGES_URL = "http://images.cocodataset.org/zips/val2017.zip"


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file, or a ``.pt``/``.pth`` state dict read with ``weights_only=True``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported with its name
        raise ArtifactError(f"{what}: cannot read weights from '{path}' ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ArtifactError(f"{what}: '{path}' is not a plain state dict of tensors")
    return sd


def _load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str, path: Path) -> None:
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"{what}: '{path}' does not match the architecture (missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]})")


def _from_pretrained(cls, folder: Path, what: str, **kw) -> torch.nn.Module:
    """``cls.from_pretrained(folder)`` in eval mode, frozen; weights it lacks stop with an error."""
    model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True, **kw)
    bad = list(info.get("missing_keys", [])) + [str(m) for m in info.get("mismatched_keys", [])]
    if bad:
        raise ArtifactError(f"{what}: '{folder}' does not hold {cls.__name__} weights (missing/mismatched: {bad[:5]})")
    return model.eval().requires_grad_(False)


# ---- CLIP --------------------------------------------------------------------------------

def clip_transform(folder: Path, image_size: int) -> ImageTransform:
    """The CLIP preprocessing of a model folder: crop = the vision tower's input size, mean/std from
    ``preprocessor_config.json`` when present (OpenAI's CLIP constants otherwise)."""
    cfg_file = folder / "preprocessor_config.json"
    cfg: dict[str, Any] = read_json(cfg_file, "CLIP preprocessor config", "re-download the CLIP model folder") \
        if cfg_file.is_file() else {}
    return ImageTransform(image_size, tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD)))


def load_clip_scorer(source: str) -> tuple[ClipScorer, Any]:
    """(CLIP-score network, its tokenizer) from a ``CLIPModel`` folder or cached hub id (ViT-g/14 in the paper)."""
    from transformers import AutoTokenizer, CLIPModel

    hint = f"CLIP ViT-g/14 for the CLIP score: `hf download {CLIP_G_HUB}`, then set suite.clip_model"
    folder = resolve_folder(source, "suite.clip_model", hint)
    model = _from_pretrained(CLIPModel, folder, "suite.clip_model")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return ClipScorer(model, clip_transform(folder, model.config.vision_config.image_size)), tokenizer


def load_clip_image_embedder(source: str, what: str, hint: str) -> ClipImageEmbedder:
    """The image side only (``CLIPVisionModelWithProjection``) of a CLIP folder or cached hub id."""
    from transformers import AutoConfig, CLIPVisionModelWithProjection

    folder = resolve_folder(source, what, hint)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if hasattr(config, "vision_config"):  # a full CLIP folder: the projection width is a top-level field
        config.vision_config.projection_dim = config.projection_dim
        config = config.vision_config
    model = _from_pretrained(CLIPVisionModelWithProjection, folder, what, config=config)
    return ClipImageEmbedder(model, clip_transform(folder, model.config.image_size))


def load_aesthetic_scorer(clip_source: str, head_source: str) -> AestheticScorer:
    """LAION aesthetic predictor: CLIP ViT-L/14 image embeddings + the ``sac+logos+ava1-l14-linearMSE`` MLP."""
    embedder = load_clip_image_embedder(
        clip_source, "suite.aesthetic_clip", f"CLIP ViT-L/14: `hf download {CLIP_L_HUB}`, then set suite.aesthetic_clip")
    path = resolve_file(head_source, AESTHETIC_FILE, "suite.aesthetic_head",
                        f"download {AESTHETIC_URL} and set suite.aesthetic_head to the file")
    sd = read_state_dict(path, "suite.aesthetic_head")
    dim = sd["layers.0.weight"].shape[1] if "layers.0.weight" in sd else None
    width = embedder.clip.config.projection_dim
    if dim != width:
        raise ArtifactError(f"suite.aesthetic_head: '{path}' expects {dim}-d embeddings but suite.aesthetic_clip "
                            f"gives {width}-d (the head belongs with CLIP ViT-L/14, {CLIP_L_HUB})")
    head = AestheticMLP(dim)
    _load_strict(head, sd, "suite.aesthetic_head", path)
    return AestheticScorer(embedder, head).eval().requires_grad_(False)


# ---- ImageReward -------------------------------------------------------------------------

def _bert_tokenizer(folder: Path, tokenizer_source: str):
    from transformers import BertTokenizer

    if (folder / "vocab.txt").is_file():
        return BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    tok_folder = resolve_folder(tokenizer_source, "ImageReward tokenizer",
                                f"ImageReward uses bert-base-uncased's tokenizer: put its vocab.txt in the ImageReward "
                                f"folder, or `hf download {BERT_HUB} vocab.txt tokenizer_config.json config.json`",
                                marker="vocab.txt")
    return BertTokenizer.from_pretrained(str(tok_folder), local_files_only=True)


def load_image_reward(source: str, tokenizer_source: str = BERT_HUB, head_dim: int = 64) -> tuple[ImageRewardNet, Any]:
    """(ImageReward network, its BERT tokenizer) from a folder (or cached hub id) with the released
    ``ImageReward.pt`` and ``med_config.json`` (hub: THUDM/ImageReward). The checkpoint is mapped onto
    transformers' ``BlipVisionModel`` + ``BlipTextModel``; any unmapped or missing key stops with an error.
    ``head_dim``: the ViT's attention head width (not stored in the weights; 64 for BLIP's ViT-L)."""
    from transformers import BlipTextConfig, BlipVisionConfig, BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    hint = f"ImageReward: `hf download {IMAGEREWARD_HUB} {' '.join(IMAGEREWARD_FILES)}`, then set suite.image_reward"
    ckpt = resolve_file(source, IMAGEREWARD_FILES[0], "suite.image_reward", hint)
    med_file = resolve_file(str(ckpt.parent), IMAGEREWARD_FILES[1], "suite.image_reward", hint)
    med = read_json(med_file, "ImageReward med_config.json", hint)
    try:
        parts = imagereward_state_dicts(read_state_dict(ckpt, "suite.image_reward"))
        shape = blip_vision_shape(parts["vision"], head_dim)
    except (KeyError, ValueError) as e:
        raise ArtifactError(f"suite.image_reward: '{ckpt}' is not an ImageReward checkpoint ({e})") from e
    vision = BlipVisionModel(BlipVisionConfig(**shape, layer_norm_eps=1e-6))
    text = BlipTextModel(BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"], hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12), pad_token_id=med.get("pad_token_id", 0),
        encoder_hidden_size=shape["hidden_size"], is_decoder=True,  # is_decoder builds the cross-attention layers
        bos_token_id=None, eos_token_id=None, sep_token_id=None), add_pooling_layer=False)
    head = AestheticMLP(med["hidden_size"])
    for module, name in ((vision, "vision"), (text, "text"), (head, "head")):
        _load_strict(module, parts[name], f"suite.image_reward ({name})", ckpt)
    net = ImageRewardNet(vision, text, head, ImageTransform(shape["image_size"]))
    return net.eval().requires_grad_(False), _bert_tokenizer(ckpt.parent, tokenizer_source)


# ---- FID ---------------------------------------------------------------------------------

def load_inception(path: str) -> InceptionFidFeatures:
    """The TorchScript Inception-v3 FID feature network from a local file (``inception-2015-12-05.pt``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ArtifactError(f"FID Inception network not found: '{p}'; download {INCEPTION_URL}")
    try:
        detector = torch.jit.load(str(p), map_location="cpu").eval()
        with torch.no_grad():
            dim = detector(torch.zeros(1, 3, 299, 299, dtype=torch.uint8), return_features=True).shape[-1]
    except Exception as e:  # noqa: BLE001 - reported with the file's name
        raise ArtifactError(f"FID Inception network '{p}' is not the TorchScript detector of {INCEPTION_URL} "
                            f"({type(e).__name__}: {e})") from e
    return InceptionFidFeatures(detector, int(dim))


# ---- COCO images -------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageFiles:
    """Image files under ``folder``, read in order, centre-cropped and resized to ``size``×``size``."""

    folder: Path
    files: tuple[str, ...]
    size: int

    def check(self) -> None:
        """Stop with an error naming the first missing file (before any work)."""
        if not self.folder.is_dir():
            raise ArtifactError(f"suite.coco_images: folder '{self.folder}' not found; unzip {COCO_IMAGES_URL}")
        missing = [f for f in self.files if not (self.folder / f).is_file()]
        if missing:
            raise ArtifactError(f"suite.coco_images: {len(missing)} of {len(self.files)} images missing, e.g. "
                                f"'{self.folder / missing[0]}'; unzip {COCO_IMAGES_URL} there")

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 (B, 3, size, size) batches."""
        for i in range(0, len(self.files), batch_size):
            yield torch.stack([read_image(self.folder / f, self.size) for f in self.files[i : i + batch_size]])


def read_image(path: Path, size: int) -> torch.Tensor:
    """One RGB image as uint8 (3, size, size): centre crop + antialiased bicubic resize (tensor ops)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - reported with the file's name
        raise ArtifactError(f"image unreadable: '{path}' ({type(e).__name__}: {e})") from e
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    return (resize_center_crop(x, size).clamp(0, 1) * 255).round().to(torch.uint8)[0]
