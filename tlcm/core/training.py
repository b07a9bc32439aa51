"""The one training loop every stage uses: resume, checkpoints, NaN guard, progress, logs.

A stage supplies ``step_fn(step) -> dict[str, float]`` (it computes its
named loss terms, calls :func:`ensure_finite` on them *before* it updates any
weight, then steps its optimisers with :func:`optimizer_step`) and the objects whose
``state_dict()`` make up its state. Data and noise must be a function of
``step`` (see :func:`step_generator`) so that a resumed run continues
exactly as an uninterrupted one would.

Under ``accelerate launch`` (see :mod:`tlcm.core.distributed`) the loop logs the mean of the
processes' loss terms, only the main process writes checkpoints (the others wait), and
:func:`ensure_finite` stops every process together.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch
from tqdm.auto import tqdm

from tlcm.core import distributed
from tlcm.tracking import runs as tracking
from tlcm.core.checkpoints import Checkpointer
from tlcm.core.seeds import mix_seed

log = logging.getLogger("tlcm")


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or inf."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> Any: ...


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: Iterable[torch.nn.Parameter],
                   max_norm: float | None) -> None:
    """One optimiser step of a training stage: zero the gradients, backward ``loss`` (a mean over this
    process's shard), average the gradients over the processes (:func:`tlcm.core.distributed.average_gradients`:
    the one-process gradient of the global mean), clip their norm to ``max_norm`` (None: no clipping), step."""
    params = list(params)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    distributed.average_gradients(params)
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator that depends only on (seed, step)."""
    return torch.Generator(device=device).manual_seed(mix_seed(seed, step, 2**63 - 1))


def ensure_finite(terms: dict[str, torch.Tensor], stage: str, step: int) -> None:
    """Raise :class:`NonFiniteLoss` if a loss term is NaN/inf. Collective under a launch: a non-finite
    term on any process stops every process (none of them steps), so no rank waits forever."""
    bad = [(k, v) for k, v in terms.items() if not torch.isfinite(v.detach()).all()]
    if distributed.any_process(bool(bad)):
        if bad:
            k, v = bad[0]
            raise NonFiniteLoss(f"{stage}: loss term '{k}' is {v.detach().flatten()[0].item()} at step {step}")
        raise NonFiniteLoss(f"{stage}: a loss term is not finite on another process at step {step}")


@dataclass
class LoopResult:
    steps_done: int
    resumed_from: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


def run_loop(
    stage: str,
    total_steps: int,
    step_fn: Callable[[int], dict[str, float]],
    state: dict[str, Stateful],
    checkpointer: Checkpointer,
    checkpoint_every: int,
    log_every: int = 50,
    max_minutes: float = 0.0,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    show_progress: bool = True,
) -> LoopResult:
    """Run ``step_fn`` from the last checkpoint to ``total_steps``.

    Saves a checkpoint every ``checkpoint_every`` steps and at the end (also
    when ``max_minutes`` runs out). A non-finite loss stops the stage and
    leaves the last good checkpoint untouched.
    """
    start = 0
    found = checkpointer.load(max_step=total_steps)
    if found is not None:
        start, saved = found
        for k, obj in state.items():
            obj.load_state_dict(saved[k])
        log.info("%s: resumed from checkpoint at step %d/%d (%s)", stage, start, total_steps, checkpointer.folder)

    def save(step: int) -> None:
        if distributed.is_main():
            checkpointer.save(step, {k: obj.state_dict() for k, obj in state.items()})
        distributed.barrier()

    t0 = time.monotonic()
    history: list[dict[str, float]] = []
    running: dict[str, float] = {}
    stopped_early = False
    bar = tqdm(range(start, total_steps), desc=stage, initial=start, total=total_steps,
               disable=not (show_progress and distributed.is_main()), dynamic_ncols=True, mininterval=2.0)
    step = start
    for step in bar:
        try:
            terms = step_fn(step)
        except NonFiniteLoss as e:
            raise NonFiniteLoss(
                f"{e}. Stopped; the last good checkpoint in {checkpointer.folder} is kept. "
                f"Lower the learning rate ('{stage}.lr' in params.yaml) or check the inputs, then re-run: "
                "the stage resumes from that checkpoint."
            ) from None
        terms = distributed.mean_over_processes(terms)
        for k, v in terms.items():
            running[k] = running.get(k, 0.0) + float(v)
        done = step + 1
        if done % log_every == 0 or done == total_steps:
            n = log_every if done % log_every == 0 else (done - start) % log_every or log_every
            avg = {k: v / n for k, v in running.items()}
            running = {}
            history.append({"step": done, **avg})
            bar.set_postfix({k: f"{v:.4g}" for k, v in avg.items()})
            tracking.log_step(stage, done, avg)
            if on_log:
                on_log(done, avg)
        if done % checkpoint_every == 0 and done < total_steps:
            save(done)
        if max_minutes and done < total_steps and distributed.any_process(time.monotonic() - t0 > 60 * max_minutes):
            log.warning("%s: max_minutes=%s reached at step %d/%d; saving and stopping", stage, max_minutes, done, total_steps)
            save(done)
            stopped_early = True
            break
    else:
        step = total_steps - 1
    bar.close()
    done = step + 1 if total_steps > start else start
    if not stopped_early and done > start:  # a resumed run that trained nothing has its checkpoint already
        save(done)
    return LoopResult(done, start, time.monotonic() - t0, history, stopped_early)


def cosine_warmup(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
