"""Stage ``register``: the pipeline's final artifact becomes a registered MLflow model version.

The version is an MLflow Model (``pyfunc``, :mod:`tlcm.tracking.packaging`): ``mlflow.pyfunc.load_model`` and
``mlflow models serve`` sample it with the TLCMScheduler (CFG off, the gate's step count) from prompts.
Each completed run adds a version of ``register.model_name`` with a model card (its
description and ``model/README.md``) and the alias ``candidate``. ``champion`` is set only by
:func:`promote` (``tlcm promote VERSION``), which checks the version's own benchmark against
``register.gates`` and refuses, printing the failing numbers, unless forced. (Stage
transitions are deprecated in MLflow; aliases are how a version is promoted.)

Outputs ``<artifacts>/metrics/register.json`` (model name, version, run id, source URI).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from tlcm.tracking import mlflow_store as store
from tlcm.tracking.model_registry import register_directory
from tlcm.tracking.packaging import example_prompt, save_pyfunc
from tlcm.core.params import Params
from tlcm.core.paths import Paths
from tlcm.core.provenance import file_sha256, git_commit, tree_sha256
from tlcm.core.storage import ArtifactError, atomic_write_json, read_json
from tlcm.tracking.store_preflight import preflight

log = logging.getLogger("tlcm")

CANDIDATE, CHAMPION = "candidate", "champion"


class PromotionRefused(RuntimeError):
    """A version's benchmark fails the promotion gates (the message has the numbers)."""


SHIPPED_STAGE = "dmgan"  # the last stage of the unified LoRA (a pass-through when disabled)


def final_artifact(paths: Paths) -> Path:
    """The folder this pipeline ships: the unified TLCM LoRA after its last training stage
    (a diffusers LoRA folder: ``pipe.load_lora_weights(folder)``)."""
    return paths.lora(SHIPPED_STAGE)


def _benchmark(paths: Paths) -> dict:
    return read_json(paths.benchmark / "benchmark.json", "benchmark",
                     "build it with `tlcm stage evaluate` (or `dvc repro evaluate`)")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def model_card(params: Params, paths: Paths, bench: dict, artifact_sha: str | None) -> str:
    """Markdown: what the model is, how it was made (every stage's params), how good it is."""
    from tlcm.core.stages import NAMES

    data = params.model_dump(mode="json")
    teacher = params.teacher.source
    teacher_desc = (f"`{teacher}` (the shapes-world SDXL-shaped teacher trained by this pipeline)" if teacher.trained
                    else f"`{teacher}`")
    rows = bench.get("rows", [])
    cols = ["method", "steps", "alignment", "frechet", "sec_per_image", "unet_evals"]
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    lock = file_sha256(Path("dvc.lock"))
    g = params.register.gates
    lines = [
        f"# {params.register.model_name}",
        "",
        "TLCM pipeline output (arXiv 2406.05768: data-free distillation of a latent diffusion model into a few-step "
        "sampler).",
        "",
        f"- **LoRA**: `{final_artifact(paths).name}/` (content sha256 `{artifact_sha}`), in the version as "
        "`artifacts/lora/`; the version is an MLflow pyfunc model (TLCMScheduler, CFG off)",
        f"- **teacher**: {teacher_desc}",
        f"- **preset**: `{params.preset}`",
        f"- **git commit**: `{git_commit()}`",
        f"- **dvc.lock sha256**: `{lock or 'none (not run through DVC)'}`",
        f"- **registered**: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
        "",
        "## Benchmark (held-out prompts; metrics at each step count)",
        "",
        *table,
        "",
        f"Promotion gates (`register.gates`): row `{g.method}` @ {g.steps} steps, alignment ≥ {g.min_alignment}"
        + (f", Fréchet ≤ {g.max_frechet}" if g.max_frechet is not None else "")
        + (f", sec/image ≤ {g.max_sec_per_image}" if g.max_sec_per_image is not None else "") + ".",
        "",
        "## Stages and their params",
        "",
    ]
    for s in NAMES:
        if s in data:
            lines += [f"### {s}", "", "```yaml", yaml.safe_dump(data[s], sort_keys=False).rstrip(), "```", ""]
    lines += use_section(params, paths)
    return "\n".join(lines)


def serve_steps(params: Params) -> int:
    """The step count a version samples at by default: the one its promotion gate judges (if TLCM can take it)."""
    n = params.register.gates.steps
    return n if 1 <= n <= 8 else 4


def use_section(params: Params, paths: Paths) -> list[str]:
    """The card's "Use" section: Python that runs as written on a machine that sees this tracking store
    (the tests execute it)."""
    name, n = params.register.model_name, serve_steps(params)
    uri, prompt = store.redact(store.tracking_uri()), example_prompt(params, paths)
    bundled = params.teacher.source.trained
    return [
        "## Use",
        "",
        f"As an MLflow model (TLCMScheduler, {n} steps and CFG off are the defaults; params `num_inference_steps` "
        "1..8, `seed`, `height`, `width`, `guidance_scale`), one PNG per prompt:",
        "",
        "```python",
        "import mlflow",
        f'mlflow.set_tracking_uri("{uri}")',
        f'model = mlflow.pyfunc.load_model("models:/{name}@{CHAMPION}")',
        f'pngs = model.predict([{prompt!r}], params={{"num_inference_steps": {n}}})',
        'open("sample.png", "wb").write(pngs[0])',
        "```",
        "",
        "In diffusers (the version's folders: `artifacts/lora`, the LoRA; `artifacts/scheduler`, the TLCMScheduler "
        "config; `code/models`, its class" + ("; `artifacts/base`, the base pipeline):" if bundled else "):"),
        "",
        "```python",
        "import sys",
        "import mlflow",
        "from diffusers import StableDiffusionXLPipeline",
        f'mlflow.set_tracking_uri("{uri}")',
        f'folder = mlflow.artifacts.download_artifacts("models:/{name}@{CHAMPION}")',
        'sys.path.insert(0, f"{folder}/code")',
        "from models.scheduler import TLCMScheduler",
        ('pipe = StableDiffusionXLPipeline.from_pretrained(f"{folder}/artifacts/base")' if bundled else
         f'pipe = StableDiffusionXLPipeline.from_pretrained({params.teacher.source.location!r})'),
        'pipe.load_lora_weights(f"{folder}/artifacts/lora")',
        'pipe.scheduler = TLCMScheduler.from_pretrained(f"{folder}/artifacts/scheduler")',
        f"image = pipe({prompt!r}, num_inference_steps={n}, guidance_scale=1.0).images[0]",
        "```",
        "",
        "ComfyUI / Automatic1111: `tlcm export --format kohya models:/" + name + "@" + CHAMPION +
        " --out tlcm.safetensors` (see the project README).",
        "",
    ]


def run(params: Params, paths: Paths) -> dict:
    out = paths.metrics / "register.json"
    if not store.enabled():
        log.info("register: tracking is off (%s=0); nothing registered", store.SWITCH_ENV)
        record = {"registered": False, "reason": f"{store.SWITCH_ENV}=0"}
        atomic_write_json(out, record)
        return record
    artifact = final_artifact(paths)
    if not artifact.is_dir():
        raise ArtifactError(f"final artifact not found: {artifact}. Build it with `tlcm run` (or `dvc repro`).")
    bench = _benchmark(paths)
    preflight()
    sha = tree_sha256(artifact)
    card = model_card(params, paths, bench, sha)
    tags = {"tlcm.preset": params.preset, "tlcm.git_commit": git_commit(), "tlcm.artifact_sha256": sha or "",
            "tlcm.teacher": str(params.teacher.source)}
    lock = file_sha256(Path("dvc.lock"))
    if lock:
        tags["tlcm.dvc_lock_sha256"] = lock
    row = gate_row(bench, params)
    if row:
        tags.update({f"tlcm.gate_row.{k}": _fmt(row[k]) for k in ("alignment", "frechet", "sec_per_image") if k in row})
    with tempfile.TemporaryDirectory(prefix="tlcm-model-") as tmp:
        model_dir = Path(tmp) / "model"
        config = save_pyfunc(params, paths, artifact, model_dir, serve_steps(params))
        tags["tlcm.base"] = config["kind"]
        mv = register_directory(params.register.model_name, model_dir, card, tags,
                                         files=[paths.benchmark / "benchmark.json", paths.benchmark / "benchmark.md",
                                                paths.benchmark / "samples.png"], aliases=(CANDIDATE,))
    record = {"registered": True, "model_name": params.register.model_name, "version": int(mv.version),
              "run_id": mv.run_id, "source": mv.source, "alias": CANDIDATE, "artifact_sha256": sha}
    atomic_write_json(out, record)
    log.info("register: %s version %s (alias %s) from %s", params.register.model_name, mv.version, CANDIDATE, artifact)
    return record


# ---- promotion ----------------------------------------------------------------------------

def gate_row(bench: dict, params: Params) -> dict | None:
    g = params.register.gates
    for r in bench.get("rows", []):
        if r.get("method") == g.method and int(r.get("steps", -1)) == g.steps:
            return r
    return None


def gate_failures(bench: dict, params: Params) -> list[str]:
    """Why ``bench`` fails ``register.gates`` (empty list = passes)."""
    g = params.register.gates
    row = gate_row(bench, params)
    if row is None:
        have = ", ".join(f"'{r.get('method')}' @ {r.get('steps')}" for r in bench.get("rows", []))
        return [f"benchmark has no row '{g.method}' @ {g.steps} steps (rows: {have})"]
    where = f"('{g.method}' @ {g.steps} steps)"
    fails = []
    if row["alignment"] < g.min_alignment:
        fails.append(f"alignment {row['alignment']:.4f} < min_alignment {g.min_alignment} {where}")
    if g.max_frechet is not None and row["frechet"] > g.max_frechet:
        fails.append(f"frechet {row['frechet']:.4f} > max_frechet {g.max_frechet} {where}")
    if g.max_sec_per_image is not None and row["sec_per_image"] > g.max_sec_per_image:
        fails.append(f"sec_per_image {row['sec_per_image']:.4g} > max_sec_per_image {g.max_sec_per_image} {where}")
    return fails


@dataclass
class Promotion:
    model_name: str
    version: int
    failures: list[str]
    forced: bool


def promote(version: int | str, params: Params, force: bool = False) -> Promotion:
    """Set alias ``champion`` on ``version`` if its registered benchmark passes the gates
    (or ``force``); otherwise raise :class:`PromotionRefused` listing the failing numbers."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not store.enabled():
        raise store.TrackingError(f"tracking is off ({store.SWITCH_ENV}=0): there is no registry to promote in")
    preflight()
    name, c = params.register.model_name, store.client()
    try:
        mv = c.get_model_version(name, str(version))
    except MlflowException as e:
        raise store.TrackingError(f"no version {version} of registered model '{name}' at "
                                     f"{store.redact(store.tracking_uri())} ({e.error_code})") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            f = mlflow.artifacts.download_artifacts(artifact_uri=f"{mv.source}/benchmark.json", dst_path=tmp,
                                                    tracking_uri=store.tracking_uri())
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"version {version} of '{name}' has no readable benchmark.json at {mv.source} "
                                f"({type(e).__name__})") from None
        bench = read_json(f, f"benchmark.json of version {version} of '{name}'", "register a version again")
    fails = gate_failures(bench, params)
    if fails and not force:
        raise PromotionRefused(f"refusing to promote '{name}' version {version} to '{CHAMPION}':\n  "
                               + "\n  ".join(fails) + "\n(use --force to promote anyway)")
    c.set_registered_model_alias(name, CHAMPION, str(version))
    c.set_model_version_tag(name, str(version), "tlcm.promoted_at", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    c.set_model_version_tag(name, str(version), "tlcm.promotion_forced", str(bool(fails)).lower())
    if fails:
        c.set_model_version_tag(name, str(version), "tlcm.gate_failures", "; ".join(fails)[:4000])
        log.warning("promote: forced past failing gates: %s", "; ".join(fails))
    log.info("promote: '%s' version %s is now '%s'", name, version, CHAMPION)
    return Promotion(name, int(version), fails, bool(fails))
