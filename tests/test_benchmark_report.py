"""The benchmark's summary arithmetic (tlcm/report/benchmark_report.py) on hand-made rows."""
import math

import pytest

from tlcm.report.benchmark_report import baseline_gaps, best_baselines, distillation_value, markdown, standard_error, summary_markdown

pytestmark = pytest.mark.math

ROWS = [
    {"method": "real renders (two render sets)", "steps": 0, "kind": "real", "alignment": 1.0, "frechet": 1.0},
    {"method": "teacher DDIM + CFG (reference)", "steps": 25, "kind": "reference", "guidance": 5.0, "alignment": 0.96,
     "frechet": 20.0},
    {"method": "teacher + DDIM", "steps": 2, "kind": "baseline", "guidance": 5.0, "alignment": 0.30, "frechet": 300.0},
    {"method": "teacher + TLCM re-noising sampler", "steps": 2, "kind": "baseline", "guidance": 1.0, "alignment": 0.50,
     "frechet": 120.0},
    {"method": "teacher + DPM-Solver++ (2M)", "steps": 2, "kind": "baseline", "guidance": 2.0, "alignment": 0.45,
     "frechet": 90.0},
    {"method": "teacher + DDIM", "steps": 4, "kind": "baseline", "guidance": 3.5, "alignment": 0.70, "frechet": 60.0},
    {"method": "TLCM after dmgan", "steps": 2, "kind": "student", "guidance": 1.0, "alignment": 0.90, "frechet": 36.0},
    {"method": "TLCM after dmgan", "steps": 4, "kind": "student", "guidance": 1.0, "alignment": 0.97, "frechet": 21.0},
]


def test_standard_error_is_the_binomial_one():
    assert math.isclose(standard_error(0.5, 100), 0.05)
    assert standard_error(1.0, 512) == 0.0


def test_best_baseline_is_chosen_per_step_count_and_per_metric():
    best = best_baselines(ROWS)
    assert set(best) == {2, 4}
    assert best[2]["alignment"]["method"] == "teacher + TLCM re-noising sampler"  # best alignment ...
    assert best[2]["frechet"]["method"] == "teacher + DPM-Solver++ (2M)"  # ... and best Fréchet may differ
    assert best[4]["alignment"] is best[4]["frechet"]


def test_distillation_value_compares_with_the_best_baseline_and_the_teacher():
    (two, four) = distillation_value(ROWS, "TLCM after dmgan")
    assert math.isclose(two["alignment_gain"], 0.40) and math.isclose(two["frechet_ratio_to_best_baseline"], 0.4)
    assert math.isclose(two["alignment_minus_teacher"], -0.06) and math.isclose(two["frechet_ratio_to_teacher"], 1.8)
    assert math.isclose(four["alignment_gain"], 0.27) and math.isclose(four["frechet_ratio_to_teacher"], 1.05)


def test_baseline_gaps_and_markdown():
    gaps = {g["steps"]: g for g in baseline_gaps(ROWS)}
    assert math.isclose(gaps[2]["alignment_below_teacher"], 0.46) and math.isclose(gaps[2]["frechet_ratio_to_teacher"], 4.5)
    md = markdown(ROWS, "# t") + summary_markdown(ROWS, "TLCM after dmgan")
    assert "| 2 | 0.900 | +0.400 | -0.060 | 36.0 | 0.40× | 1.80× |" in md
    assert "| 4 | 0.700 | +0.260 | 60.0 | 3.00× |" in md
