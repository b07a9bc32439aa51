from pathlib import Path

import pytest

from tlcm.core.params import ParamsError, load_params

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.math
def test_default_file_is_mini_and_valid():
    p = load_params(REPO / "params.yaml")
    assert p.preset == "mini"
    assert p.teacher.unet.block_out_channels == (32, 64, 128)


@pytest.mark.math
def test_code_defaults_are_the_mini_values_of_params_yaml():
    """One set of defaults: a key left out of a params file means what params.yaml says (before: teacher.steps
    6000 in code vs 3500 in params.yaml, and the whole ilcd section differed)."""
    from tlcm.core.params import Params

    mini = load_params(REPO / "params.yaml")
    defaults = Params()
    differ = [f"{s}.{k}" for s in Params.model_fields if s != "preset" for k in type(getattr(mini, s)).model_fields
              if getattr(getattr(mini, s), k) != getattr(getattr(defaults, s), k)]
    assert not differ, f"code defaults differ from params.yaml: {differ}"
    assert defaults == mini


@pytest.mark.math
def test_smoke_overlay_replaces_only_what_it_names():
    mini, smoke = load_params(REPO / "params.yaml"), load_params(REPO / "params.yaml", "smoke")
    assert smoke.teacher.steps < mini.teacher.steps
    assert smoke.teacher.lr == mini.teacher.lr  # not in the overlay: inherited


@pytest.mark.math
def test_params_are_frozen():
    p = load_params(REPO / "params.yaml")
    with pytest.raises(Exception):
        p.teacher.steps = 3  # type: ignore[misc]


@pytest.mark.math
def test_mistyped_key_is_named_with_file_and_suggestion(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text((REPO / "params.yaml").read_text().replace("  ema_decay:", "  ema_decy:"))
    with pytest.raises(ParamsError) as e:
        load_params(f)
    msg = str(e.value)
    assert "teacher.ema_decy" in msg and str(f) in msg and "did you mean 'ema_decay'" in msg


@pytest.mark.math
def test_unknown_section_and_bad_value(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("preset: mini\nteachr: {steps: 3}\n")
    with pytest.raises(ParamsError, match="unknown key 'teachr'"):
        load_params(f)
    f.write_text("preset: mini\nteacher: {steps: -1}\n")
    with pytest.raises(ParamsError, match="teacher.steps"):
        load_params(f)


@pytest.mark.math
def test_unknown_preset_lists_known():
    with pytest.raises(ParamsError, match="unknown preset 'nope'.*smoke"):
        load_params(REPO / "params.yaml", "nope")


def test_cli_reports_params_error(tmp_path):
    from conftest import run_cli

    f = tmp_path / "params.yaml"
    f.write_text("preset: mini\nworld: {sed: 1}\n")
    r = run_cli("params", "--params", str(f))
    assert r.returncode == 2
    assert "world.sed" in r.stderr and "did you mean 'seed'" in r.stderr


@pytest.mark.parametrize("section, bad, key, says", [
    ("mlcd: {steps: true}", "steps: true", "mlcd.steps", "valid integer"),  # before: read as 1
    ("mlcd: {lr: .inf}", "lr: .inf", "mlcd.lr", "finite number"),  # before: accepted
    ("mlcd: {lr: .nan}", "lr: .nan", "mlcd.lr", "finite number"),
    ("mlcd: {skip: 5000}", "skip: 5000", "mlcd.skip", "must be < T/M = 1000/8 = 125"),  # before: clamped
    ("teacher: {steps: '3500'}", "'3500'", "teacher.steps", "valid integer"),
    ("evaluate: {student_steps: [2, 9]}", "[2, 9]", "evaluate.student_steps", "each must be in 1..8"),
    ("dmgan: {dm_t_min: 500, dm_t_max: 400}", "400", "dmgan.dm_t_max", "must be > dm_t_min = 500"),
])
@pytest.mark.math
def test_wrong_type_non_finite_or_out_of_range_values_are_refused(tmp_path, section, bad, key, says):
    f = tmp_path / "params.yaml"
    f.write_text(f"preset: mini\n{section}\n")
    with pytest.raises(ParamsError) as e:
        load_params(f)
    assert f"'{key}'" in str(e.value) and says in str(e.value)


@pytest.mark.math
def test_skip_range_follows_the_segments():
    p = load_params(REPO / "params.yaml")
    assert p.mlcd.skip == 20 and p.lcm_baseline.num_segments == 1  # one segment: skip up to 999 is meaningful


@pytest.mark.math
def test_preset_is_a_name_not_a_path(tmp_path):
    """Before: `--preset ../../x` read configs/presets/../../x.yaml, a file outside the presets."""
    import os

    from tlcm.core.params import PRESETS_DIR

    evil = tmp_path / "x.yaml"
    evil.write_text("teacher: {steps: 1}\n")
    rel = os.path.relpath(evil.with_suffix(""), PRESETS_DIR)
    with pytest.raises(ParamsError, match="not a preset name"):
        load_params(REPO / "params.yaml", rel)


@pytest.mark.math
def test_source_is_a_typed_choice_written_as_one_string(tmp_path):
    """`teacher.source` / `reward.source`: `train` (this pipeline trains it) or a location; records read as the YAML."""
    from tlcm.core.params import Source

    p = load_params(REPO / "params.yaml")
    assert p.teacher.source.trained and not p.teacher.source.pretrained and p.teacher.source.location is None
    assert p.teacher.source.resolve(Path("artifacts/teacher")) == "artifacts/teacher"
    assert p.model_dump(mode="json")["teacher"]["source"] == "train" == str(p.reward.source)
    sdxl = load_params(REPO / "params.yaml", "sdxl")
    hub = "stabilityai/stable-diffusion-xl-base-1.0"
    assert sdxl.teacher.source == Source(location=hub) and sdxl.teacher.source.pretrained
    assert sdxl.teacher.source.resolve(Path("artifacts/teacher")) == hub
    assert sdxl.reward.source.location == "data/mps_overall"
    assert sdxl.model_dump(mode="json")["teacher"]["source"] == hub  # stage identities and MLflow params unchanged
    f = tmp_path / "params.yaml"
    for bad in ("3", "true", "''", "[train]"):
        f.write_text(f"preset: mini\nteacher: {{source: {bad}}}\nreward: {{source: train}}\n")
        with pytest.raises(ParamsError) as e:
            load_params(f)
        assert "'teacher.source'" in str(e.value) and "must be `train`" in str(e.value)


@pytest.mark.parametrize("section, key", [
    ("ilcd: {skip: 20}", "ilcd.skip"),  # Alg. 2 has no skip: its target spans a segment in p teacher steps
    ("ilcd: {teacher_path: buffer}", "ilcd.teacher_path"),  # its inputs come from the student: no teacher buffer
    ("ilcd: {rank: 8}", "ilcd.rank"),  # it continues mlcd's LoRA, whose rank is fixed
    ("mlcd: {teacher_steps_p: 3}", "mlcd.teacher_steps_p"),  # Alg. 1 takes one teacher step of skip (Eq. 8)
    ("lcm_baseline: {student_steps_q: 4}", "lcm_baseline.student_steps_q"),
])
@pytest.mark.math
def test_a_consistency_stage_accepts_only_the_keys_it_reads(tmp_path, section, key):
    f = tmp_path / "params.yaml"
    f.write_text(f"preset: mini\n{section}\n")
    with pytest.raises(ParamsError, match=f"unknown key '{key}'"):
        load_params(f)
