"""The teacher-trajectory buffer of the MLCD-style stages (`mlcd`, `lcm_baseline`): Alg. 1's teacher side, paid once.

The teacher side of an MLCD pair, (z_tm, z_tn), depends on (prompt, ε, t_m) only, never on the student: pairs can be
made ahead and reused without going stale. Alg. 1 (``teacher_path: mds``) makes every pair from fresh noise: L = M − s
CFG-DDIM steps from z_T = ε to t_m (the multistep denoising strategy) and one of ``skip`` to t_n, on average
2·((M + 1)/2 + 1) = 11 teacher UNet evaluations per pair at M = 8 with CFG. The buffer (``teacher_path: buffer``) runs
each teacher trajectory once from pure noise to 0 in CFG-DDIM steps of ``skip`` through every milestone
(:func:`models.tlcm.buffer_path`) and keeps every state: each consecutive pair on it is an Alg. 1 pair, so a pair
costs about one CFG step (2.3 evaluations at skip 20, M = 8, every pair used once).

How it differs from Alg. 1:

1. z_tm is reached along the fine path (about (999 − t_m)/skip steps) instead of MDS's L = M − s coarse steps: a
   closer solution of the same CFG probability-flow ODE than the paper's cheaper approximation of it;
2. one (prompt, ε) yields one pair per t_m along its trajectory (about 1000/skip), used at different training steps
   (never two of one trajectory in a batch): a run sees ``buffer_trajectories / (buffer_refresh · batch_size)``
   distinct (prompt, ε) per pair instead of one.

Chunks: chunk c = ⌊step / buffer_refresh⌋ holds ``buffer_trajectories`` trajectories whose prompts, ε and offsets come
from a generator seeded by (seed, c), so a chunk is a pure function of the params, the teacher and c: a resumed run
regenerates the chunk it stopped in and continues exactly as an uninterrupted one (the checkpoint records this rule,
:class:`BufferRule`; the buffer params are in its fingerprint). Layout: trajectory i serves row i mod B of the global
batch (B = ``batch_size``); row b takes its column's pairs in a permutation drawn from the chunk's generator. Which
pairs a step uses does not depend on the number of processes, and process r generates and keeps only the
trajectories of its own rows (its shard of the global batch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.denoiser import encode_prompts
from models.tlcm import buffer_pair_mask, buffer_path, lower_milestone, teacher_trajectories
from tlcm.core import distributed as D
from tlcm.core.training import step_generator

BUFFER_SEED = 104_729  # chunk c draws from step_generator(seed + BUFFER_SEED, c), apart from the steps' (seed, step)


@dataclass(frozen=True)
class Chunk:
    """The draws of one chunk (identical on every process)."""
    prompt_idx: torch.Tensor  # (N,) into the prompt list
    eps: torch.Tensor  # (N, C, H, W) z_999 of each trajectory
    path: torch.Tensor  # (N, G) timesteps (models.tlcm.buffer_path)
    schedule: list[torch.Tensor]  # per batch row b: (refresh, 2) (trajectory, position j) of the pair at each step


def draw_chunk(c: int, seed: int, n_traj: int, batch: int, refresh: int, n_prompts: int, shape: tuple[int, ...],
               ms: list[int], skip: int) -> Chunk:
    """Chunk ``c``: prompts, ε and segment offsets of ``n_traj`` trajectories, and each batch row's pair schedule."""
    gen = step_generator(seed + BUFFER_SEED, c)
    prompt_idx = torch.randint(n_prompts, (n_traj,), generator=gen)
    eps = torch.randn((n_traj, *shape), generator=gen)
    path = buffer_path(ms, skip, torch.randint(skip, (n_traj, len(ms) - 1), generator=gen))
    mask = buffer_pair_mask(path, ms, skip)
    schedule = []
    for b in range(batch):
        pairs = mask[b::batch].nonzero()  # (k, j): trajectory k·B + b, pair at position j
        pairs[:, 0] = pairs[:, 0] * batch + b
        order = torch.cat([torch.randperm(len(pairs), generator=gen) for _ in range(math.ceil(refresh / len(pairs)))])
        schedule.append(pairs[order[:refresh]])
    return Chunk(prompt_idx, eps, path, schedule)


@dataclass
class Pairs:
    """This process's rows of one step's MLCD pairs (Alg. 1's (z_tm, z_tn, t_n, t_step^s) and the prompts)."""
    prompts: list[str]
    z_tm: torch.Tensor
    z_tn: torch.Tensor
    t_m: torch.Tensor
    t_n: torch.Tensor
    t_s: torch.Tensor


class BufferRule:
    """The buffer's entry in a checkpoint: not its tensors but the rule that regenerates them (a resumed run checks
    that the rule is the one it runs with)."""

    def __init__(self, p):
        self.rule = {"chunk": "step // buffer_refresh", "seed": p.seed + BUFFER_SEED, "trajectories": p.buffer_trajectories,
                     "refresh": p.buffer_refresh, "batch_size": p.batch_size, "skip": p.skip, "segments": p.num_segments}

    def state_dict(self) -> dict:
        return dict(self.rule)

    def load_state_dict(self, state: dict) -> None:
        if dict(state) != self.rule:
            raise ValueError(f"the checkpoint's teacher buffer was made by {state}, this run uses {self.rule}")


class TeacherBuffer:
    """Pairs for each step from the current chunk, regenerated when the step enters a new chunk."""

    def __init__(self, p, pipe, teacher, prompts: list[str], ms: list[int], shape: tuple[int, ...]):
        if p.buffer_trajectories % p.batch_size:
            raise ValueError("buffer_trajectories must be a multiple of batch_size")
        self.p, self.pipe, self.teacher, self.prompts, self.ms, self.shape = p, pipe, teacher, prompts, ms, shape
        self.rows = range(p.batch_size)[D.shard_slice(p.batch_size)]  # this process's rows of the global batch
        self.mine = [i for i in range(p.buffer_trajectories) if i % p.batch_size in self.rows]
        self.where = {i: k for k, i in enumerate(self.mine)}
        self.chunk_index, self.chunk, self.states = -1, None, None
        self.chunks_made = 0

    def _make(self, c: int) -> None:
        p, dev = self.p, D.device()
        self.chunk = draw_chunk(c, p.seed, p.buffer_trajectories, p.batch_size, p.buffer_refresh, len(self.prompts),
                                self.shape, self.ms, p.skip)
        self.states = None  # free the last chunk first
        parts, step = [], len(self.rows)
        for k in range(0, len(self.mine), step):
            idx = torch.tensor(self.mine[k:k + step])
            with torch.no_grad():
                cond = encode_prompts(self.pipe, [self.prompts[i] for i in self.chunk.prompt_idx[idx].tolist()])
            parts.append(teacher_trajectories(self.teacher, self.chunk.eps[idx].to(dev), self.chunk.path[idx], cond,
                                              p.guidance_scale))
        self.states, self.chunk_index = torch.cat(parts), c
        self.chunks_made += 1

    def pairs(self, step: int) -> Pairs:
        c, u = divmod(step, self.p.buffer_refresh)
        if c != self.chunk_index:
            self._make(c)
        sel = torch.stack([self.chunk.schedule[b][u] for b in self.rows])  # (local rows, 2)
        traj, j = sel[:, 0], sel[:, 1]
        local = torch.tensor([self.where[i] for i in traj.tolist()], device=self.states.device)
        jd = j.to(self.states.device)
        t_m = self.chunk.path[traj, j].to(self.states.device)
        t_n = self.chunk.path[traj, j + 1].to(self.states.device)
        return Pairs([self.prompts[i] for i in self.chunk.prompt_idx[traj].tolist()], self.states[local, jd],
                     self.states[local, jd + 1], t_m, t_n, lower_milestone(t_m, self.ms))

    def stats(self) -> dict:
        """Pairs per trajectory and how often each is used, for the stage's metrics."""
        p = self.p
        pairs = int(buffer_pair_mask(self.chunk.path, self.ms, p.skip).sum()) if self.chunk is not None else 0
        return {"trajectories_per_chunk": p.buffer_trajectories, "refresh_steps": p.buffer_refresh,
                "chunks_made": self.chunks_made, "trajectories_per_process": len(self.mine), "pairs_per_trajectory": pairs / max(1, p.buffer_trajectories),
                "uses_per_pair": p.buffer_refresh * p.batch_size / max(1, pairs)}
