"""Stage identity = everything a stage reads (issue "Truthful reruns", item 1).

The declarations in tlcm/core/stages.py are the one list of stages; dvc.yaml is generated from them and
from each stage's computed import closure; the params a stage may read and the artifacts it may
open are enforced while it runs; the identity that keys its checkpoints, its Prefect cache and
`tlcm run`'s up-to-date check changes with its params, inputs and code. The stage-level tests
reproduce the stale results of the issue on the smoke artifacts."""
import logging
import shutil

import pytest
import torch
import yaml
from conftest import REPO

from tlcm.core import dvc_yaml, identity
from tlcm.core import stages as S
from tlcm.core.paths import Paths
from tlcm.core.provenance import tree_sha256


@pytest.mark.math
def test_committed_dvc_yaml_is_the_generated_one():
    assert not dvc_yaml.differs(), "dvc.yaml differs from tlcm/core/stages.py and the code: run `tlcm dvc-yaml`"


@pytest.mark.math
def test_dvc_deps_have_the_imports_the_old_hand_written_file_missed():
    """Before: deps typed by hand missed tlcm/loaders/teacher_io.py for all teacher users, models/caption_head.py
    for `teacher`, models/latent_lpips.py, models/sampling.py, models/scheduler.py for the distillation
    stages, and tlcm/params.py (now tlcm/core/params/), tlcm/storage.py everywhere (an edit left `dvc status` up to
    date)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert {"models/caption_head.py", "tlcm/loaders/teacher_io.py"} <= set(stages["teacher"]["deps"])
    for name in ("lcm_baseline", "mlcd", "ilcd"):
        assert {"tlcm/loaders/teacher_io.py", "models/latent_lpips.py", "models/sampling.py", "models/scheduler.py"} \
            <= set(stages[name]["deps"]), name
    for name, st in stages.items():
        assert {"tlcm/core/params/loading.py", "tlcm/core/params/core.py", "tlcm/core/storage.py", f"tasks/{name}.py"} \
            <= set(st["deps"]), name
    assert list(stages) == list(S.NAMES)


@pytest.mark.math
def test_closure_follows_imports_inside_functions_and_stays_in_the_project():
    closure = identity.code_closure("tasks.mlcd")
    # tasks/distill.py imports tasks.latent_lpips and tasks.generate inside functions only
    assert {"tasks/distill.py", "tasks/latent_lpips.py", "tasks/generate.py", "models/scheduler.py"} <= set(closure)
    assert all(f.split("/")[0] in identity.PACKAGES for f in closure)
    assert "tasks/registry.py" not in closure and "flows/cli.py" not in closure


def _copy_code(dst):
    for pkg in identity.PACKAGES:
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


@pytest.mark.math
def test_identity_follows_code_params_and_inputs(tmp_path, smoke_params):
    code, art = _copy_code(tmp_path / "code"), tmp_path / "art"
    (art / "teacher").mkdir(parents=True)
    (art / "teacher" / "model_index.json").write_text("{}")
    base = identity.stage_identity("mlcd", smoke_params, art, root=code)

    (code / "tlcm" / "loaders" / "teacher_io.py").write_text((code / "tlcm" / "loaders" / "teacher_io.py").read_text() + "\n# edited\n")
    edited = identity.stage_identity("mlcd", smoke_params, art, root=code)
    assert edited.hash != base.hash and edited.fingerprint != base.fingerprint
    assert identity.stage_identity("world", smoke_params, art, root=code).manifest["code"] == \
        identity.stage_identity("world", smoke_params, art).manifest["code"]  # world does not import it

    (art / "teacher" / "model_index.json").write_text('{"changed": 1}')
    assert identity.stage_identity("mlcd", smoke_params, art, root=code).fingerprint != edited.fingerprint

    longer = smoke_params.model_copy(update={"mlcd": smoke_params.mlcd.model_copy(update={"steps": 30})})
    a, b = (identity.stage_identity("mlcd", p, art) for p in (smoke_params, longer))
    assert a.hash != b.hash and a.fingerprint == b.fingerprint  # raise steps: resume, do not start over
    seeded = smoke_params.model_copy(update={"mlcd": smoke_params.mlcd.model_copy(update={"seed": 99})})
    assert identity.stage_identity("mlcd", seeded, art).fingerprint != a.fingerprint
    teacher_longer = smoke_params.model_copy(update={"teacher": smoke_params.teacher.model_copy(update={"steps": 99})})
    assert identity.stage_identity("teacher", teacher_longer, art).fingerprint == \
        identity.stage_identity("teacher", smoke_params, art).fingerprint  # its own budget
    assert identity.stage_identity("mlcd", teacher_longer, art).fingerprint == a.fingerprint  # not read by mlcd:
    # a longer teacher reaches mlcd through the teacher artifact's hash


@pytest.mark.math
def test_a_stage_sees_only_the_params_it_declares(smoke_params):
    view = identity.params_view(S.get("world"), smoke_params)
    assert view.world.seed == smoke_params.world.seed
    assert view.teacher.text.max_length == smoke_params.teacher.text.max_length
    with pytest.raises(identity.UndeclaredParams, match="stage 'world' read params 'teacher.steps'"):
        view.teacher.steps  # noqa: B018
    with pytest.raises(identity.UndeclaredParams, match="'mlcd.lr'"):
        view.mlcd.lr  # noqa: B018
    assert identity.params_view(S.get("register"), smoke_params).mlcd.lr == smoke_params.mlcd.lr  # declares all


@pytest.mark.math
def test_a_stage_that_opens_an_undeclared_artifact_fails(tmp_path, monkeypatch):
    from tlcm.core.read_audit import UndeclaredInput, declared_reads

    monkeypatch.setenv("TLCM_CHECK_READS", "1")
    for d in ("world", "teacher"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.json").write_text("{}")
    stage = S.Stage("probe", (), inputs=("world",))
    with declared_reads(stage, tmp_path):
        (tmp_path / "world" / "x.json").read_text()
    with pytest.raises(UndeclaredInput, match="stage 'probe' read teacher/x.json"):
        with declared_reads(stage, tmp_path):
            (tmp_path / "teacher" / "x.json").read_text()


@pytest.mark.math
def test_every_list_of_stages_reads_the_declarations():
    from flows.tlcm import STAGE_TASKS
    from flows.cli import build_parser
    from tlcm.core.launch import MULTI_PROCESS_STAGES

    sub = next(a for a in build_parser()._actions if a.dest == "cmd").choices
    assert list(next(a for a in sub["stage"]._actions if a.dest == "name").choices) == list(S.NAMES)
    assert list(STAGE_TASKS) == list(S.NAMES)
    assert MULTI_PROCESS_STAGES == {s.name for s in S.STAGES if s.multi_process}
    assert S.downstream("teacher") == ("controlnet", "lcm_baseline", "mlcd", "ilcd", "mps", "dmgan", "evaluate", "register")


def test_tlcm_run_skips_a_stage_whose_identity_and_outputs_are_unchanged(tmp_path, smoke_params, caplog):
    from tasks.registry import run_if_changed

    paths = Paths(tmp_path / "art")
    assert run_if_changed("world", smoke_params, paths) is not None
    with caplog.at_level(logging.INFO, logger="tlcm"):
        assert run_if_changed("world", smoke_params, paths) is None
    assert "stage world: up to date" in caplog.text
    (paths.world / "world.json").unlink()  # an output deleted behind its back: rebuilt
    assert run_if_changed("world", smoke_params, paths) is not None
    more = smoke_params.model_copy(update={"world": smoke_params.world.model_copy(update={"n_eval_prompts": 9})})
    assert run_if_changed("world", more, paths) is not None


# ---- the stale results of the issue, on the smoke artifacts ------------------------------------------

def _scale_tensors(folder, factor: float) -> None:
    """Replace a weight file's tensors by scaled copies: another, equally valid, upstream artifact."""
    from safetensors.torch import load_file, save_file

    for f in folder.rglob("*.safetensors"):
        save_file({k: v * factor for k, v in load_file(str(f)).items()}, str(f))


@pytest.fixture()
def chain_copy(student_chain, tmp_path):
    """A private copy of the smoke artifacts with the mlcd and ilcd LoRAs and their checkpoints."""
    shutil.copytree(student_chain.root, tmp_path / "art", ignore=shutil.ignore_patterns(".locks"))
    return Paths(tmp_path / "art")


def test_mlcd_retrains_after_the_teacher_changes(chain_copy, smoke_params, caplog):
    """Before: 'resumed from checkpoint at step 3/3', lora_mlcd byte-identical, exit 0."""
    from tasks.registry import run_stage

    run_stage("mlcd", smoke_params, chain_copy)  # same inputs: resumes its own checkpoint at the end
    same = tree_sha256(chain_copy.lora("mlcd"))
    _scale_tensors(chain_copy.teacher / "unet", 1.01)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tlcm"):
        run_stage("mlcd", smoke_params, chain_copy)
    assert "not resumed, starting fresh" in caplog.text and "input teacher" in caplog.text
    assert "resumed from checkpoint" not in caplog.text
    assert tree_sha256(chain_copy.lora("mlcd")) != same
    assert len([p for p in chain_copy.checkpoints("mlcd").iterdir() if p.is_dir()]) == 1  # the old one pruned


def test_ilcd_retrains_after_lora_mlcd_is_replaced(chain_copy, smoke_params, caplog):
    """Before: ilcd 'resumed' its old checkpoint and republished its LoRA after lora_mlcd was replaced."""
    from tasks.registry import run_stage

    before = tree_sha256(chain_copy.lora("ilcd"))
    _scale_tensors(chain_copy.lora("mlcd"), 1.5)
    with caplog.at_level(logging.INFO, logger="tlcm"):
        run_stage("ilcd", smoke_params, chain_copy)
    assert "not resumed, starting fresh" in caplog.text and "input lora_mlcd" in caplog.text
    assert tree_sha256(chain_copy.lora("ilcd")) != before
    from tlcm.loaders.lora_io import WEIGHTS
    from tlcm.core.storage import load_tensors

    assert all(torch.isfinite(v).all() for v in load_tensors(chain_copy.lora("ilcd") / WEIGHTS).values())
