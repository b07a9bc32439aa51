"""Multi-process training: the same result on N processes as on one, at the same global batch and seed.

How a training step stays equivalent to the one-process step (every stage follows this contract):

1. every rank draws the GLOBAL batch (prompts, noise, timesteps) from the step's generator
   (:func:`tlcm.training.step_generator`), identically, on the CPU;
2. each rank keeps its contiguous shard, :func:`shard` (the global batch must divide by N);
3. the loss is a mean over the local shard, so the mean of the N local gradients
   (:func:`average_gradients`, what DDP's all-reduce computes) is the one-process gradient;
   clipping and the optimiser step then run identically on every rank;
4. :func:`tlcm.training.ensure_finite` is collective (a NaN on any rank stops every rank) and the
   loop logs the mean of the ranks' loss terms (the one-process value);
5. only the main process writes checkpoints and outputs (atomically); the others wait at
   :func:`barrier`. Checkpoints do not depend on N: a run resumes on any number of processes.

Launching: ``tlcm stage <name> --num-processes N`` re-launches itself with :func:`launch_command`:
on CPU ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N --num_machines 1``
(gloo; note that ``accelerate launch --cpu --num_processes N`` silently runs ONE process), on a GPU
worker the same without ``ACCELERATE_USE_CPU`` (NCCL, one process per GPU). Outside a launch
(library calls, tests, ``tlcm run``) everything here is the one-process identity.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from typing import Iterable, Sequence, TypeVar

import torch

from tlcm.stages import STAGES

log = logging.getLogger("tlcm")

T = TypeVar("T")
LAUNCHED_ENV = "TLCM_LAUNCHED"  # set by :func:`launch_command` in the children it starts
# Stages whose training loop follows the contract above (declared `multi_process` in tlcm/stages.py).
MULTI_PROCESS_STAGES = frozenset(s.name for s in STAGES if s.multi_process)


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
    from tlcm.params import ParamsError

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


# ---- launching ----------------------------------------------------------------------------

def default_num_processes() -> int:
    """What a worker should use: one process per CUDA device, else 1 (what the Prefect task calls)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the rendezvous port of one launch)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(args: Sequence[str], num_processes: int, cpu: bool | None = None,
                   port: int | None = None) -> tuple[list[str], dict[str, str]]:
    """``(argv, env)`` that runs ``python -m flows.cli <args>`` on ``num_processes`` processes.

    CPU: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N --num_machines 1 ...``
    (a real N-process gloo group); GPU: the same without ``ACCELERATE_USE_CPU`` (NCCL)."""
    if num_processes < 1:
        raise ValueError("num_processes must be >= 1")
    cpu = use_cpu() if cpu is None else cpu
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port or free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "flows.cli", *args]
    env = {**os.environ, LAUNCHED_ENV: "1"}
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    return argv, env


def launch(args: Sequence[str], num_processes: int, cpu: bool | None = None) -> int:
    """Run ``tlcm <args>`` on ``num_processes`` processes and wait; the launcher's exit code."""
    argv, env = launch_command(args, num_processes, cpu)
    log.info("launching %d processes (%s): tlcm %s", num_processes, "CPU, gloo" if env.get("ACCELERATE_USE_CPU") else
             "GPU", " ".join(args))
    return subprocess.run(argv, env=env).returncode


def launch_stage(stage: str, num_processes: int, params_file: str = "params.yaml", preset: str | None = None,
                 artifacts: str = "artifacts") -> None:
    """Run one stage on ``num_processes`` processes (e.g. from a Prefect task with
    ``num_processes=default_num_processes()``); raises ``RuntimeError`` if it fails."""
    args = stage_args(stage, params_file, preset, artifacts, num_processes)
    code = launch(args, num_processes)
    if code != 0:
        raise RuntimeError(f"`tlcm {' '.join(args)}` failed with exit code {code} (see the processes' log above)")


def stage_args(stage: str, params_file: str = "params.yaml", preset: str | None = None,
               artifacts: str = "artifacts", num_processes: int = 1) -> list[str]:
    """The ``tlcm`` arguments of one stage (what :func:`launch` takes; what the Prefect task can run)."""
    out = ["stage", stage, "--params", str(params_file), "--artifacts", str(artifacts),
           "--num-processes", str(num_processes)]
    return out + (["--preset", preset] if preset else [])


def join_process_group() -> None:
    """In a launched child: join the group, and keep the records to the main process (other ranks log
    warnings only and never open an MLflow run)."""
    if not launched():
        return
    st = state()
    if st.process_index != 0:
        os.environ["TLCM_TRACKING"] = "0"
        logging.getLogger("tlcm").setLevel(logging.WARNING)
        os.environ["TQDM_DISABLE"] = "1"
    log.info("process group: %d processes (%s), this is rank %d", st.num_processes, st.distributed_type,
             st.process_index)


def launch_or_join(num_processes: int, args: Sequence[str], params=None, stage: str | None = None) -> int | None:
    """What ``tlcm stage <stage> --num-processes N`` does first.

    Outside a launch with N > 1 and a training stage (:data:`MULTI_PROCESS_STAGES`): check that the
    stage's ``batch_size`` divides by N, re-launch ``tlcm <args>`` on N processes, wait, and return
    the launcher's exit code. Other stages run in this one process (None). Inside a launch
    (``accelerate launch``/``torchrun``, also without ``--num-processes``): join the process group
    and return None, so the caller runs the stage. N = 1 outside a launch: None (run in-process)."""
    if launched():
        if stage is not None and stage not in MULTI_PROCESS_STAGES:
            raise RuntimeError(f"stage '{stage}' does not run on several processes; run it without a launcher "
                               f"(multi-process stages: {', '.join(sorted(MULTI_PROCESS_STAGES))})")
        join_process_group()
        if num_processes > 1 and num_processes != world_size():
            log.warning("--num-processes %d but the launcher started %d processes", num_processes, world_size())
        return None
    if num_processes <= 1:
        return None
    if stage is not None and stage not in MULTI_PROCESS_STAGES:
        log.warning("stage '%s' runs in one process (--num-processes applies to %s)", stage,
                    ", ".join(sorted(MULTI_PROCESS_STAGES)))
        return None
    if os.environ.get(LAUNCHED_ENV):
        raise RuntimeError("a launched child sees WORLD_SIZE <= 1: the launcher did not start a process group")
    section = getattr(params, stage, None) if params is not None and stage else None
    if section is not None and hasattr(section, "batch_size"):
        check_batch(section.batch_size, f"{stage}.batch_size", num_processes)
    return launch(args, num_processes)
