"""The teacher-trajectory buffer (tasks/teacher_buffer.py, models/tlcm.py): its pairs are Alg. 1's pairs, t_m is
uniform within segments, a chunk is a function of (seed, chunk), and a killed run resumes exactly."""
import json

import pytest
import torch

from models.tlcm import PAD, buffer_pair_mask, buffer_path, milestones


def test_every_t_is_a_pair_start_for_exactly_one_offset():
    """Over the `skip` offsets of a segment, every t in (t_s, t_{s+1}] starts exactly one pair, t = 0 none; every
    path runs from 999 through every milestone to 0; a pair's t_n is max(t_m − skip, t_s)."""
    for M, skip in ((8, 20), (1, 20), (8, 7)):
        ms = milestones(M)
        hits = torch.zeros(1000, dtype=torch.long)
        for o in range(skip):
            path = buffer_path(ms, skip, torch.full((1, M), o))
            live = path[0][path[0] != PAD].tolist()
            assert live[0] == 999 and live[-1] == 0 and set(ms) <= set(live) and live == sorted(live, reverse=True)
            mask = buffer_pair_mask(path, ms, skip)[0]
            hits[path[0, :-1][mask]] += 1
            t_m, t_n = path[0, :-1][mask], path[0, 1:][mask]
            assert ((t_m - t_n <= skip) & (t_n >= 0)).all()
        assert hits[0] == 0 and (hits[1:] == 1).all(), (M, skip)
    with pytest.raises(ValueError, match="shorter than every segment"):
        buffer_path(milestones(8), 125, torch.zeros((1, 8), dtype=torch.long))


@pytest.fixture(scope="module")
def tiny(smoke_params):
    from tools.rig import tiny_networks

    return tiny_networks(smoke_params)


def test_buffered_pairs_are_alg1_pairs(tiny, smoke_params):
    """z_tn of a buffered pair is one teacher CFG-DDIM step (Eq. 8) from its z_tm, as Alg. 1 makes it; the pairs
    a step uses are the same whatever the number of processes (rows come from their own trajectories)."""
    from models.denoiser import Denoiser, encode_prompts
    from models.lora import FrozenTeacher
    from models.tlcm import teacher_ddim_path
    from tasks.teacher_buffer import TeacherBuffer, draw_chunk

    pipe = tiny.pipe
    teacher = FrozenTeacher(Denoiser(pipe.unet, pipe.scheduler.alphas_cumprod))
    # skip 100 (< 1000 / M): ~14 CFG steps per trajectory instead of ~57 at skip 20, same code path
    p = smoke_params.mlcd.model_copy(update={"teacher_path": "buffer", "batch_size": 4, "buffer_trajectories": 8,
                                             "buffer_refresh": 5, "skip": 100})
    ms = milestones(p.num_segments)
    buf = TeacherBuffer(p, pipe, teacher, tiny.prompts, ms, (4, 8, 8))
    for step in (0, 4, 5):
        b = buf.pairs(step)
        assert (b.t_n == torch.maximum(b.t_m - p.skip, b.t_s)).all() and len(b.prompts) == 4
        with torch.no_grad():
            again = teacher_ddim_path(teacher, b.z_tm, b.t_m, b.t_n, 1, encode_prompts(pipe, b.prompts),
                                      p.guidance_scale)
        assert torch.allclose(again, b.z_tn, atol=1e-5)
    assert buf.chunks_made == 2  # steps 0-4 use chunk 0, step 5 starts chunk 1
    a, b = (draw_chunk(0, p.seed, 8, 4, 5, 64, (4, 8, 8), ms, p.skip) for _ in range(2))
    assert torch.equal(a.eps, b.eps) and torch.equal(a.path, b.path)
    assert all(torch.equal(x, y) for x, y in zip(a.schedule, b.schedule))
    c1 = draw_chunk(1, p.seed, 8, 4, 5, 64, (4, 8, 8), ms, p.skip)
    assert not torch.equal(a.eps, c1.eps)
    for row, sched in enumerate(a.schedule):  # row b only ever uses trajectories b, b + B, ...
        assert (sched[:, 0] % 4 == row).all() and len({tuple(x) for x in sched.tolist()}) == len(sched)


def _params(smoke_params, steps: int):
    return smoke_params.model_copy(update={"mlcd": smoke_params.mlcd.model_copy(update={
        "teacher_path": "buffer", "loss": "mse", "batch_size": 2, "buffer_trajectories": 4, "buffer_refresh": 3,
        "skip": 100, "steps": steps, "checkpoint_every": 2, "eval_every": 0})})


def test_buffered_mlcd_resumes_exactly(smoke_artifacts, smoke_params, tmp_path_factory):
    """4 steps in one go == 2 steps, killed, resumed to 4 (the resumed run regenerates chunk 0 from its rule and
    continues at its third step); the checkpoint holds the rule; teacher evaluations per pair are counted."""
    from safetensors.torch import load_file

    from tasks.registry import run_stage
    from tlcm.core.paths import Paths

    roots = []
    for name in ("buffer_once", "buffer_resumed"):
        root = tmp_path_factory.mktemp(name)
        for d in ("world", "teacher"):
            (root / d).symlink_to(getattr(smoke_artifacts, d))
        roots.append(Paths(root))
    run_stage("mlcd", _params(smoke_params, 4), roots[0])
    run_stage("mlcd", _params(smoke_params, 2), roots[1])
    (pointer,) = roots[1].checkpoints("mlcd").glob("*/latest.json")  # one folder per run identity
    ckpt = json.loads(pointer.read_text())
    assert ckpt["step"] == 2
    run_stage("mlcd", _params(smoke_params, 4), roots[1])
    a, b = (load_file(r.lora("mlcd") / "pytorch_lora_weights.safetensors") for r in roots)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    m = json.loads((roots[0].metrics / "mlcd.json").read_text())
    assert m["teacher_path"] == "buffer" and m["buffer"]["chunks_made"] == 2
    # every CFG step of chunks 0 and 1 (2 evaluations each) over the 4 steps x 2 pairs they served
    from models.tlcm import PAD
    from tasks.teacher_buffer import draw_chunk

    p = _params(smoke_params, 4).mlcd
    u = json.loads((smoke_artifacts.teacher / "unet" / "config.json").read_text())
    shape = (u["in_channels"], u["sample_size"], u["sample_size"])
    n_prompts = smoke_params.world.n_train_prompts
    cfg_steps = sum(int((draw_chunk(c, p.seed, 4, 2, 3, n_prompts, shape, milestones(p.num_segments), p.skip)
                         .path[:, 1:] != PAD).sum()) for c in (0, 1))
    assert m["teacher_unet_evals_per_sample"] == pytest.approx(2 * cfg_steps / 8)
