"""Multi-process training: the same result on N processes as on one, at the same global batch and seed.

How a training step stays equivalent to the one-process step (every stage follows this contract):

1. every rank draws the GLOBAL batch (prompts, noise, timesteps) from the step's generator
   (:func:`tlcm.core.training.step_generator`), identically, on the CPU;
2. each rank keeps its contiguous shard, :func:`shard` (the global batch must divide by N);
3. the loss is a mean over the local shard, so the mean of the N local gradients
   (:func:`average_gradients`, what DDP's all-reduce computes) is the one-process gradient;
   clipping and the optimiser step then run identically on every rank;
4. :func:`tlcm.core.training.ensure_finite` is collective (a NaN on any rank stops every rank) and the
   loop logs the mean of the ranks' loss terms (the one-process value);
5. only the main process writes checkpoints and outputs (atomically); the others wait at
   :func:`barrier`. Checkpoints do not depend on N: a run resumes on any number of processes.

Launching the processes is :mod:`tlcm.core.launch`. Outside a launch (library calls, tests, ``tlcm run``)
everything here is the one-process identity.
"""
from __future__ import annotations

import os
from typing import Iterable, TypeVar

import torch

T = TypeVar("T")


class ShardError(ValueError):
    """The global batch cannot be split evenly over the processes."""


# ---- the process group ------------------------------------------------------------------

def launched() -> bool:
    """True inside ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def use_cpu() -> bool:
    """Processes train on the CPU: forced by ``ACCELERATE_USE_CPU``, or no CUDA device."""
    flag = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in {"1", "true", "yes"}
    return flag or not torch.cuda.is_available()


def state():
    """accelerate's ``PartialState`` (it initialises the gloo/NCCL group from the launcher's env once)."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu())


def world_size() -> int:
    """Number of training processes (1 outside a launch)."""
    return state().num_processes if launched() else 1


def rank() -> int:
    """This process's index, 0 on the main process."""
    return state().process_index if launched() else 0


def is_main() -> bool:
    """Only the main process writes checkpoints, outputs and records."""
    return rank() == 0


def device() -> torch.device:
    """The device this process trains on (its GPU under a GPU launch, else the CPU)."""
    if launched() or not use_cpu():
        d = state().device
        return torch.device("cpu") if d.type == "cpu" else d
    return torch.device("cpu")


def compute_record() -> dict:
    """Where this stage trains: device type, number of processes and torch threads per process (written to the
    stage's metrics; the benchmark's training-cost columns read it)."""
    return {"device": device().type, "world_size": world_size(), "torch_threads": torch.get_num_threads()}


def _group_active() -> bool:
    return launched() and torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    """Wait until every process gets here (no-op on one process)."""
    if launched():
        state().wait_for_everyone()


# ---- sharding the global batch ------------------------------------------------------------

def shard_slice(global_batch: int, n: int | None = None, r: int | None = None) -> slice:
    """The contiguous rows ``[r * B/n, (r+1) * B/n)`` of a global batch of ``global_batch`` rows."""
    n = world_size() if n is None else n
    r = rank() if r is None else r
    if global_batch % n:
        raise ShardError(f"global batch {global_batch} does not divide by {n} processes; "
                         f"use a batch size that is a multiple of {n}")
    k = global_batch // n
    return slice(r * k, (r + 1) * k)


def shard(x: T, n: int | None = None, r: int | None = None) -> T:
    """This process's contiguous shard of a tensor (first dim) or a sequence (a list for lists)."""
    return x[shard_slice(len(x), n, r)]


def check_batch(batch_size: int, what: str, n: int | None = None) -> None:
    """A clear error, early, when ``batch_size`` (the params key ``what``) cannot be split over N processes."""
    from tlcm.core.params import ParamsError

    n = world_size() if n is None else n
    if batch_size % n:
        raise ParamsError(f"'{what}' = {batch_size} is the global batch and must divide by the number of "
                          f"processes ({n}); choose a multiple of {n}")


# ---- collectives --------------------------------------------------------------------------

def _flat_all_reduce_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= world_size()
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].view_as(t).to(t.dtype))
        i += t.numel()
    return out


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace every ``.grad`` by its mean over the processes (one flat all-reduce; DDP's averaging).

    Call it after ``backward`` and before clipping / the optimiser step. A parameter that has a
    gradient on some process but not on this one counts as a zero gradient here; one that has
    none on any process keeps ``grad = None`` (the optimiser skips it, as on one process)."""
    if not _group_active():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    has = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=_collective_device())
    torch.distributed.all_reduce(has)
    params = [p for p, h in zip(params, has.tolist()) if h > 0]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if params:
        for p, g in zip(params, _flat_all_reduce_mean([p.grad for p in params])):
            p.grad.copy_(g)


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Every process's shard of a batch, concatenated in rank order (the global batch), with autograd.

    For a loss that couples the whole batch (contrastive negatives, batch statistics): every process
    computes the same global loss from the gathered rows; the backward sends each process the sum
    over processes of its own rows' gradient (N times the global loss's gradient, as every process
    computed it), so after :func:`average_gradients` every parameter holds the global loss's gradient
    (parameters used on every process on the whole batch get N identical gradients; their mean is it).
    Identity on one process."""
    if not _group_active():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), 0)


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """The mean of each named float over the processes (keys must match on every rank)."""
    if not _group_active() or not values:
        return values
    keys = sorted(values)
    flat = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(flat)
    return {k: float(v) / world_size() for k, v in zip(keys, flat.tolist())}


def any_process(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (a collective; every rank must call it)."""
    if not _group_active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)


def broadcast_from_main(tensors: Iterable[torch.Tensor]) -> None:
    """Copy the main process's values into ``tensors`` on every rank (start from identical weights)."""
    if not _group_active():
        return
    with torch.no_grad():
        for t in tensors:
            torch.distributed.broadcast(t.data, src=0)


def _collective_device() -> torch.device:
    return torch.device("cpu") if torch.distributed.get_backend() == "gloo" else device()
