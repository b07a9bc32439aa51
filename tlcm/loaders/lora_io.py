"""Saving and loading the student LoRA in the format diffusers users load.

``pipe.load_lora_weights(folder)`` must give exactly the trained student. Measured: converting
with ``convert_state_dict_to_diffusers`` keeps only attention keys and diffusers then drops them
on load (a RuntimeWarning only); the raw peft state dict, prefixed ``unet.``, round-trips exactly.
``lora_alpha`` is recorded in the file's metadata and kept equal to the rank.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from models.lora import STUDENT, add_lora
from tlcm.core.storage import ArtifactError, atomic_dir, load_tensors, read_json

WEIGHTS, META = "pytorch_lora_weights.safetensors", "tlcm_lora.json"


def resolve_lora(ref: str) -> Path:
    """A LoRA folder from a path, or from a registered version or run (``models:/<name>@champion``,
    ``runs:/<id>/model``: its ``artifacts/lora``)."""
    if ref.startswith(("models:/", "runs:/")):
        import tempfile

        import mlflow

        from tlcm.tracking import runs as tracking
        from tlcm.tracking.packaging import lora_folder

        mlflow.set_tracking_uri(tracking.tracking_uri())
        return lora_folder(Path(mlflow.artifacts.download_artifacts(artifact_uri=ref,
                                                                    dst_path=tempfile.mkdtemp(prefix="tlcm-lora-"))))
    return Path(ref)


def lora_state(unet, name: str = STUDENT) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()}


def save_lora(folder: str | Path, unet, info: dict, name: str = STUDENT) -> Path:
    """Write ``folder`` atomically: the LoRA weights (diffusers' file name, ``unet.`` keys) and ``tlcm_lora.json``."""
    from diffusers import StableDiffusionXLPipeline

    cfg = unet.peft_config[name]
    with atomic_dir(folder) as out:
        StableDiffusionXLPipeline.save_lora_weights(out, unet_lora_layers=lora_state(unet, name), safe_serialization=True)
        meta = {"rank": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules), **info}
        (out / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return Path(folder)


def load_lora_into(unet, folder: str | Path, name: str = STUDENT) -> None:
    """Add adapter ``name`` to ``unet`` and load a saved student LoRA into it (to continue training)."""
    folder = Path(folder)
    meta_file = folder / META
    meta = read_json(meta_file, "LoRA", f"run the stage that writes {folder} first")
    sd = load_tensors(folder / WEIGHTS, what="LoRA weights")
    add_lora(unet, meta["rank"], name, meta["lora_alpha"])
    res = set_peft_model_state_dict(unet, {k.removeprefix("unet."): v for k, v in sd.items()}, adapter_name=name)
    missing = [k for k in getattr(res, "unexpected_keys", []) if "lora" in k]
    if missing:
        raise ArtifactError(f"LoRA file {folder / WEIGHTS} has keys this UNet does not: {missing[:3]} ...")


class AdapterState:
    """Checkpoint state of one LoRA adapter of the shared UNet (the frozen teacher weights are not state)."""

    def __init__(self, unet, name: str = STUDENT):
        self.unet, self.name = unet, name

    def state_dict(self) -> dict:
        return lora_state(self.unet, self.name)

    def load_state_dict(self, state: dict) -> None:
        set_peft_model_state_dict(self.unet, state, adapter_name=self.name)
