"""The student as the teacher UNet plus a LoRA adapter (peft), and adapter switching.

One UNet in memory serves as teacher (adapters disabled), student (adapter
``student``) and, in DM+GAN, the fake-score model (adapter ``fake``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from peft import LoraConfig

# The official TLCM / LCM-LoRA target set: attention, feed-forward, resnet convs and time projections.
LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)
STUDENT = "student"


def lora_config(rank: int, alpha: float | None = None) -> LoraConfig:
    """LoRA with ``lora_alpha == rank`` by default (what diffusers assumes when a file records no alpha)."""
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(LORA_TARGETS),
                      init_lora_weights="gaussian")


def add_lora(unet, rank: int, name: str = STUDENT, alpha: float | None = None) -> None:
    unet.add_adapter(lora_config(rank, alpha), adapter_name=name)


def lora_parameters(unet, name: str = STUDENT) -> list:
    return [p for n, p in unet.named_parameters() if f".{name}." in n and "lora_" in n]


@contextlib.contextmanager
def adapters_disabled(unet) -> Iterator[None]:
    """The plain teacher: every adapter off inside the block, restored after (a UNet without adapters is one)."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        yield
        return
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


@contextlib.contextmanager
def adapter_active(unet, name: str) -> Iterator[None]:
    """Run the UNet with only adapter ``name`` active."""
    previous = list(unet.active_adapters()) if hasattr(unet, "active_adapters") else [STUDENT]
    unet.set_adapter(name)
    try:
        yield
    finally:
        unet.set_adapter(previous if len(previous) > 1 else previous[0])


class FrozenTeacher:
    """The teacher ε_θ0 as a view of the shared UNet with every adapter disabled for each call.

    Same interface as :class:`models.denoiser.Denoiser` (``eps``, ``eps_cfg``, ``x0``)."""

    def __init__(self, denoiser):
        self._d = denoiser
        self.unet, self.alphas_cumprod = denoiser.unet, denoiser.alphas_cumprod

    def eps(self, z, t, c):
        with adapters_disabled(self.unet):
            return self._d.eps(z, t, c)

    def eps_cfg(self, z, t, c, w):
        with adapters_disabled(self.unet):
            return self._d.eps_cfg(z, t, c, w)

    def x0(self, z, t, c, w=1.0):
        with adapters_disabled(self.unet):
            return self._d.x0(z, t, c, w)
