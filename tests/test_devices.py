"""Every stage, the benchmark and `tlcm generate` on the device the process is given, in the teacher's dtype.

No GPU here: :mod:`fake_cuda` makes ``cuda:0`` a second device on the CPU on which any op that mixes it with
CPU tensors raises, as CUDA does, and records where every UNet / VAE / text-encoder call ran. The bf16 tests
run the real thing on the CPU (bf16 kernels exist there): a dtype mix-up raises on a CPU as on a GPU.
"""
import json

import pytest
import torch

from fake_cuda import fake_cuda

TEXT_UNET = ("UNet2DConditionModel", "CLIPTextModel", "CLIPTextModelWithProjection")
BIG = (*TEXT_UNET, "Decoder")
# stage: (its outputs, the networks it trains or distils through; they must run on cuda:0)
STAGES = {
    "autoencoder": (("autoencoder",), ("Encoder", "Decoder")),
    "evaluator": (("evaluator",), ("AttributeNet",)),
    "teacher": (("teacher",), ("UNet2DConditionModel", "CLIPTextModel", "CLIPTextModelWithProjection", "Encoder")),
    "latent_lpips": (("latent_lpips",), ("LatentVGG",)),
    "reward": (("reward",), ("TransformerEncoder",)),  # its text side (training calls the parts, not forward)
    "mlcd": (("lora_mlcd",), (*BIG, "LatentVGG")),
    "ilcd": (("lora_ilcd",), TEXT_UNET),
    "mps": (("lora_mps",), (*BIG, "ShapesReward")),
    "dmgan": (("lora_dmgan",), TEXT_UNET),
}


@pytest.fixture(scope="module")
def chain(student_chain, smoke_params):
    """Every input of every training stage and of `evaluate` (smoke)."""
    from tasks.registry import run_stage

    for name in ("reward", "mps", "dmgan"):
        if not (student_chain.metrics / f"{name}.json").is_file():
            run_stage(name, smoke_params, student_chain)
    return student_chain


def _root(tmp_path_factory, name: str, chain, own: tuple[str, ...]):
    """A fresh artifacts folder that sees every input in ``chain`` (symlinks) but not the ``own`` outputs."""
    from tlcm.core.paths import Paths

    root = tmp_path_factory.mktemp(name)
    for d in chain.root.iterdir():
        if d.name not in (*own, "checkpoints", "metrics") and not d.name.startswith("."):
            (root / d.name).symlink_to(d)
    return Paths(root)


@pytest.mark.parametrize("stage", list(STAGES))
def test_training_stage_runs_on_the_device(stage, chain, smoke_params, tmp_path_factory, monkeypatch):
    """One step of every training stage on cuda:0 (mlcd with its periodic quick evaluation, which sampled CPU noise
    into the UNet before). Fails on any CPU tensor reaching a cuda module, or a network left on the CPU."""
    from tasks.registry import run_stage

    own, nets = STAGES[stage]
    extra = {"eval_every": 1, "eval_prompts": 4} if stage == "mlcd" else {}
    params = smoke_params.model_copy(update={stage: smoke_params.section(stage).model_copy(
        update={"steps": 1, "checkpoint_every": 1, **extra})})
    paths = _root(tmp_path_factory, f"dev_{stage}", chain, own)
    with fake_cuda(monkeypatch) as mode:
        run_stage(stage, params, paths)
    for net in nets:
        assert "cuda" in mode.devices_of(net), (net, mode.devices_of(net))
    if stage in ("mlcd", "ilcd", "mps", "dmgan"):  # every UNet call of a student stage, quick evaluation included
        assert mode.devices_of("UNet2DConditionModel") == {"cuda"}
        metrics = json.loads((paths.metrics / f"{stage}.json").read_text())
        assert metrics["device"] == "cuda" and metrics["world_size"] == 1
    if stage == "mlcd":
        assert [e["step"] for e in json.loads((paths.metrics / "mlcd.json").read_text())["quick_evals"]] == [0, 1]


def test_benchmark_and_generate_run_on_the_device(chain, smoke_params, tmp_path_factory, tmp_path, monkeypatch):
    """`evaluate` (teacher and student rows) and `tlcm generate` sample on the process's device."""
    from tasks.generate import generate
    from tasks.registry import run_stage

    paths = _root(tmp_path_factory, "dev_evaluate", chain, ("benchmark",))
    for name in ("mlcd", "ilcd", "mps", "dmgan"):
        (paths.metrics / f"{name}.json").parent.mkdir(parents=True, exist_ok=True)
        (paths.metrics / f"{name}.json").symlink_to(chain.metrics / f"{name}.json")
    params = smoke_params.model_copy(update={"evaluate": smoke_params.evaluate.model_copy(
        update={"student_stages": ("mlcd", "dmgan"), "reference_steps": 2, "student_steps": (2,), "lcm_steps": (2,),
                # one training-free baseline: the ancestral sampler's noise draws must land on the device too
                "baseline_samplers": ("euler_a",), "baseline_steps": (2,), "baseline_guidance": (1.0, 2.0),
                "selection_prompts": 4, "sample_seeds": 2})})
    with fake_cuda(monkeypatch) as mode:
        run_stage("evaluate", params, paths)
    assert mode.devices_of("UNet2DConditionModel", "Decoder") == {"cuda"}
    rows = json.loads((paths.benchmark / "benchmark.json").read_text())["rows"]
    assert {r["method"] for r in rows} >= {"teacher DDIM + CFG (reference)", "teacher + Euler ancestral",
                                           "TLCM after dmgan"}

    for lora in (None, str(chain.lora("dmgan"))):
        with fake_cuda(monkeypatch) as mode:
            out = generate(params, chain, ["a red circle on a blue background"], 2, None, 0, None,
                           tmp_path / f"g{lora is None}.png", lora)
        assert out.stat().st_size > 100
        assert mode.devices_of("UNet2DConditionModel", "Decoder") == {"cuda"}


def test_training_minutes_come_from_the_training_process(tmp_path):
    """The benchmark's training-cost column multiplies by the threads/processes the TRAINING ran on, recorded in
    its metrics, not by the evaluating process's thread count; a GPU run is counted in GPU-minutes."""
    from tasks.evaluate import _training_minutes
    from tlcm.core.paths import Paths

    paths = Paths(tmp_path)
    paths.metrics.mkdir(parents=True)
    (paths.metrics / "mlcd.json").write_text(json.dumps(
        {"train_seconds": 600.0, "device": "cpu", "torch_threads": 3, "world_size": 2}))
    (paths.metrics / "ilcd.json").write_text(json.dumps(
        {"train_seconds": 120.0, "device": "cuda", "torch_threads": 16, "world_size": 4}))
    (paths.metrics / "mps.json").write_text(json.dumps({"train_seconds": 60.0}))  # recorded before: unknown
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the evaluating process's threads must not matter
    try:
        minutes = _training_minutes(paths, ["mlcd", "ilcd", "mps"])
    finally:
        torch.set_num_threads(threads)
    assert minutes == {"mlcd": ("cpu", 60.0), "ilcd": ("gpu", 8.0)}


def test_bf16_frozen_weights_train_and_sample(chain, smoke_params, tmp_path_factory):
    """``teacher.dtype: bfloat16`` (the sdxl preset's) for real on the CPU, where a dtype mix-up raises as on a GPU:
    `mps` and `dmgan` (teacher CFG solver, student, VAE decoder with gradient, scorer, fake score, discriminator),
    then the benchmark. Frozen networks run in bf16; the trained LoRA stays float32."""
    from safetensors.torch import load_file

    from tasks.registry import run_stage

    seen: list[torch.dtype] = []

    def hook(module, _args):
        if type(module).__name__ == "UNet2DConditionModel":
            seen.append(next(module.parameters()).dtype)

    params = smoke_params.model_copy(update={"teacher": smoke_params.teacher.model_copy(update={"dtype": "bfloat16"})})
    for st in ("mps", "dmgan"):
        params = params.model_copy(update={st: params.section(st).model_copy(update={"steps": 1, "checkpoint_every": 1})})
    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={
        "student_stages": ("dmgan",), "reference_steps": 2, "student_steps": (2,), "n_prompts": 4,
        "baseline_samplers": ("dpmpp_2m",), "baseline_steps": (2,), "baseline_guidance": (2.0,), "selection_prompts": 4})})
    paths = _root(tmp_path_factory, "bf16", chain, ("lora_mps", "lora_dmgan", "benchmark"))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        for st in ("mps", "dmgan"):
            run_stage(st, params, paths)
            lora = load_file(paths.lora(st) / "pytorch_lora_weights.safetensors")
            assert {v.dtype for v in lora.values()} == {torch.float32}, st
        run_stage("evaluate", params, paths)
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.bfloat16}
    rows = json.loads((paths.benchmark / "benchmark.json").read_text())["rows"]
    assert {r["method"] for r in rows} >= {"teacher DDIM + CFG (reference)", "TLCM after dmgan"}
