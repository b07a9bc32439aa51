"""A second device on a CPU-only machine, so that device mix-ups fail in CPU tests as they would on a GPU.

``FakeCuda`` is a :class:`torch.overrides.TorchFunctionMode`. A tensor is "on cuda:0" when its storage was
created by a move to ``cuda`` (``.to``, ``.cuda()``, ``Module.to``) or by a factory call with
``device=cuda``, or by an op on such tensors; physically every tensor stays on the CPU. Inside the mode:

* ``tensor.device`` / ``is_cuda`` / ``get_device()`` report ``cuda:0`` for those tensors (so code that
  places new tensors with ``device=x.device`` behaves as on a GPU), and ``Module.to("cuda")`` works;
* an op that mixes a cuda tensor with a CPU tensor of one or more dimensions raises
  :class:`DeviceMixup`, as CUDA does ("Expected all tensors to be on the same device"). What CUDA allows is
  allowed: 0-dim CPU tensors as scalars, CPU index tensors into a cuda tensor, a 0-dim cuda index into a CPU
  tensor, ``copy_`` across devices;
* ``.numpy()`` of a cuda tensor raises, and a CPU generator for a ``device=cuda`` draw raises, as on a GPU;
* gradients of cuda parameters (made by the autograd engine, which the mode does not see) count as cuda.

It records which device every UNet, VAE encoder/decoder, text-encoder and judge/reward/LPIPS forward ran on (``calls``), so a test
can also catch code that never moves a model to the device. Use :func:`fake_cuda` with pytest's ``monkeypatch``:
it makes :func:`tlcm.core.distributed.device` return ``cuda:0``, as it does under a GPU launch.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
# functions that take tensors of two devices without computing with them
NOT_ARITHMETIC = frozenset({"_has_compatible_shallow_copy_type", "is_same_size", "is_set_to", "__get__", "__set__",
                            "_is_view", "__hash__", "is_nonzero"})
WATCHED = frozenset({"UNet2DConditionModel", "Encoder", "Decoder", "CLIPTextModel", "CLIPTextModelWithProjection",
                     "AttributeNet", "LatentVGG", "ShapesReward", "TransformerEncoder", "MPSNet"})


class DeviceMixup(RuntimeError):
    """What CUDA would raise: tensors of one op on two devices, numpy of a cuda tensor, a CPU generator for cuda."""


def _getter(name: str):
    return torch._C.TensorBase.__dict__[name]


DEVICE, IS_CUDA, IS_CPU, GRAD, DATA = (_getter(n) for n in ("device", "is_cuda", "is_cpu", "grad", "data"))


def _is_cuda(d) -> bool:
    if isinstance(d, bool) or not isinstance(d, (int, str, torch.device)):
        return False
    if isinstance(d, int):
        return True  # a bare index means a CUDA device
    return torch.device(d).type == "cuda"


def _is_cpu(d) -> bool:
    return isinstance(d, (str, torch.device)) and torch.device(d).type == "cpu"


class FakeCuda(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self._tagged: dict[int, StorageWeakRef] = {}
        self.calls: list[tuple[str, str]] = []  # (module class, device type) of each watched forward
        self._hook = None

    # ---- which storages are on the fake device ------------------------------------------------------------------
    @staticmethod
    def _key(t: torch.Tensor) -> int | None:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_meta:
            return None
        try:
            return t.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError):
            return None

    def on(self, t) -> bool:
        key = self._key(t)
        ref = self._tagged.get(key) if key is not None else None
        return ref is not None and not ref.expired()

    def _tag(self, t: torch.Tensor) -> None:
        key = self._key(t)
        if key is not None:
            self._tagged[key] = StorageWeakRef(t.untyped_storage())
        if len(self._tagged) > 50_000:
            self._tagged = {k: r for k, r in self._tagged.items() if not r.expired()}

    def _to_cuda(self, out: torch.Tensor, sources: list[torch.Tensor]) -> torch.Tensor:
        """``out`` as a fresh cuda tensor: never tag a storage a CPU tensor still uses."""
        if self.on(out):
            return out
        if any(self._key(out) == self._key(s) for s in sources):
            out = out.clone()
        self._tag(out)
        return out

    def _to_cpu(self, out: torch.Tensor) -> torch.Tensor:
        return out.clone() if self.on(out) else out

    # ---- the mode ---------------------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = getattr(func, "__self__", None)
        if owner is DEVICE:
            return CUDA if self.on(args[0]) else func(*args)
        if owner is IS_CUDA:
            return self.on(args[0])
        if owner is IS_CPU:
            return not self.on(args[0])
        if owner is GRAD and getattr(func, "__name__", "") == "__get__":
            g = func(*args)
            if g is not None and self.on(args[0]) and not self.on(g):
                self._tag(g)
            return g
        if owner is DATA and getattr(func, "__name__", "") == "__set__":
            return func(*args, **kwargs)  # param.data = x: re-pointing, not arithmetic
        name = getattr(func, "__name__", "")
        if func is torch.Tensor.get_device:
            return 0 if self.on(args[0]) else -1
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and self.on(args[0]):
            raise DeviceMixup("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                              "to host memory first.")
        if func is torch.Tensor.to:
            return self._move(args, kwargs)
        if func is torch.Tensor.cuda:
            return self._to_cuda(args[0], [args[0]])
        if func is torch.Tensor.cpu:
            return self._to_cpu(args[0])
        if func is torch.Tensor.copy_ or name in NOT_ARITHMETIC:
            return func(*args, **kwargs)  # cross-device copies are allowed
        if "device" in kwargs and kwargs["device"] is not None:
            return self._factory(func, args, kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on = [t for t in tensors if self.on(t)]
        if not on or (name == "__getitem__" and not self.on(args[0]) and all(t.dim() == 0 for t in on)):
            return func(*args, **kwargs)  # (a 0-dim cuda index into a CPU tensor is read as a number)
        off = [t for t in tensors if not self.on(t) and t.dim() > 0 and not t.is_meta]
        if name == "__getitem__" and self.on(args[0]):
            off = []  # a cuda tensor indexed by CPU indices is allowed
        if off:
            raise DeviceMixup(f"{name or func}: expected all tensors to be on the same device, but found cuda:0 "
                              f"{[tuple(t.shape) for t in on][:3]} and cpu {[tuple(t.shape) for t in off][:3]}")
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not self.on(t):
                self._tag(t)
        return out

    def _move(self, args, kwargs):
        src = args[0]
        rest = args[1:]
        target_tensor = next((a for a in (*rest, kwargs.get("other")) if isinstance(a, torch.Tensor)), None)
        if target_tensor is not None:
            to_cuda, to_cpu, dtype = self.on(target_tensor), not self.on(target_tensor), target_tensor.dtype
        else:
            device, dtype, _, _ = torch._C._nn._parse_to(*[_cpu_if_cuda(a) for a in rest],
                                                        **{k: _cpu_if_cuda(v) for k, v in kwargs.items()})
            spec = kwargs.get("device", next((a for a in rest if isinstance(a, (str, torch.device, int))), None))
            to_cuda, to_cpu = _is_cuda(spec), _is_cpu(spec)
        out = src.to(dtype=dtype) if dtype is not None else src
        if to_cuda:
            return self._to_cuda(out, [src])
        if to_cpu:
            return self._to_cpu(out)
        if self.on(src) and not self.on(out):
            self._tag(out)
        return out

    def _factory(self, func, args, kwargs):
        device = kwargs["device"]
        gen = kwargs.get("generator")
        if _is_cuda(device) and gen is not None and gen.device.type == "cpu":
            raise DeviceMixup("Expected a 'cuda' device type for generator but found 'cpu'")
        out = func(*args, **{**kwargs, "device": "cpu" if _is_cuda(device) else device})
        sources = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if isinstance(out, torch.Tensor):
            return self._to_cuda(out, sources) if _is_cuda(device) else self._to_cpu(out)
        return out

    # ---- which device the big models ran on ---------------------------------------------------------------------------
    def _record(self, module, _args) -> None:
        name = type(module).__name__
        if name in WATCHED:
            p = next(module.parameters(), None)
            self.calls.append((name, "cuda" if p is not None and self.on(p) else "cpu"))

    def __enter__(self):
        self._hook = torch.nn.modules.module.register_module_forward_pre_hook(self._record)
        return super().__enter__()

    def __exit__(self, *exc):
        self._hook.remove()
        return super().__exit__(*exc)

    def devices_of(self, *names: str) -> set[str]:
        """The devices the watched modules called ``names`` ran on (every name if none given)."""
        return {d for n, d in self.calls if not names or n in names}


def _cpu_if_cuda(a):
    return "cpu" if _is_cuda(a) and not isinstance(a, bool) else a


@contextlib.contextmanager
def fake_cuda(monkeypatch) -> Iterator[FakeCuda]:
    """Run the block as a GPU process would: :func:`tlcm.core.distributed.device` is ``cuda:0`` (the fake one)."""
    from tlcm.core import distributed

    monkeypatch.setattr(distributed, "device", lambda: CUDA)
    with FakeCuda() as mode:
        yield mode
