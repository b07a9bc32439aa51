"""Multi-process training: `tlcm stage mlcd --num-processes 2` (a real 2-process gloo group under
`accelerate launch`) gives the one-process result at the same global batch and seed, and resumes.

Tolerance: max |Δ| over every saved LoRA tensor < 1e-5 after 3 AdamW steps of lr 1e-4 (one step moves a
LoRA-B weight by up to ~1e-4). Measured here: 7.5e-7, the same size as the difference between two
one-process runs with 1 and 2 torch threads (float32 summation order).
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

TOL = 1e-5


def test_shard_is_contiguous_and_covers_the_global_batch():
    from tlcm.core.distributed import ShardError, shard, shard_slice

    x = torch.arange(12)
    parts = [shard(x, 3, r) for r in range(3)]
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert shard(list("abcd"), 2, 1) == ["c", "d"]
    assert shard(x) is not None and torch.equal(shard(x), x)  # one process: the whole batch
    assert shard_slice(6, 2, 0) == slice(0, 3)
    with pytest.raises(ShardError, match="multiple of 4"):
        shard_slice(6, 4, 0)


def test_launch_command_starts_a_real_cpu_process_group():
    """`--cpu --num_processes N` silently runs one process; `--multi_gpu` + ACCELERATE_USE_CPU=1 runs N (gloo)."""
    from tlcm.core.launch import default_num_processes, launch_command, stage_args

    args = stage_args("mlcd", "params.yaml", "smoke", "artifacts", 2)
    assert args == ["stage", "mlcd", "--params", "params.yaml", "--artifacts", "artifacts", "--num-processes", "2",
                    "--preset", "smoke"]
    argv, env = launch_command(args, 2, cpu=True, port=29999)
    assert "--cpu" not in argv and "--multi_gpu" in argv and env["ACCELERATE_USE_CPU"] == "1"
    assert argv[argv.index("--num_processes") + 1] == "2" and argv[argv.index("--num_machines") + 1] == "1"
    assert argv[argv.index("--main_process_port") + 1] == "29999"
    assert argv[argv.index("flows.cli") - 1] == "-m" and argv[argv.index("flows.cli") + 1:] == args
    gpu_argv, gpu_env = launch_command(["stage", "mlcd"], 4, cpu=False, port=29999)
    assert "--multi_gpu" in gpu_argv and gpu_env.get("ACCELERATE_USE_CPU") == os.environ.get("ACCELERATE_USE_CPU")
    assert default_num_processes() == (torch.cuda.device_count() if torch.cuda.is_available() else 1)


def test_batch_that_does_not_divide_stops_before_launching(smoke_params, tmp_path, caplog):
    from flows.cli import main

    f = _params_file(smoke_params, tmp_path / "params.yaml", steps=3)  # mlcd.batch_size 4
    assert main(["stage", "mlcd", "--params", str(f), "--artifacts", str(tmp_path / "a"), "--num-processes", "3"]) == 2
    assert "'mlcd.batch_size' = 4" in caplog.text and "multiple of 3" in caplog.text


def test_only_training_stages_relaunch(smoke_params):
    """A stage without a training loop (world, evaluate, ...) ignores --num-processes and runs in this process."""
    from tlcm.core.launch import MULTI_PROCESS_STAGES, launch_or_join

    assert {"teacher", "lcm_baseline", "mlcd", "ilcd"} <= MULTI_PROCESS_STAGES
    assert launch_or_join(2, ["stage", "world", "--num-processes", "2"], smoke_params, "world") is None
    assert launch_or_join(1, ["stage", "mlcd"], smoke_params, "mlcd") is None


def _params_file(smoke_params, path, steps: int):
    """The smoke params in full with mlcd at global batch 4 (written as the base preset: no overlay)."""
    d = smoke_params.model_dump(mode="json")
    d["preset"] = "mini"
    d["mlcd"].update(loss="mse", batch_size=4, steps=steps, checkpoint_every=2, eval_every=0)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def _own(tmp_path_factory, name, source, drop=()):
    """A private artifacts folder: a copy-on-write copy (conftest.cow_copy) of ``source`` without the top-level
    entries ``drop``. Stages run in it; ``source`` (a session fixture) is never written and no test sees another's
    outputs."""
    from conftest import cow_copy

    paths = cow_copy(source, tmp_path_factory.mktemp(name) / "artifacts")
    for d in drop:
        shutil.rmtree(paths.root / d, ignore_errors=True)
    return paths.root


def _root(tmp_path_factory, name, smoke_artifacts):
    return _own(tmp_path_factory, name, smoke_artifacts)


def test_two_processes_match_one_process_and_resume(smoke_artifacts, smoke_params, tmp_path_factory, tmp_path):
    from conftest import run_cli
    from safetensors.torch import load_file

    from tasks.registry import run_stage
    from tlcm.core.params import load_params
    from tlcm.core.paths import Paths

    f2 = _params_file(smoke_params, tmp_path / "params2.yaml", steps=2)
    f3 = _params_file(smoke_params, tmp_path / "params3.yaml", steps=3)

    one = Paths(_root(tmp_path_factory, "one_process", smoke_artifacts))
    run_stage("mlcd", load_params(f3), one)  # the reference: 3 steps in this process

    two = Paths(_root(tmp_path_factory, "two_processes", smoke_artifacts))
    args = ["stage", "mlcd", "--artifacts", str(two.root), "--num-processes", "2"]
    r = run_cli(*args, "--params", str(f2), timeout=180)  # 2 steps on 2 processes ...
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((two.metrics / "mlcd.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 2
    loss_01 = m["final_consistency"]  # the mean over both processes of steps 0-1
    r = run_cli(*args, "--params", str(f3), timeout=180)  # ... then resumed to 3 on 2 processes
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from checkpoint at step 2" in r.stderr
    assert r.stderr.count("mlcd: 3 steps in") == 1  # only the main process reports (and writes)

    m1, m2 = (json.loads((p.metrics / "mlcd.json").read_text()) for p in (one, two))
    assert m1["world_size"] == 1 and m2["world_size"] == 2 and m1["steps"] == m2["steps"] == 3
    # the logged loss is the processes' mean, i.e. the one-process loss (the resumed run logs step 2 alone)
    assert (2 * loss_01 + m2["final_consistency"]) / 3 == pytest.approx(m1["final_consistency"], rel=1e-4)
    a = load_file(one.lora("mlcd") / "pytorch_lora_weights.safetensors")
    b = load_file(two.lora("mlcd") / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)  # B starts at 0: how far training moved it
    print(f"max |LoRA(1 process) - LoRA(2 processes)| = {diff:.3g} (tolerance {TOL}); max |B| = {moved:.3g}")
    assert diff < TOL < moved / 10
    leftovers = [p.name for p in two.checkpoints("mlcd").rglob(".*")]
    assert not leftovers  # one writer, atomic files


def test_buffer_and_quick_eval_on_two_processes(smoke_artifacts, smoke_params, tmp_path_factory, tmp_path):
    """`mlcd` with the teacher-trajectory buffer and the periodic quick evaluation, on 2 processes (gloo): each process
    generates and keeps only its rows' trajectories (half of each chunk), the quick evaluation runs on the main
    process alone (the other waits at the next collective), and the LoRA is the one-process run's."""
    from conftest import run_cli
    from safetensors.torch import load_file

    from tasks.registry import run_stage
    from tlcm.core.params import load_params
    from tlcm.core.paths import Paths

    d = smoke_params.model_dump(mode="json")
    d["preset"] = "mini"
    d["mlcd"].update(loss="mse", batch_size=4, steps=3, checkpoint_every=2, teacher_path="buffer", skip=100,
                     buffer_trajectories=8, buffer_refresh=2, eval_every=2, eval_prompts=4)
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(d, sort_keys=False))
    one, two = (Paths(_own(tmp_path_factory, name, smoke_artifacts)) for name in ("buffer_one", "buffer_two"))
    run_stage("mlcd", load_params(f), one)
    r = run_cli("stage", "mlcd", "--params", str(f), "--artifacts", str(two.root), "--num-processes", "2", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m1, m2 = (json.loads((p.metrics / "mlcd.json").read_text()) for p in (one, two))
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m1["buffer"]["trajectories_per_process"] == 8 and m2["buffer"]["trajectories_per_process"] == 4
    assert m1["buffer"]["chunks_made"] == m2["buffer"]["chunks_made"] == 2
    assert [e["step"] for e in m2["quick_evals"]] == [e["step"] for e in m1["quick_evals"]] == [0, 2, 3]
    assert m2["quick_evals"][0] == m1["quick_evals"][0]  # same LoRA at step 0, same prompts and noise
    assert m2["teacher_unet_evals_per_sample"] == pytest.approx(m1["teacher_unet_evals_per_sample"])
    a = load_file(one.lora("mlcd") / "pytorch_lora_weights.safetensors")
    b = load_file(two.lora("mlcd") / "pytorch_lora_weights.safetensors")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"buffer: max |LoRA(1 process) - LoRA(2 processes)| = {diff:.3g} (tolerance {TOL})")
    assert diff < TOL


# ---- every other multi-process training stage: 1 process == 2 processes ------------------------
# (stage, its output folder, params overrides: a global batch that divides by 2, 2 steps)
LR = 1e-3
OTHER_STAGES = {
    "autoencoder": ("autoencoder", {"batch_size": 4}),
    "evaluator": ("evaluator", {"batch_size": 8}),
    "latent_lpips": ("latent_lpips", {"batch_size": 8}),
    "reward": ("reward", {"batch_size": 8}),  # a loss over the whole batch: gathered embeddings
    "mps": ("lora_mps", {"batch_size": 4}),
    "dmgan": ("lora_dmgan", {"batch_size": 4, "critic_updates": 2}),
    "controlnet": ("controlnet", {"batch_size": 4}),
}
# Tolerance: max |Δ| over the saved tensors < a quarter of one AdamW step (lr 1e-3: Adam's first
# steps move a weight by up to ~lr, whatever its gradient's size, so float32 summation-order noise in
# a near-zero gradient shows up at that scale). Measured (printed per stage): autoencoder 1.8e-5,
# evaluator 4.8e-5, latent_lpips 1.1e-6, reward 3.0e-5 (on its scores), mps 3.5e-5. dmgan's weights differ by
# up to 7.3e-4 (as much as between two one-process runs with 1 and 2 torch threads), so dmgan compares samples.
OTHER_TOL = 0.25 * LR


@pytest.fixture(scope="module")
def technique_inputs(student_chain, smoke_params, tmp_path_factory):
    """This module's own copy (copy-on-write) of ``student_chain`` with a `mps` LoRA trained in it: the inputs of
    `mps` (the iLCD LoRA, the reward model: both in the chain) and of `dmgan` (the `mps` LoRA)."""
    from conftest import cow_copy
    from tasks.registry import run_stage

    paths = cow_copy(student_chain, tmp_path_factory.mktemp("technique") / "artifacts")
    run_stage("mps", smoke_params, paths)
    return paths


def _stage_root(tmp_path_factory, name, chain, out: str):
    """A private artifacts folder with every input of ``chain`` but none of the stage's own files."""
    return _own(tmp_path_factory, name, chain, drop=(out, "checkpoints", "metrics"))


def _sample_gap(chain, one, two, init) -> float:
    """Mean |pixel| gap between the 2-step samples of LoRAs ``one`` and ``two`` (same prompts, same seed), asserted
    under a tenth of the gap between ``one`` and its input LoRA ``init``; returns the first."""
    from tasks.generate import load_student_pipe, student_samples
    from tlcm.loaders.world_io import read_prompts

    prompts = [s.caption() for s in read_prompts(chain, "eval")[:8]]
    img = {}
    for name, folder in (("one", one), ("two", two), ("init", init)):
        pipe = load_student_pipe(str(chain.teacher), folder)
        img[name] = student_samples(pipe, prompts, 2, 0, 8, pipe.scheduler).images.astype(np.float64)
    gap, moved = np.abs(img["one"] - img["two"]).mean(), np.abs(img["one"] - img["init"]).mean()
    print(f"dmgan: mean |sample(1 process) - sample(2 processes)| = {gap:.3g}; training moved samples by {moved:.3g}")
    assert gap < 0.1 * moved
    return gap


@pytest.mark.parametrize("stage", list(OTHER_STAGES))
def test_stage_on_two_processes_matches_one_process(stage, technique_inputs, smoke_params, tmp_path_factory,
                                                    tmp_path):
    from conftest import run_cli
    from safetensors.torch import load_file

    from tasks.registry import run_stage
    from tlcm.core.launch import MULTI_PROCESS_STAGES
    from tlcm.core.params import load_params
    from tlcm.core.paths import Paths

    assert stage in MULTI_PROCESS_STAGES
    out, update = OTHER_STAGES[stage]
    d = smoke_params.model_dump(mode="json")
    d["preset"] = "mini"
    d[stage].update(steps=2, checkpoint_every=1, lr=LR, **update)
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(d, sort_keys=False))

    one = Paths(_stage_root(tmp_path_factory, f"{stage}_one", technique_inputs, out))
    run_stage(stage, load_params(f), one)
    two = Paths(_stage_root(tmp_path_factory, f"{stage}_two", technique_inputs, out))
    r = run_cli("stage", stage, "--params", str(f), "--artifacts", str(two.root), "--num-processes", "2", timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "process group: 2 processes" in r.stderr
    assert json.loads((two.metrics / f"{stage}.json").read_text())["world_size"] == 2
    assert json.loads((one.metrics / f"{stage}.json").read_text())["world_size"] == 1

    files = sorted(p.name for p in (one.root / out).glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (two.root / out).glob("*.safetensors"))
    diff, scale = 0.0, 0.0
    for name in files:
        a, b = load_file(one.root / out / name), load_file(two.root / out / name)
        assert a.keys() == b.keys()
        diff = max([diff, *((a[k].float() - b[k].float()).abs().max().item() for k in a)])
        scale = max([scale, *(a[k].float().abs().max().item() for k in a)])
    print(f"{stage}: max |1 process - 2 processes| = {diff:.3g} over {files} (tolerance {OTHER_TOL}; max |w| {scale:.3g})")
    if stage == "reward":
        # its conv biases feed per-channel GroupNorms, which cancel them: their gradient is 0 up to float
        # noise, which Adam turns into ±lr steps that change nothing. Compare what the model computes.
        from tasks.reward import pair_scores, validation_pairs
        from tlcm.loaders.reward_io import load_shapes_reward

        pairs = validation_pairs(load_params(f))
        nets = [load_shapes_reward(p.reward) for p in (one, two)]
        s1, s2 = (torch.cat(pair_scores(net, net.tokenizer, pairs)) for net in nets)
        diff = (s1 - s2).abs().max().item()
        print(f"reward: max |score(1 process) - score(2 processes)| = {diff:.3g} over {len(s1)} scores")
    if stage == "dmgan":
        # The generator's gradient comes through the critic (updated twice per step): float summation order
        # changes near-zero gradients' signs, and Adam's first steps (≈ lr·sign(g)) turn that into weight
        # differences of up to ~lr (measured 2.0e-4 here and 7.3e-4 on CI; the same between 1 and 2 torch
        # threads in one process). Compare what the two LoRAs sample, against how far training moved it.
        diff = _sample_gap(technique_inputs, one.root / out, two.root / out, technique_inputs.root / "lora_mps")
    else:
        assert diff < OTHER_TOL
    if stage in ("mps", "dmgan"):  # the LoRA moved from its input by far more than the tolerance
        init = {"mps": "lora_ilcd", "dmgan": "lora_mps"}[stage]
        a = load_file(one.root / out / "pytorch_lora_weights.safetensors")
        b = load_file(technique_inputs.root / init / "pytorch_lora_weights.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) > 4 * OTHER_TOL
