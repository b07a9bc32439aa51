from pathlib import Path

import pytest

from tlcm.params import ParamsError, load_params

REPO = Path(__file__).resolve().parent.parent


def test_default_file_is_mini_and_valid():
    p = load_params(REPO / "params.yaml")
    assert p.preset == "mini"
    assert p.teacher.unet.block_out_channels == (32, 64, 128)


def test_smoke_overlay_replaces_only_what_it_names():
    mini, smoke = load_params(REPO / "params.yaml"), load_params(REPO / "params.yaml", "smoke")
    assert smoke.teacher.steps < mini.teacher.steps
    assert smoke.teacher.lr == mini.teacher.lr  # not in the overlay: inherited


def test_params_are_frozen():
    p = load_params(REPO / "params.yaml")
    with pytest.raises(Exception):
        p.teacher.steps = 3  # type: ignore[misc]


def test_mistyped_key_is_named_with_file_and_suggestion(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text((REPO / "params.yaml").read_text().replace("  ema_decay:", "  ema_decy:"))
    with pytest.raises(ParamsError) as e:
        load_params(f)
    msg = str(e.value)
    assert "teacher.ema_decy" in msg and str(f) in msg and "did you mean 'ema_decay'" in msg


def test_unknown_section_and_bad_value(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("preset: mini\nteachr: {steps: 3}\n")
    with pytest.raises(ParamsError, match="unknown key 'teachr'"):
        load_params(f)
    f.write_text("preset: mini\nteacher: {steps: -1}\n")
    with pytest.raises(ParamsError, match="teacher.steps"):
        load_params(f)


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
