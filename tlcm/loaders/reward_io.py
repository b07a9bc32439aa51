"""Loading reward models: the shapes-world reward folder, and Kwai-Kolors MPS checkpoints.

A reward folder (``artifacts/reward``, or the output of ``tlcm convert-mps``) is
``model.safetensors`` + ``config.json`` (+ ``tokenizer/``); loading it never unpickles anything.
The released MPS checkpoint (``MPS_overall_checkpoint.pth``) is a whole pickled
``trainer.models.clip_model.CLIPModel``; it is opened with ``torch.load(weights_only=False)``
only when ``reward.trust_pickled`` is true (unpickling runs arbitrary code). Its classes need
not be importable: every ``trainer.*`` / ``transformers.*`` class is replaced by an inert
stand-in while unpickling, and only the state dict is kept.
"""
from __future__ import annotations

import json
import pickle
import shutil
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.reward.mps import MPSNet, cross_dims_from_state
from models.reward.scorer import RewardScorer
from models.reward.shapes import ShapesReward
from tlcm.loaders.hub import looks_like_hub_id
from tlcm.core.storage import ArtifactError, atomic_dir, load_tensors, read_json, save_tensors

MPS_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the tokenizer MPS was trained with
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
TRAIN_HINT = "run `tlcm stage reward` (or `dvc repro reward`)"
CONVERT_HINT = ("convert it once with `tlcm convert-mps <checkpoint.pth> <out_dir> --trust-pickled` and set "
                "reward.source to <out_dir>, or set reward.trust_pickled: true to load the pickle directly")

_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id", "bos_token_id",
              "eos_token_id")
_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                "image_size", "patch_size", "hidden_act", "layer_norm_eps")


class UnsafePickleWarning(UserWarning):
    """A pickled checkpoint was unpickled (it can run arbitrary code)."""


# ---- the shapes-world reward ------------------------------------------------------------

def save_shapes_reward(net: ShapesReward, folder: Path, tokenizer_dir: Path, extra: dict[str, Any]) -> None:
    """Write ``model.safetensors``, ``config.json`` (architecture + ``extra``) and ``tokenizer/`` into ``folder``."""
    save_tensors(folder / "model.safetensors", net.state_dict())
    shutil.copytree(tokenizer_dir, folder / "tokenizer")
    (folder / "config.json").write_text(json.dumps({"kind": "shapes", **net.config, **extra}, indent=2))


def read_config(folder: Path, hint: str) -> dict[str, Any]:
    return read_json(folder / "config.json", "reward model config", hint)


def load_tokenizer(source: str | Path, what: str, hint: str) -> Any:
    """A CLIP tokenizer from a local folder (or a hub id); failures raise ``ArtifactError`` with ``hint``."""
    from transformers import AutoTokenizer, CLIPTokenizer

    path = Path(source)
    if not path.is_dir() and not looks_like_hub_id(str(source)):
        raise ArtifactError(f"{what} tokenizer not found: {source}; {hint}")
    try:
        if (path / "vocab.json").is_file():
            return CLIPTokenizer.from_pretrained(str(source))
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{what} tokenizer could not be loaded from '{source}' ({e}); {hint}") from e


def load_shapes_reward(folder: Path) -> ShapesReward:
    """The trained shapes-world reward model, frozen, in eval mode, with its tokenizer."""
    cfg = read_config(folder, TRAIN_HINT)
    keys = ("vocab_size", "max_length", "width", "image_size", "depth", "heads")
    tok = load_tokenizer(folder / "tokenizer", "reward", TRAIN_HINT)
    net = ShapesReward(**{k: cfg[k] for k in keys}, tokenizer=tok)
    state = load_tensors(folder / "model.safetensors", what="reward model weights")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ArtifactError(f"reward weights in {folder} do not match its config.json ({e}); {TRAIN_HINT}") from e
    return net.eval().requires_grad_(False)


# ---- MPS: pickled checkpoint -> state dict + config ---------------------------------------

class _StandInModule(nn.Module):
    """Takes the place of a pickled module class (MPS's ``trainer.*``, ``transformers.*``): holds
    its parameters, buffers and submodules, so ``state_dict()`` works; cannot run."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a stand-in for an unpickled module cannot run; load the state dict into MPSNet")


class _StandInObject:
    """Takes the place of a pickled non-module class (configs): holds its attributes."""


def _stand_in(module: str, name: str) -> type:
    try:
        real = getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError):
        return _StandInModule
    return _StandInModule if isinstance(real, type) and issubclass(real, nn.Module) else _StandInObject


class _StandInUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] in ("trainer", "transformers"):
            return _stand_in(module, name)
        return super().find_class(module, name)


_STAND_IN_PICKLE = types.SimpleNamespace(__name__="tlcm_stand_in_pickle", Unpickler=_StandInUnpickler,
                                         load=pickle.load)


def _attrs(obj: Any) -> dict[str, Any]:
    return obj if isinstance(obj, dict) else vars(obj)


def clip_config_dict(config: Any) -> dict[str, Any]:
    """The architecture part of a (pickled, any transformers version) ``CLIPConfig`` as plain JSON."""
    top, text, vision = _attrs(config), _attrs(_attrs(config)["text_config"]), _attrs(_attrs(config)["vision_config"])
    return {
        "projection_dim": top["projection_dim"],
        "logit_scale_init_value": top.get("logit_scale_init_value", 2.6592),
        "text_config": {k: text[k] for k in _TEXT_KEYS if k in text},
        "vision_config": {k: vision[k] for k in _VISION_KEYS if k in vision},
    }


def read_pickled_mps(path: Path, trust_pickled: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and ``config.json`` content of a pickled MPS module; refused unless ``trust_pickled``."""
    if not trust_pickled:
        raise ArtifactError(
            f"refusing to unpickle {path}: a pickled checkpoint can run arbitrary code when loaded. If you trust "
            f"the file, {CONVERT_HINT}.")
    if not path.is_file():
        raise ArtifactError(f"MPS checkpoint not found: {path}")
    warnings.warn(f"unpickling {path} with torch.load(weights_only=False) because reward.trust_pickled is true; "
                  "convert it once with `tlcm convert-mps` to load it safely from safetensors",
                  UnsafePickleWarning, stacklevel=2)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_STAND_IN_PICKLE)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, AttributeError, ValueError) as e:
        raise ArtifactError(f"MPS checkpoint is corrupt or not a pickled MPS module: {path} ({e})") from e
    if not isinstance(obj, nn.Module) or not hasattr(obj, "model") or not hasattr(obj, "cross_model"):
        raise ArtifactError(f"{path} is not a pickled MPS module (expected .model and .cross_model; got "
                            f"{type(obj).__name__})")
    state = {k: v for k, v in obj.state_dict().items() if not k.endswith("position_ids")}
    config = {"kind": "mps", "clip": clip_config_dict(obj.model.config), "cross": cross_dims_from_state(state),
              "mask_threshold": 0.3, "dtype": str(next(iter(state.values())).dtype).removeprefix("torch.")}
    return state, config


def build_mps(config: dict[str, Any], state: dict[str, torch.Tensor], tokenizer: Any, where: Path,
              dtype: torch.dtype = torch.float32) -> MPSNet:
    """An ``MPSNet`` from ``config.json`` content and its weights, frozen, eval mode, in ``dtype``."""
    from transformers import CLIPConfig

    c = config["clip"]
    clip = CLIPConfig(text_config=c["text_config"], vision_config=c["vision_config"],
                      projection_dim=c["projection_dim"], logit_scale_init_value=c["logit_scale_init_value"])
    net = MPSNet(clip, config["cross"], config.get("mask_threshold", 0.3), tokenizer=tokenizer)
    try:
        net.load_state_dict({k: v for k, v in state.items() if not k.endswith("position_ids")})
    except RuntimeError as e:
        raise ArtifactError(f"MPS weights from {where} do not fit the MPS architecture of its config ({e})") from e
    return net.to(dtype).eval().requires_grad_(False)


def convert_mps(pth_path: str | Path, out_dir: str | Path, trust_pickled: bool,
                tokenizer: str | Path | None = None) -> Path:
    """One-time conversion of a pickled MPS checkpoint to ``model.safetensors`` + ``config.json``
    (+ ``tokenizer/`` when ``tokenizer`` names a local folder or hub id; else config.json
    names MPS's hub tokenizer). Returns ``out_dir``; point ``reward.source`` at it."""
    state, config = read_pickled_mps(Path(pth_path), trust_pickled)
    tok = load_tokenizer(tokenizer, "MPS", "pass a local CLIP tokenizer folder") if tokenizer is not None else None
    with atomic_dir(out_dir) as out:
        save_tensors(out / "model.safetensors", state)
        if tok is not None:
            tok.save_pretrained(str(out / "tokenizer"))
        config["tokenizer"] = "tokenizer" if tok is not None else MPS_TOKENIZER
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return Path(out_dir)


def load_mps(source: str | Path, trust_pickled: bool = False, tokenizer: str | Path | None = None,
             dtype: torch.dtype = torch.float32) -> MPSNet:
    """MPS from a converted folder (or its ``model.safetensors``), or from the pickled ``.pth``
    when ``trust_pickled``. ``tokenizer`` overrides the one the folder names."""
    path = Path(source)
    if path.suffix in PICKLE_SUFFIXES:
        state, config = read_pickled_mps(path, trust_pickled)
        beside = path.parent / "tokenizer"
        tok_src = tokenizer or (beside if beside.is_dir() else MPS_TOKENIZER)
    else:
        folder = path.parent if path.suffix == ".safetensors" else path
        hint = f"point reward.source at a folder made by `tlcm convert-mps`; {CONVERT_HINT}"
        if not folder.exists():
            raise ArtifactError(f"MPS checkpoint not found: {source}; {hint}")
        config = read_config(folder, hint)
        if config.get("kind") != "mps":
            raise ArtifactError(f"{folder} holds a '{config.get('kind')}' reward model, not MPS; {hint}")
        state = load_tensors(folder / "model.safetensors", what="MPS weights")
        tok_src = tokenizer or (folder / config["tokenizer"] if config.get("tokenizer") == "tokenizer"
                                else config.get("tokenizer", MPS_TOKENIZER))
    tok = load_tokenizer(tok_src, "MPS", "pass the tokenizer to `tlcm convert-mps` (a local CLIP ViT-H/14 tokenizer)")
    return build_mps(config, state, tok, path, dtype)


def check_mps_source(source: str | Path, trust_pickled: bool) -> str:
    """Cheap check that ``load_mps(source, trust_pickled)`` can work (no weights read): a pickled
    checkpoint exists and is trusted, or a converted folder has an MPS config.json and a readable
    safetensors header. Returns what it found; raises ``ArtifactError`` like ``load_mps``."""
    from safetensors import safe_open

    path = Path(source)
    hint = f"point reward.source at a folder made by `tlcm convert-mps`; {CONVERT_HINT}"
    if path.suffix in PICKLE_SUFFIXES:
        if not path.is_file():
            raise ArtifactError(f"MPS checkpoint not found: {source}; {hint}")
        if not trust_pickled:
            raise ArtifactError(f"refusing to unpickle {path}: a pickled checkpoint can run arbitrary code when "
                                f"loaded. If you trust the file, {CONVERT_HINT}.")
        return "pickled MPS checkpoint (trusted)"
    folder = path.parent if path.suffix == ".safetensors" else path
    if not folder.exists():
        raise ArtifactError(f"MPS checkpoint not found: {source}; {hint}")
    config = read_config(folder, hint)
    if config.get("kind") != "mps":
        raise ArtifactError(f"{folder} holds a '{config.get('kind')}' reward model, not MPS; {hint}")
    try:
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            n = len(list(f.keys()))
    except Exception as e:  # noqa: BLE001 - any failure to open means the file is unusable
        raise ArtifactError(f"MPS weights are missing or corrupt in {folder} ({e}); {hint}") from e
    return f"converted MPS ({n} tensors)"


def load_reward(params: Any, paths: Any) -> RewardScorer:
    """The reward model named by ``params.reward.source``, frozen, in eval mode: the shapes-world
    model from ``paths.reward`` ('train'), or a real MPS checkpoint."""
    p = params.reward
    if p.source.trained:
        if not (paths.reward / "model.safetensors").is_file():
            raise ArtifactError(f"reward model not found in {paths.reward}; {TRAIN_HINT}")
        return load_shapes_reward(paths.reward)
    return load_mps(p.source.location, trust_pickled=p.trust_pickled)
