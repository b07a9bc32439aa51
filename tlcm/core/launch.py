"""Starting N training processes: ``tlcm stage <name> --num-processes N`` re-launches itself with
:func:`launch_command`: on CPU ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N --num_machines 1``
(gloo; note that ``accelerate launch --cpu --num_processes N`` silently runs ONE process), on a GPU worker the same
without ``ACCELERATE_USE_CPU`` (NCCL, one process per GPU); each child joins the group (:func:`launch_or_join`) and
runs the stage under :mod:`tlcm.core.distributed`'s contract. Only the stages declared ``multi_process`` in
``tlcm/core/stages.py`` launch; the others run in one process.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from typing import Sequence

import torch

from tlcm.core.distributed import check_batch, launched, state, use_cpu, world_size
from tlcm.core.stages import STAGES

log = logging.getLogger("tlcm")

LAUNCHED_ENV = "TLCM_LAUNCHED"  # set by :func:`launch_command` in the children it starts
# Stages whose training loop follows tlcm.core.distributed's contract (declared `multi_process` in tlcm/core/stages.py).
MULTI_PROCESS_STAGES = frozenset(s.name for s in STAGES if s.multi_process)


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
