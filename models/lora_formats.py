"""The student LoRA in the formats other tools load (key renaming and scaling only; no I/O).

The trained LoRA is a diffusers/peft state dict: ``unet.<module>.lora_A.weight`` (r × in) and
``unet.<module>.lora_B.weight`` (out × r) with scale ``lora_alpha / r``, so that a module computes
``W x + (lora_alpha / r) · B A x``.

- **kohya** (ComfyUI, Automatic1111, kohya-ss): ``lora_unet_<module>.lora_down.weight`` (= A),
  ``.lora_up.weight`` (= B) and a scalar ``.alpha`` (the scale is ``alpha / r``). Module names follow
  kohya-ss: SDXL-shaped UNets (``addition_embed_type == "text_time"``) are named as in Stability's
  sgm UNet (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, ``in_layers.2`` for ``conv1``, ...),
  which is what kohya-ss writes for SDXL and what Automatic1111 expects; SD1.x-shaped UNets keep
  the diffusers names (kohya-ss trains SD1.x on the diffusers UNet). Dots become underscores.
- **peft** (the official TLCM inference: ``get_peft_model(unet, LoraConfig(r, target_modules))`` then
  ``unet.load_adapter(folder)``): ``base_model.model.<module>.lora_{A,B}.weight`` with
  ``adapter_config.json``. That script builds its ``LoraConfig`` with peft's default ``lora_alpha``
  (8) and ignores the folder's config, so B is rescaled to that alpha (B' = B · alpha / 8): the
  function is the same whether the folder is loaded that way or with ``PeftModel.from_pretrained``.
"""
from __future__ import annotations

import torch

RESNET_TO_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection"}
MID_TO_SGM = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}


def lora_modules(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The adapted module names (``down_blocks.1.attentions.0.proj_in``, ...) of a diffusers/peft LoRA state dict."""
    return sorted({k.removeprefix("unet.").rsplit(".lora_A.", 1)[0] for k in state_dict if ".lora_A." in k})


def sgm_module_name(module: str, layers_per_block: int) -> str:
    """A diffusers UNet module name as in the sgm (SDXL reference) UNet; the inverse of diffusers'
    ``_maybe_map_sgm_blocks_to_diffusers`` + ``_convert_unet_lora_key``."""
    p, n = module.split("."), layers_per_block + 1  # n: sgm blocks per resolution level
    if p[0] == "down_blocks" and p[2] == "downsamplers":  # down_blocks.i.downsamplers.0.conv
        head, rest = ["input_blocks", str((int(p[1]) + 1) * n), "0", "op"], p[5:]
    elif p[0] == "down_blocks":
        head, rest = ["input_blocks", str(1 + int(p[1]) * n + int(p[3])), "0" if p[2] == "resnets" else "1"], p[4:]
    elif p[0] == "mid_block":
        head, rest = ["middle_block", str(MID_TO_SGM[(p[1], int(p[2]))])], p[3:]
    elif p[0] == "up_blocks" and p[2] == "upsamplers":  # up_blocks.i.upsamplers.0.conv
        head, rest = ["output_blocks", str(int(p[1]) * n + n - 1), "2"], p[4:]
    elif p[0] == "up_blocks":
        head, rest = ["output_blocks", str(int(p[1]) * n + int(p[3])), "0" if p[2] == "resnets" else "1"], p[4:]
    else:
        raise ValueError(f"no sgm name for UNet module '{module}'")
    tail = ".".join(rest)
    if p[2] == "resnets" or (p[0] == "mid_block" and p[1] == "resnets"):
        tail = RESNET_TO_SGM.get(tail, tail)
    return ".".join(head + ([tail] if tail else []))


def to_kohya(state_dict: dict[str, torch.Tensor], lora_alpha: float, unet_config) -> dict[str, torch.Tensor]:
    """kohya-ss keys (``lora_unet_…``) with ``.alpha`` = ``lora_alpha`` for every adapted module."""
    sgm = getattr(unet_config, "addition_embed_type", None) == "text_time"
    out: dict[str, torch.Tensor] = {}
    for m in lora_modules(state_dict):
        name = sgm_module_name(m, unet_config.layers_per_block) if sgm else m
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = state_dict[f"unet.{m}.lora_A.weight"].contiguous()
        out[f"{key}.lora_up.weight"] = state_dict[f"unet.{m}.lora_B.weight"].contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(lora_alpha))
    return out


def to_peft(state_dict: dict[str, torch.Tensor], lora_alpha: float, target_alpha: float) -> dict[str, torch.Tensor]:
    """``PeftModel`` keys (``base_model.model.<module>.lora_{A,B}.weight``), B rescaled from ``lora_alpha`` to
    ``target_alpha`` (same rank, so the product (alpha / r) · B is unchanged)."""
    out = {}
    for m in lora_modules(state_dict):
        out[f"base_model.model.{m}.lora_A.weight"] = state_dict[f"unet.{m}.lora_A.weight"].contiguous()
        out[f"base_model.model.{m}.lora_B.weight"] = state_dict[f"unet.{m}.lora_B.weight"] * (lora_alpha / target_alpha)
    return out
