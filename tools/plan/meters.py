"""Measuring one call on the meta graph: FLOPs (:class:`torch.utils.flop_counter.FlopCounterMode`), the bytes
autograd saves for backward (:class:`SavedTensorMeter`, also a diffusers gradient-checkpointing function that books
what torch's non-reentrant checkpoint keeps), the peak live bytes of a no-grad call (:class:`LiveActivationBytes`),
with attention routed to the fused kernels an A100 runs (:func:`fused_attention`)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views share it)."""
    return t.untyped_storage()._cdata


def storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` to the fused kernels an A100 runs: flash for bf16/fp16 with head
    dim <= 256, memory-efficient otherwise (fp32; the VAE's single 512-dim head). Their autograd saves q, k, v, out and
    the log-sum-exp, not the (L × L) attention matrix of the math path a CPU/meta dispatch would pick. Calls with a
    mask or GQA keep the original function."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or enable_gqa:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        if query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] <= 256:
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                      False, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True, dropout_p,
                                                                      is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class SavedTensorMeter:
    """Books every tensor autograd saves (by storage, weights excluded) while active, split into the saves outside any
    checkpointed segment and per segment. Also a diffusers ``gradient_checkpointing_func``: pass
    :meth:`checkpoint` to ``enable_gradient_checkpointing``; each segment then runs once, without recomputation, and
    its tensor inputs are booked as what torch's non-reentrant checkpoint keeps alive."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.exclude = {storage_key(t) for t in exclude}
        self.outside: dict[int, torch.UntypedStorage] = {}
        self.inputs: dict[int, torch.UntypedStorage] = {}
        self.segments: list[dict[int, torch.UntypedStorage]] = []
        self._depth = 0

    def _book(self, t: torch.Tensor, into: dict[int, torch.UntypedStorage]) -> None:
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            key = storage_key(t)
            if key not in self.exclude:
                into.setdefault(key, t.untyped_storage())  # holding the storage keeps its key unique

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self._book(t, self.segments[-1] if self._depth else self.outside)
        return t

    def checkpoint(self, module: Callable, *args: Any) -> Any:
        if self._depth == 0:
            for a in args:
                self._book(a, self.inputs)
            self.segments.append({})
        self._depth += 1
        try:
            return module(*args)
        finally:
            self._depth -= 1

    @contextlib.contextmanager
    def active(self) -> Iterator["SavedTensorMeter"]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self

    @staticmethod
    def _bytes(*groups: dict[int, torch.UntypedStorage]) -> int:
        merged: dict[int, torch.UntypedStorage] = {}
        for g in groups:
            merged.update(g)
        return sum(s.nbytes() for s in merged.values())

    @property
    def saved_bytes(self) -> int:
        """Without checkpointing: everything saved, each storage once."""
        return self._bytes(self.outside, *self.segments)

    @property
    def checkpointed_bytes(self) -> int:
        """With checkpointing, held from forward to backward: saves outside segments + segment inputs."""
        return self._bytes(self.outside, self.inputs)

    @property
    def largest_segment_bytes(self) -> int:
        """The largest segment's own saves: re-created, one segment at a time, during backward."""
        return max((self._bytes(s) for s in self.segments), default=0)


class LiveActivationBytes(TorchDispatchMode):
    """Peak bytes of the storages ops create and that are still referenced (inputs and weights not counted)."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.known = {storage_key(t) for t in exclude}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs or {})):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and storage_key(t) not in self.live:
                self.known.add(storage_key(t))
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                key = storage_key(t)
                if key not in self.known and key not in self.live:
                    self.live[key] = (StorageWeakRef(t.untyped_storage()), storage_bytes(t))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


@dataclass(frozen=True)
class CallCost:
    """One network call at batch 1 on the meta graph. Zero where not measured (a no-grad-only call has no saves)."""
    fwd_flops: int
    bwd_flops: int = 0
    saved_bytes: int = 0
    saved_bytes_ckpt: int = 0
    segment_bytes: int = 0
    peak_nograd_bytes: int = 0


def measure_grad_call(call: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor],
                      meter: SavedTensorMeter | None = None) -> CallCost:
    """Forward (with grad) + backward of ``call()`` counted: FLOPs of each, and the saved-for-backward bytes.
    ``meter``: a :class:`SavedTensorMeter` already installed as the model's checkpoint function (else a fresh one,
    and the checkpointed numbers equal the plain ones)."""
    meter = meter or SavedTensorMeter(exclude)
    meter.exclude |= {storage_key(t) for t in exclude}
    with fused_attention():
        with FlopCounterMode(display=False) as fwd, meter.active():
            out = call()
        with FlopCounterMode(display=False) as bwd:
            out.float().sum().backward()
    ckpt = meter.checkpointed_bytes if meter.segments else meter.saved_bytes
    return CallCost(fwd.get_total_flops(), bwd.get_total_flops(), meter.saved_bytes, ckpt, meter.largest_segment_bytes)


def measure_checkpointed(model, call: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> CallCost:
    """:func:`measure_grad_call` with the diffusers model's own gradient checkpointing routed through a
    :class:`SavedTensorMeter` (one pass gives the plain and the checkpointed numbers)."""
    meter = SavedTensorMeter(exclude)
    model.enable_gradient_checkpointing(meter.checkpoint)
    try:
        return measure_grad_call(call, exclude, meter)
    finally:
        model.disable_gradient_checkpointing()


def measure_nograd_call(call: Callable[[], Any], exclude: Iterable[torch.Tensor]) -> CallCost:
    """FLOPs and peak live activation bytes of ``call()`` under ``torch.no_grad``."""
    tracker = LiveActivationBytes(exclude)
    with fused_attention(), torch.no_grad(), FlopCounterMode(display=False) as fc, tracker:
        call()
    return CallCost(fc.get_total_flops(), peak_nograd_bytes=tracker.peak)


def module_tensors(*modules: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer (their storages are weights, not activations)."""
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def meta(shape: tuple[int, ...], dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    return torch.zeros(shape, device="meta", dtype=dtype, requires_grad=grad)
