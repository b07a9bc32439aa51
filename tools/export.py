"""``tlcm export``: the shipped LoRA (a folder or a registered version) in the format a tool loads.

- ``diffusers``: the LoRA folder as ``pipe.load_lora_weights(folder)`` reads it (a copy).
- ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors``, the folder the official TLCM
  inference script loads with ``unet.load_adapter(folder, adapter_name="default")`` (and
  ``PeftModel.from_pretrained``).
- ``kohya``: one ``.safetensors`` for ComfyUI / Automatic1111 (``lora_unet_…`` keys, ``.alpha``).

Every output appears whole or not at all (written beside its place, then renamed).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

from models.lora_formats import lora_modules, to_kohya, to_peft
from tlcm.loaders.lora_io import META, WEIGHTS, resolve_lora
from tlcm.core.storage import ArtifactError, atomic_dir, load_tensors, read_json, save_tensors

log = logging.getLogger("tlcm")

FORMATS = ("diffusers", "peft", "kohya")


def read_lora(folder: Path) -> tuple[dict, dict]:
    """(state dict, ``tlcm_lora.json``) of a LoRA folder, checked: every module has its A and B."""
    meta_file = folder / META
    if not meta_file.is_file():
        raise ArtifactError(f"not a TLCM LoRA folder: {meta_file} is missing (give a LoRA folder such as "
                            "artifacts/lora_dmgan, or a registered version models:/<name>@<alias>)")
    sd = load_tensors(folder / WEIGHTS, what="LoRA weights")
    mods = lora_modules(sd)
    if len(sd) != 2 * len(mods) or any(f"unet.{m}.lora_B.weight" not in sd for m in mods):
        raise ArtifactError(f"{folder / WEIGHTS}: expected one lora_A and one lora_B per module, found {len(sd)} "
                            f"tensors for {len(mods)} modules")
    return sd, read_json(meta_file, "LoRA metadata", f"re-export or re-run the stage that wrote {folder}")


def base_of(source_dir: Path, teacher: str | None) -> str:
    """The base model the LoRA belongs to: a registered version's own ``artifacts/base``, else ``teacher``."""
    bundled = source_dir.parent.parent / "artifacts" / "base" if source_dir.name == "lora" else None
    if bundled is not None and (bundled / "model_index.json").is_file():
        return str(bundled)
    if teacher is None:
        raise ArtifactError("the kohya format needs the base model's UNet config: pass --teacher (hub id or folder)")
    return teacher


def export(source: str, fmt: str, out: Path, teacher: str | None = None) -> Path:
    """Write ``source`` (LoRA folder or MLflow URI) as ``fmt`` to ``out``; returns ``out``."""
    if fmt not in FORMATS:
        raise ArtifactError(f"unknown export format '{fmt}' (formats: {', '.join(FORMATS)})")
    folder = resolve_lora(source)
    sd, meta = read_lora(folder)
    rank, alpha = int(meta["rank"]), float(meta["lora_alpha"])
    out = Path(out)
    if fmt == "kohya":
        if out.suffix != ".safetensors":
            raise ArtifactError(f"--out for the kohya format is one .safetensors file (got {out})")
        from diffusers import UNet2DConditionModel

        unet_config = SimpleNamespace(**UNet2DConditionModel.load_config(base_of(folder, teacher), subfolder="unet"))
        tensors = to_kohya(sd, alpha, unet_config)
        save_tensors(out, tensors, metadata={
            "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": "sdxl_base_v1-0" if unet_config.addition_embed_type == "text_time" else "sd_v1",
            "tlcm_stage": str(meta.get("stage", "")), "tlcm_scheduler": "TLCM: 2-8 steps, CFG 1 (see README)"})
    elif fmt == "peft":
        from peft import LoraConfig

        target_alpha = LoraConfig().lora_alpha  # what the official script's LoraConfig(r, target_modules) uses
        with atomic_dir(out) as d:
            save_tensors(d / "adapter_model.safetensors", to_peft(sd, alpha, target_alpha), metadata={"format": "pt"})
            LoraConfig(r=rank, lora_alpha=target_alpha, target_modules=list(meta["target_modules"])).save_pretrained(d)
            (d / META).write_text(json.dumps({**meta, "lora_alpha": target_alpha, "exported_from": str(source)},
                                             indent=2, default=str))
    else:
        with atomic_dir(out) as d:
            for f in (WEIGHTS, META):
                shutil.copy2(folder / f, d / f)
    log.info("export: %s (%d modules, rank %d) -> %s [%s]", source, len(lora_modules(sd)), rank, out, fmt)
    return out
