"""The registered TLCM model as an MLflow ``pyfunc`` (MLflow "models from code": this file is copied into
every registered version and executed when the version is loaded; it imports nothing from ``tlcm``).

``mlflow.pyfunc.load_model("models:/tlcm-shapes@champion").predict(["a red circle ..."])`` returns one
PNG (bytes) per prompt; ``mlflow models serve`` answers ``/invocations`` with them base64-encoded.
Params (all optional; defaults are the version's own, in its signature): ``num_inference_steps``
(the TLCM step count ``register`` chose), ``guidance_scale`` (1.0: CFG off, it is distilled into the
LoRA), ``seed``, ``height``, ``width``.

What the version carries (``context.artifacts`` / ``context.model_config``): ``lora`` (the diffusers
LoRA folder), ``scheduler`` (the ``TLCMScheduler`` config, fitted to the base model's noise schedule;
the class itself is in the version's ``code/models``), and the base model: the folder itself under
``base`` when it is this project's shapes-world teacher, else ``base_model`` (hub id, with
``base_revision`` when it was resolved from the local cache, or a local path). ``model_config`` at load
time may override ``base_model``, ``device`` and ``torch_dtype``.
"""
from __future__ import annotations

import io

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel


def prompts_of(model_input) -> list[str]:
    """Prompts from what pyfunc hands over: a list, a string, a ``{"prompt": ...}`` dict or a DataFrame."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        col = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        model_input = model_input[col].tolist()
    elif isinstance(model_input, dict):
        model_input = model_input.get("prompt", [])
    if isinstance(model_input, str):
        model_input = [model_input]
    flat = [p for x in model_input for p in (x if isinstance(x, list) else [x])]
    if not flat or not all(isinstance(p, str) and p for p in flat):
        raise MlflowException.invalid_parameter_value("input must be one or more non-empty prompt strings")
    return flat


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class TLCMModel(PythonModel):
    """Base pipeline + fused TLCM LoRA + ``TLCMScheduler``, sampling with CFG off by default."""

    def load_context(self, context):
        import torch
        from diffusers import DiffusionPipeline

        from models.scheduler import TLCMScheduler

        cfg = dict(context.model_config or {})
        self.defaults = cfg.get("defaults", {})
        self.device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, cfg.get("torch_dtype", "float32"))
        base = cfg.get("base_model_override") or context.artifacts.get("base") or cfg["base_model"]
        kw = {"revision": cfg["base_revision"]} if cfg.get("base_revision") and base == cfg.get("base_model") else {}
        try:
            pipe = DiffusionPipeline.from_pretrained(base, torch_dtype=dtype, use_safetensors=True, **kw)
        except OSError as e:
            raise MlflowException(f"could not load the base model '{base}' ({e}); if it has moved, load with "
                                  "model_config={'base_model_override': '<hub id or folder>'}") from e
        pipe.load_lora_weights(context.artifacts["lora"])
        pipe.fuse_lora()  # merged: the same function, no LoRA cost per step
        pipe.scheduler = TLCMScheduler.from_pretrained(context.artifacts["scheduler"])
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)

    def predict(self, context, model_input, params=None):
        import torch

        p = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
        prompts = prompts_of(model_input)
        gen = torch.Generator(self.device).manual_seed(int(p["seed"]))
        try:
            with torch.inference_mode():
                out = self.pipe(prompts, num_inference_steps=int(p["num_inference_steps"]),
                                guidance_scale=float(p["guidance_scale"]), height=int(p["height"]),
                                width=int(p["width"]), generator=gen)
        except ValueError as e:  # e.g. a step count outside 1..8: a 400 with the reason, not a 500
            raise MlflowException.invalid_parameter_value(str(e)) from None
        return [png_bytes(im) for im in out.images]


mlflow.models.set_model(TLCMModel())
