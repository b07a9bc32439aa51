"""Loading the teacher exactly as one loads SDXL: ``from_pretrained(hub id or folder)``."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from tlcm.core.storage import ArtifactError

if TYPE_CHECKING:  # tlcm.core.params needs pydantic; the GPU check imports this module without it
    from tlcm.core.params import Source

log = logging.getLogger("tlcm")

BUILD_HINT = ("build the embedded default with `tlcm stage teacher` (or `dvc repro teacher`), "
              "or set teacher.source in params.yaml to a hub id or a local SDXL/SD1.5 folder")


def _corrupt_files(folder: Path) -> list[Path]:
    bad = []
    for f in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    h.get_tensor(k)
        except Exception:  # noqa: BLE001 - any failure to read means the file is unusable
            bad.append(f)
    return bad


def resolve_teacher(source: Source, artifacts_teacher: Path) -> str:
    """Where to load ``teacher.source`` from: the shapes-world teacher this project builds (``artifacts_teacher``)
    when trained here, else the folder or hub id given."""
    return source.resolve(artifacts_teacher)


def load_teacher(source: str, dtype: torch.dtype = torch.float32):
    """A ``DiffusionPipeline`` (SDXL or SD1.5 style) from a local folder or hub id, with clear errors."""
    from diffusers import DiffusionPipeline

    path = Path(source)
    looks_local = path.is_absolute() or source.startswith(".") or path.exists() or source.count("/") != 1
    if looks_local and not (path / "model_index.json").is_file():
        raise ArtifactError(f"teacher not found: no model_index.json in '{source}'; {BUILD_HINT}")
    try:
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - rephrased with the file that failed
        if path.is_dir():
            bad = _corrupt_files(path)
            if bad:
                raise ArtifactError(f"teacher weight file is corrupt: {bad[0]}; {BUILD_HINT}") from e
        raise ArtifactError(f"could not load the teacher from '{source}': {e}. "
                            "For a hub id, download it first (huggingface-cli download) and point teacher.source at the "
                            f"folder, or {BUILD_HINT}") from e
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)):
        if m is not None:
            m.requires_grad_(False).eval()
    return pipe


def frozen_dtype(teacher_params) -> torch.dtype:
    """``teacher.dtype``: the dtype of every frozen network (teacher UNet, VAE, text encoders, scorers)."""
    return getattr(torch, teacher_params.dtype)


def upcast_vae(vae, always: bool) -> None:
    """SDXL's VAE overflows in float16 (its config says ``force_upcast``): decode it in float32, as diffusers'
    pipelines do. ``always``: also from bf16 (sampling: one decode per image, so float32 costs little); training
    (``mps``, decoder activations kept for backward) upcasts only from float16."""
    if vae.config.get("force_upcast", False) and vae.dtype != torch.float32 and (always or vae.dtype == torch.float16):
        vae.to(torch.float32)


def decode_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (float32) from latents: ``D(z / s)`` in the VAE's dtype (autocast off for a float32 VAE,
    so an upcast VAE really decodes in float32 inside a mixed-precision step); gradients flow to ``z``."""
    z = (z / vae.config.scaling_factor).to(vae.dtype)
    off = vae.dtype == torch.float32 and torch.is_autocast_enabled(z.device.type)
    with torch.autocast(z.device.type, enabled=False) if off else contextlib.nullcontext():
        return vae.decode(z).sample.float()


def load_for_sampling(source: str, dtype: torch.dtype = torch.float32, device: torch.device | None = None):
    """The pipeline as the benchmark and `tlcm generate` sample it: frozen weights in ``dtype`` (``teacher.dtype``)
    on ``device`` (default: the process's, :func:`tlcm.core.distributed.device`: its GPU, else the CPU), the VAE in
    float32 where the model asks for it."""
    from tlcm.core import distributed

    pipe = load_teacher(source, dtype=dtype)
    pipe.to(distributed.device() if device is None else device)
    upcast_vae(pipe.vae, always=True)
    return pipe


def load_frozen_teacher(teacher_params, artifacts_teacher: Path):
    """The teacher as the distillation stages use it: frozen weights in ``teacher.dtype`` and, with
    ``teacher.gradient_checkpointing``, the activations of the UNet and of the VAE decoder (`mps` backpropagates
    through it) recomputed in backward (the SDXL memory plan, `tlcm plan`, assumes both)."""
    pipe = load_teacher(resolve_teacher(teacher_params.source, artifacts_teacher), dtype=frozen_dtype(teacher_params))
    if teacher_params.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        pipe.vae.enable_gradient_checkpointing()
    return pipe


def autocast(teacher_params, device: torch.device):
    """Mixed precision for a training step when the frozen weights are not float32 (a no-op otherwise)."""
    dtype = frozen_dtype(teacher_params)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def float32_(params: list) -> None:
    """Trainable adapter weights stay float32 (with their optimiser state) whatever the frozen weights' dtype."""
    for q in params:
        q.data = q.data.float()
