"""TLCM's segment math (paper §4.1–4.2, Algorithms 1 and 2). Pure functions, no I/O.

Milestones ``t_step^s`` split [0, T] into M segments; for M = 8 and T = 1000 they are
0, 124, 249, 374, 499, 624, 749, 874, 999 (the official inference code's timesteps).
Segment ``s`` (0-based, s = 0 is the lowest) is ``(t_step^s, t_step^{s+1}]``; the student
``g_θ`` jumps from any t in it down to ``t_step^s`` with DDIM on its own x̂_0 (Eq. 7).
Milestone 0 is treated as the clean end: a jump "to 0" returns x̂_0 (ᾱ = 1), so that
``f_θ`` at t = 0 is the identity, as the paper's boundary condition requires.
"""
from __future__ import annotations

import torch

from models.denoiser import Cond, Denoiser
from models.diffusion import ddim_step, q_sample, x0_from_eps


def milestones(M: int = 8, T: int = 1000) -> list[int]:
    """``[t_step^0, ..., t_step^M]`` ascending: 0, then round(s T / M) − 1."""
    return [0] + [int(round(s * T / M)) - 1 for s in range(1, M + 1)]


def as_solver_t(t: int | torch.Tensor) -> torch.Tensor:
    """Milestone 0 is the clean end (t = −1 in :mod:`models.diffusion`)."""
    t = torch.as_tensor(t)
    return torch.where(t <= 0, torch.full_like(t, -1), t)


def segment_of(t: torch.Tensor, ms: list[int]) -> torch.Tensor:
    """0-based segment index s with ``ms[s] < t <= ms[s+1]`` (t = 0 maps to segment 0)."""
    edges = torch.tensor(ms[1:-1], device=t.device)
    return torch.bucketize(t, edges, right=False)


def lower_milestone(t: torch.Tensor, ms: list[int]) -> torch.Tensor:
    """``t_step^s`` for the segment that contains t."""
    return torch.tensor(ms, device=t.device)[segment_of(t, ms)]


def g_theta(student: Denoiser, z_t: torch.Tensor, t: torch.Tensor, t_s: torch.Tensor, c: Cond) -> torch.Tensor:
    """g_θ(z_t, t, t_step^s, c) = DDIM(z_t, f_θ(z_t, c, t), t, t_step^s)  (Eq. 7); no CFG (w is distilled)."""
    eps = student.eps(z_t, t, c)
    return ddim_step(z_t, eps, t, as_solver_t(t_s), student.alphas_cumprod)


def f_theta_x0(student: Denoiser, z_t: torch.Tensor, t: torch.Tensor, c: Cond) -> torch.Tensor:
    """x̂_0 of the student; the identity at t = 0 (boundary condition of Eq. 10)."""
    x0 = x0_from_eps(z_t, student.eps(z_t, t.clamp(min=0), c), as_solver_t(t), student.alphas_cumprod)
    clean = (t <= 0).view(-1, *([1] * (z_t.ndim - 1)))
    return torch.where(clean, z_t, x0)


@torch.no_grad()
def teacher_ddim_path(teacher: Denoiser, z: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor, n: torch.Tensor | int,
                      c: Cond, w: float) -> torch.Tensor:
    """``n`` uniform CFG-DDIM steps of the teacher from ``t_from`` to ``t_to`` (per sample; Eq. 8 when n = 1).

    Per-sample step counts: step i runs the UNet only on the samples that still have steps left
    (MDS with mixed segments costs the mean of L, not its maximum). Times are rounded to integers.
    """
    n = torch.as_tensor(n).expand(z.shape[0]).to(z.device)
    t_from, t_to = t_from.float(), t_to.float()
    dt = (t_from - t_to) / n.clamp(min=1)
    z = z.clone()
    for i in range(int(n.max())):
        idx = (i < n).nonzero().flatten()
        t1 = (t_from[idx] - i * dt[idx]).round().long()
        t2 = (t_from[idx] - (i + 1) * dt[idx]).round().long()
        eps = teacher.eps_cfg(z[idx], t1.clamp(min=0), c.take(idx), w)
        z[idx] = ddim_step(z[idx], eps, t1, as_solver_t(t2), teacher.alphas_cumprod)
    return z


def sample_t_mlcd(ms: list[int], n: int, gen: torch.Generator) -> torch.Tensor:
    """t_m of ``n`` MLCD pairs (Alg. 1, Eq. 6–7): segment s ~ U{0, …, M−1}, then t_m uniform over the integer
    timesteps of segment s, ``(t_step^s, t_step^{s+1}]``. Draws s, then one uniform per pair, from ``gen`` (CPU)."""
    edges = torch.tensor(ms)
    s = torch.randint(len(ms) - 1, (n,), generator=gen)
    lo, hi = edges[s], edges[s + 1]
    return lo + 1 + (torch.rand(n, generator=gen) * (hi - lo)).long().clamp(max=(hi - lo - 1))


def sample_t_ilcd(ms: list[int], n: int, gen: torch.Generator) -> torch.Tensor:
    """t_m of ``n`` iLCD samples (Alg. 2, Eq. 9): a milestone ``t_m ~ U{t_step^1, …, t_step^M}`` (never 0), to which
    ẑ_0 is forward-diffused. One draw per sample from ``gen`` (CPU)."""
    return torch.tensor(ms)[torch.randint(1, len(ms), (n,), generator=gen)]


def sample_t_uniform(ms: list[int], n: int, gen: torch.Generator) -> torch.Tensor:
    """t_m of ``n`` stage-2 samples over the entire range, ``t_m ~ U{1, …, t_step^M}`` (Table 2's L_lcd2, the
    ablation of iLCD's milestones). One draw per sample from ``gen`` (CPU)."""
    return torch.randint(1, ms[-1] + 1, (n,), generator=gen)


def one_segment_below(t_m: torch.Tensor, ms: list[int]) -> torch.Tensor:
    """L_lcd2's t_n: one segment length ``T/M`` below t_m, at least 0, so the pair crosses milestones
    (inter-segment consistency of f_θ over the whole range, Table 2 / §5.3)."""
    return (t_m - (ms[-1] + 1) // (len(ms) - 1)).clamp(min=0)


# Table 2's stage-2 rows: how t_m is drawn and where the teacher's p steps end (t_n).
STAGE2_TIMESTEPS = {"milestones": (sample_t_ilcd, lower_milestone),  # L_ilcd2 (Alg. 2)
                    "uniform": (sample_t_uniform, one_segment_below)}  # L_lcd2


def mds_steps(segment: torch.Tensor, M: int) -> torch.Tensor:
    """Multistep denoising strategy (Alg. 1): L = M − s teacher steps to reach t_m in segment s."""
    return M - segment


def single_step(segment: torch.Tensor, M: int) -> torch.Tensor:
    """Table 2's L_mlcd-s: z_{t_m} from ε by one teacher CFG-DDIM step, whatever the segment (no MDS)."""
    return torch.ones_like(segment)


# How Alg. 1 reaches z_{t_m} from z_T = ε (``mlcd.mds``): the paper's MDS, or its single-step ablation.
DENOISING = {"multi": mds_steps, "single": single_step}


def mlcd_pair(teacher: Denoiser, eps: torch.Tensor, t_m: torch.Tensor, skip: int, c: Cond, w: float, ms: list[int],
              T_start: int = 999, denoising=mds_steps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Algorithm 1's teacher side: (z_{t_m}, z_{t_n}, t_n, t_step^s).

    z_{t_m}: L = M − s CFG-DDIM steps from z_T = ε (MDS; ``denoising`` = :func:`single_step` for L_mlcd-s). z_{t_n}: one CFG-DDIM step of ``skip``
    (Eq. 8). Boundary: if t_n would reach or pass the segment's lower milestone, t_n is clamped
    to it, so the target g_θ(z_{t_n}, t_n, t_step^s) is the solver state z_{t_step^s} itself.
    """
    M = len(ms) - 1
    seg = segment_of(t_m, ms)
    t_s = torch.tensor(ms, device=t_m.device)[seg]
    z_tm = teacher_ddim_path(teacher, eps, torch.full_like(t_m, T_start), t_m, denoising(seg, M), c, w)
    t_n = torch.maximum(t_m - skip, t_s)
    z_tn = teacher_ddim_path(teacher, z_tm, t_m, t_n, 1, c, w)
    return z_tm, z_tn, t_n, t_s


def mlcd_terms(student: Denoiser, z_tm, z_tn, t_m, t_n, t_s, c: Cond, distance) -> dict[str, torch.Tensor]:
    """Eq. 7: d(g_θ(z_{t_m}), nograd g_θ(z_{t_n})); at the boundary (t_n = t_step^s) the target is z_{t_n}."""
    pred = g_theta(student, z_tm, t_m, t_s, c)
    with torch.no_grad():
        at_boundary = (t_n <= t_s).view(-1, *([1] * (z_tn.ndim - 1)))
        target = torch.where(at_boundary, z_tn, g_theta(student, z_tn, t_n, t_s, c))
    return {"consistency": distance(pred, target)}


def student_sample_x0(student: Denoiser, eps: torch.Tensor, q: int, c: Cond, T: int = 1000) -> torch.Tensor:
    """Algorithm 2's ẑ_0: q student steps from ε, re-noising each x̂_0 with the same ε."""
    z, t = eps, torch.full((eps.shape[0],), T - 1, device=eps.device)
    x0 = eps
    for i in range(q):
        x0 = x0_from_eps(z, student.eps(z, t, c), t, student.alphas_cumprod)
        t_next = T - T // q * (i + 1) - 1
        if t_next < 0:
            break
        t = torch.full_like(t, t_next)
        z = q_sample(x0, eps, t, student.alphas_cumprod)
    return x0


def ilcd_inputs(student: Denoiser, eps: torch.Tensor, noise: torch.Tensor, t_m: torch.Tensor, q: int, c: Cond
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9 (no grad): ẑ_0 = TLCM(ε, T, c) by q student steps, and ẑ_{t_m} = FD(ẑ_0, t_m)."""
    with torch.no_grad():
        z0 = student_sample_x0(student, eps, q, c)
        return z0, q_sample(z0, noise, t_m, student.alphas_cumprod)


def ilcd_target(student: Denoiser, teacher: Denoiser, z_tm: torch.Tensor, t_m: torch.Tensor, p: int, c: Cond, w: float,
                ms: list[int], t_n: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 10's target (no grad): ẑ_{t_n} by p teacher CFG-DDIM steps over one segment (to t_n = the lower
    milestone of t_m unless given: :func:`one_segment_below` for L_lcd2), then nograd f_θ(ẑ_{t_n})."""
    with torch.no_grad():
        t_n = lower_milestone(t_m, ms) if t_n is None else t_n
        z_tn = teacher_ddim_path(teacher, z_tm, t_m, t_n, p, c, w)
        return f_theta_x0(student, z_tn, t_n, c)


def ilcd_terms(student: Denoiser, teacher: Denoiser, eps: torch.Tensor, noise: torch.Tensor, t_m: torch.Tensor, q: int,
               p: int, c: Cond, w: float, ms: list[int], distance, t_n: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
    """Algorithm 2 / Eq. 10: ẑ_{t_m} = FD(nograd ẑ_0, t_m) (Eq. 9); ẑ_{t_n} by p teacher CFG-DDIM steps over
    one segment; loss d(f_θ(ẑ_{t_m}), nograd f_θ(ẑ_{t_n})) on x̂_0, f at t = 0 the identity."""
    _, z_tm = ilcd_inputs(student, eps, noise, t_m, q, c)
    target = ilcd_target(student, teacher, z_tm, t_m, p, c, w, ms, t_n)
    pred = f_theta_x0(student, z_tm, t_m, c)
    return {"consistency": distance(pred, target)}


# ---- the teacher-trajectory buffer's path (tasks/teacher_buffer.py) -------------------------------------------------

PAD = -2  # a buffered path's padding, after its end at t = 0


def buffer_path(ms: list[int], skip: int, offsets: torch.Tensor) -> torch.Tensor:
    """Timesteps (N, G) at which a buffered teacher trajectory keeps its state, descending, padded with ``PAD``:
    from t_step^M = 999 (z = ε) down to 0 through every milestone; in segment s, ``(t_step^s, t_step^{s+1}]``, first
    t_step^{s+1} − o_s (``offsets`` (N, M), o_s in [0, skip)), then every ``skip`` below it, then t_step^s. Each t in
    a segment lies on the path for exactly one of the ``skip`` offsets: t_m is uniform within segments, as in Alg. 1."""
    M = len(ms) - 1
    if skip >= min(b - a for a, b in zip(ms, ms[1:])):
        raise ValueError(f"skip = {skip} must be shorter than every segment ({ms})")
    rows = []
    for o in offsets.tolist():
        path = [ms[M]]
        for s in range(M - 1, -1, -1):
            t = ms[s + 1] - o[s]
            if o[s]:
                path.append(t)  # the positioning step (not a pair)
            t -= skip
            while t > ms[s]:
                path.append(t)
                t -= skip
            path.append(ms[s])
        rows.append(path)
    g = max(len(r) for r in rows)
    return torch.tensor([r + [PAD] * (g - len(r)) for r in rows], dtype=torch.long)


def buffer_states_per_trajectory(ms: list[int], skip: int) -> int:
    """The most states a buffered trajectory keeps (z_999 and one per CFG step), over every choice of offsets."""
    return 1 + sum(max(buffer_path([0, b - a], skip, torch.tensor([[o]])).shape[1] - 1 for o in range(skip))
                   for a, b in zip(ms, ms[1:]))


def buffer_pair_mask(path: torch.Tensor, ms: list[int], skip: int) -> torch.Tensor:
    """(N, G − 1): whether ``path[:, j] → path[:, j + 1]`` is a pair (t_m, t_n) of Alg. 1, i.e.
    t_n = max(t_m − skip, t_step^s) (False for a positioning step and for padding)."""
    t_m, t_n = path[:, :-1], path[:, 1:]
    live = (t_n != PAD) & (t_m > 0)
    return live & (t_n == torch.maximum(t_m - skip, lower_milestone(t_m.clamp(min=1), ms)))


@torch.no_grad()
def teacher_trajectories(teacher: Denoiser, eps: torch.Tensor, path: torch.Tensor, c: Cond, w: float) -> torch.Tensor:
    """The teacher's states (N, G, C, H, W) along ``path`` from z_999 = ε: one CFG-DDIM step (Eq. 8) per point."""
    path = path.to(eps.device)
    states = eps.new_zeros((path.shape[0], path.shape[1], *eps.shape[1:]))
    states[:, 0] = eps
    for j in range(path.shape[1] - 1):
        idx = (path[:, j + 1] != PAD).nonzero().flatten()
        if idx.numel() == 0:
            break
        states[idx, j + 1] = teacher_ddim_path(teacher, states[idx, j], path[idx, j], path[idx, j + 1], 1, c.take(idx), w)
    return states
