"""Counting the UNet evaluations a stage's real code makes (what `tlcm plan` multiplies by FLOPs, and what the
consistency stages report per training pair).

:class:`UNetCounter` hooks one UNet and counts the rows (samples) it evaluates, by role: ``teacher`` (every adapter
off), the active LoRA adapter's name (``student``, ``fake``, ``critic``), each with gradient (autograd records the
call: grad mode on and the input or the adapter's weights require grad) or without, and
``encoder:<role>`` for encoder-only calls (the discriminator's ``conv_in`` + down + mid blocks, run outside a full
forward). A CFG call on [uncond, cond] is one call of 2 rows per sample: 2 evaluations, as `tlcm plan` counts them.
"""
from __future__ import annotations

from collections import Counter

import torch


class UNetCounter:
    """``with UNetCounter(unet) as c: ...`` then ``c.rows("teacher")``, ``c.rows("student", grad=True)``, ..."""

    def __init__(self, unet):
        self.unet = unet
        self.counts: Counter[tuple[str, bool]] = Counter()
        self._depth = 0
        self._tuner = None
        self._handles: list = []

    def _role(self) -> tuple[str, bool]:
        """(role, whether its weights train): the active adapter's LoRA requires grad."""
        if self._tuner is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._tuner = next((m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)), None)
        t = self._tuner
        if t is None or t.disable_adapters or not t.active_adapters:
            return "teacher", False
        names = sorted(t.active_adapters)
        lora_a = getattr(t, "lora_A", {})
        return "+".join(names), any(a in lora_a and lora_a[a].weight.requires_grad for a in names)

    def _key(self, x: torch.Tensor, prefix: str = "") -> tuple[str, bool]:
        """Grad = autograd records the call: grad mode on and the input or the active LoRA requires grad."""
        role, trains = self._role()
        return prefix + role, torch.is_grad_enabled() and (x.requires_grad or trains)

    def _pre(self, _module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        if self._depth == 0:
            self.counts[self._key(sample)] += sample.shape[0]
        self._depth += 1

    def _post(self, *_):
        self._depth -= 1

    def _conv_in(self, _module, args) -> None:
        if self._depth == 0:  # conv_in outside a full forward: models.gan.unet_encoder_features
            self.counts[self._key(args[0], "encoder:")] += args[0].shape[0]

    def __enter__(self) -> "UNetCounter":
        self._handles = [self.unet.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.unet.register_forward_hook(self._post, always_call=True),
                         self.unet.conv_in.register_forward_pre_hook(self._conv_in)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def rows(self, role: str, grad: bool | None = None) -> int:
        """Rows evaluated in ``role`` (with gradient, without, or both when ``grad`` is None)."""
        return sum(n for (r, g), n in self.counts.items() if r == role and (grad is None or g == grad))
