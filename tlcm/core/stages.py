"""The pipeline's stages, in order: the ONE place that lists them.

Each stage declares, once, what it reads and writes:

- ``params``: the ``params.yaml`` sections (or dotted keys) it reads. Enforced: a stage gets a
  view of the params in which every other section raises :class:`tlcm.core.identity.UndeclaredParams`;
- ``inputs``: the artifacts it reads (paths under the artifacts root, e.g. ``teacher``,
  ``lora_mlcd``, ``metrics/mlcd.json``);
- ``outs`` (folders it publishes), a metrics file ``metrics/<name>.json`` and a loss-curve plot
  ``metrics/<name>_history.json``; ``caches``: folders it keeps for itself between runs (the
  suite's FID reference statistics), neither inputs nor outputs.

Its code is not declared: it is the project-internal import closure of ``tasks/<name>.py``,
computed from the source (:func:`tlcm.core.identity.code_closure`). From this table come
``dvc.yaml`` (``tlcm dvc-yaml`` writes it; a test fails on any difference), the Prefect flow's
tasks and cache keys, ``tlcm run``, the CLI's stage choices, the checkpoint identity of every
training stage (:mod:`tlcm.core.identity`) and the model card's list of stages.

To add a stage: write ``tasks/<name>.py: run(params, paths)``, add its params section, add a
:class:`Stage` here in pipeline order, run ``tlcm dvc-yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass

ALL_PARAMS = "*"  # a stage that reads every section (the model card of `register` lists them all)


@dataclass(frozen=True)
class Stage:
    name: str
    params: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()
    metrics: bool = True  # writes metrics/<name>.json (a DVC metric)
    plots: bool = False  # writes metrics/<name>_history.json (the loss curve, a DVC plot with x = step)
    multi_process: bool = False  # follows the multi-process contract of tlcm.core.distributed (accelerate launch)
    cached: bool = True  # False: the Prefect flow runs it every time (each flow run registers a version)
    caches: tuple[str, ...] = ()  # its own reusable caches under the artifacts root (neither inputs nor outputs)
    desc: str = ""

    @property
    def module(self) -> str:
        return f"tasks.{self.name}"

    @property
    def metrics_file(self) -> str | None:
        return f"metrics/{self.name}.json" if self.metrics else None

    @property
    def plots_file(self) -> str | None:
        return f"metrics/{self.name}_history.json" if self.plots else None

    @property
    def outputs(self) -> tuple[str, ...]:
        """Everything it writes under the artifacts root (outs, metrics, plots)."""
        return self.outs + tuple(f for f in (self.metrics_file, self.plots_file) if f)


def _training(name: str, params: tuple[str, ...], inputs: tuple[str, ...], outs: tuple[str, ...], desc: str) -> Stage:
    return Stage(name, params, inputs, outs, plots=True, multi_process=True, desc=desc)


_TEACHER_USE = ("teacher.source", "teacher.dtype", "teacher.gradient_checkpointing")  # tlcm/loaders/teacher_io.py
_LORA_PARAMS = (*_TEACHER_USE, "prompts", "evaluator", "world")  # evaluator, world: the quick and final evaluations
_LORA_INPUTS = ("world", "teacher", "latent_lpips", "evaluator")
LORA_STAGES = ("lcm_baseline", "mlcd", "ilcd", "mps", "dmgan")

STAGES: tuple[Stage, ...] = (
    Stage("world", ("world", "teacher.text.max_length"), (), ("world",), metrics=False,
          desc="caption grammar, word-level CLIPTokenizer, prompt sets"),
    _training("autoencoder", ("autoencoder", "world"), (), ("autoencoder",), "the teacher's AutoencoderKL"),
    _training("evaluator", ("evaluator", "world"), (), ("evaluator",), "attribute classifiers: the judge"),
    _training("teacher", ("teacher", "world"), ("world", "autoencoder"), ("teacher",),
              "text encoders + text_time UNet, saved as a StableDiffusionXLPipeline folder"),
    Stage("bapps", ("bapps", "world"), (), ("bapps",),
          desc="synthetic BAPPS in the real layout (or a check of a real BAPPS root when bapps.source is a path)"),
    _training("latent_lpips", ("latent_lpips", "bapps.source", "teacher.source"), ("bapps", "autoencoder"),
              ("latent_lpips",), "latent LPIPS trained on BAPPS 2AFC (paper 4.3)"),
    _training("reward", ("reward", "world", "teacher.text.max_length"), ("world",), ("reward",),
              "the MPS-interface reward model (a real MPS checkpoint when reward.source is a path)"),
    _training("controlnet", ("controlnet", *_TEACHER_USE, "world"), ("world", "teacher"), ("controlnet",),
              "paper A.2: ControlNetModel.from_unet of the teacher, trained briefly on edge maps (shapes world; else skipped)"),
    _training("lcm_baseline", ("lcm_baseline", *_LORA_PARAMS), _LORA_INPUTS, ("lora_lcm_baseline",),
              "the LCM-LoRA baseline: LCD over [0, T] in one segment"),
    _training("mlcd", ("mlcd", *_LORA_PARAMS), _LORA_INPUTS, ("lora_mlcd",),
              "data-free multistep latent consistency distillation (Alg. 1)"),
    _training("ilcd", ("ilcd", *_LORA_PARAMS), (*_LORA_INPUTS, "lora_mlcd"), ("lora_ilcd",),
              "improved data-free LCD across the milestones (Alg. 2)"),
    _training("mps", ("mps", *_LORA_PARAMS, "reward"), ("world", "teacher", "latent_lpips", "evaluator", "reward", "lora_ilcd"),
              ("lora_mps",), "MPS preference optimisation (Eq. 11)"),
    _training("dmgan", ("dmgan", *_LORA_PARAMS), (*_LORA_INPUTS, "lora_mps"),
              ("lora_dmgan",), "distribution matching + adversarial loss (Eq. 12-13); the shipped LoRA"),
    Stage("evaluate", ("evaluate", "applications", "world", "evaluator", "teacher.source", "teacher.dtype", "mps.condition",
                       "reward", "suite"),
          ("world", "evaluator", "teacher", "reward", "controlnet", *(f"lora_{s}" for s in LORA_STAGES),
           *(f"metrics/{s}.json" for s in LORA_STAGES)), ("benchmark",),
          caches=("suite",), desc="benchmark on held-out prompts (alignment, Frechet, reward, speed)"),
    Stage("register", (ALL_PARAMS,), ("teacher", "lora_dmgan", "benchmark"), (), cached=False,
          desc="the final artifact becomes an MLflow model version with alias `candidate`"),
)

NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def get(name: str) -> Stage:
    """The declaration of stage ``name`` (KeyError naming the stages otherwise)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage '{name}' (stages: {', '.join(NAMES)})") from None


def downstream(name: str) -> tuple[str, ...]:
    """The stages that read, directly or not, what ``name`` writes (in pipeline order)."""
    produced = set(get(name).outputs)
    out = []
    for s in STAGES[NAMES.index(name) + 1:]:
        if produced & set(s.inputs):
            out.append(s.name)
            produced |= set(s.outputs)
    return tuple(out)


def upstream(*names: str) -> tuple[str, ...]:
    """``names`` and every stage whose outputs they read, directly or not (in pipeline order)."""
    need, todo = set(), list(names)
    while todo:
        st = get(todo.pop())
        if st.name in need:
            continue
        need.add(st.name)
        todo += [s.name for s in STAGES if set(s.outputs) & set(st.inputs)]
    return tuple(n for n in NAMES if n in need)
