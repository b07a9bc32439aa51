"""The shipped LoRA as an MLflow Model (``pyfunc``, served by :mod:`tlcm.tracking.serving`).

Why a ``pyfunc`` ``PythonModel`` and not MLflow 3's ``mlflow.diffusers`` flavor: that flavor stores the
adapter and a base-model reference but no scheduler, and its pyfunc samples with the base pipeline's
own scheduler at 30 steps and CFG 7.5 (a TLCM LoRA is a 2-8 step sampler with CFG distilled); its
base reference is a string only (a local folder does not travel with the version, and it asks the Hub
for the revision at save time, which fails offline). Here the version carries the ``TLCMScheduler``
config and class, the step count and CFG-off defaults in its signature, and either the base folder
itself (the shapes-world teacher, a few MB) or its hub id + revision read from the local cache.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from tlcm.loaders.hub import hub_revision
from tlcm.core.params import Params
from tlcm.core.paths import Paths
from tlcm.loaders.teacher_io import resolve_teacher

log = logging.getLogger("tlcm")

SERVING_CODE = Path(__file__).with_name("serving.py")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
REQUIREMENTS = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "pillow", "pandas")
EXAMPLE_PROMPT = "a red circle left of a blue square on a white background"


def base_reference(source: str) -> dict:
    """How a version refers to its base model: ``bundle`` (a folder copied into the version), or a hub id
    (with the cached revision) or local path that the loading machine must have."""
    if Path(source, "model_index.json").is_file():
        return {"kind": "path", "base_model": str(Path(source).resolve())}
    return {"kind": "hub", "base_model": source, "base_revision": hub_revision(source)}


def sample_size(base: str) -> int:
    """The base pipeline's native image side (UNet sample size × VAE scale factor), from its config files."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.load_config(base, subfolder="unet")
    vae = AutoencoderKL.load_config(base, subfolder="vae")
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def signature(defaults: dict):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    types = {"num_inference_steps": DataType.integer, "guidance_scale": DataType.double, "seed": DataType.long,
             "height": DataType.integer, "width": DataType.integer}
    return ModelSignature(inputs=Schema([ColSpec(DataType.string)]),
                          outputs=Schema([ColSpec(DataType.binary, "image")]),
                          params=ParamSchema([ParamSpec(k, t, defaults[k]) for k, t in types.items()]))


def example_prompt(params: Params, paths: Paths) -> str:
    """A held-out prompt of the shapes world (or the example above for a real teacher)."""
    if params.teacher.source.trained and paths.prompts("eval").is_file():
        return json.loads(paths.prompts("eval").read_text().splitlines()[0])["caption"]
    return EXAMPLE_PROMPT


def save_pyfunc(params: Params, paths: Paths, lora: Path, out: Path, steps: int) -> dict:
    """Write the MLflow Model folder ``out`` (must not exist) for ``lora``; returns its ``model_config``."""
    import mlflow
    from diffusers import EulerDiscreteScheduler
    from mlflow.utils.requirements_utils import _get_pinned_requirement

    import models
    from models.scheduler import TLCMScheduler

    base = resolve_teacher(params.teacher.source, paths.teacher)
    side = sample_size(base)
    parts = out.parent / f".{out.name}.parts"  # named as the version's artifacts/<name> folders
    shutil.rmtree(parts, ignore_errors=True)
    TLCMScheduler.from_config(EulerDiscreteScheduler.load_config(base, subfolder="scheduler")).save_pretrained(
        parts / "scheduler")
    shutil.copytree(lora, parts / "lora")
    if params.teacher.source.trained:
        ref = {"kind": "bundle", "base_model": None}
        shutil.copytree(base, parts / "base")
    else:
        ref = base_reference(base)
        if ref["kind"] == "path":
            log.warning("register: the base model is the local folder %s; the version refers to it by path "
                        "(a machine that loads the version needs it there)", base)
    artifacts = {p.name: str(p) for p in sorted(parts.iterdir())}
    defaults = {"num_inference_steps": steps, "guidance_scale": 1.0, "seed": 0, "height": side, "width": side}
    config = {**ref, "torch_dtype": params.teacher.dtype, "defaults": defaults}  # frozen weights in teacher.dtype
    mlflow.pyfunc.save_model(
        path=str(out), python_model=str(SERVING_CODE), artifacts=artifacts, model_config=config,
        code_paths=[str(Path(models.__file__).parent)], signature=signature(defaults),
        input_example=([example_prompt(params, paths)], {"num_inference_steps": steps}),
        pip_requirements=[_get_pinned_requirement(p) for p in REQUIREMENTS],
        metadata={"tlcm.scheduler": "TLCMScheduler", "tlcm.base": ref["kind"]})
    shutil.rmtree(parts, ignore_errors=True)
    for junk in out.rglob("__pycache__"):
        shutil.rmtree(junk, ignore_errors=True)
    return config


def lora_folder(model_dir: Path) -> Path:
    """The LoRA folder of a downloaded version (``artifacts/lora``), or ``model_dir`` if it is a LoRA folder."""
    for cand in (model_dir, model_dir / "artifacts" / "lora"):
        if (cand / LORA_WEIGHTS).is_file():
            return cand
    from tlcm.core.storage import ArtifactError

    raise ArtifactError(f"no LoRA ({LORA_WEIGHTS}) in {model_dir} or its artifacts/lora")
