"""The paper's ablations (Table 2 and Table 3) as DVC experiments on the shapes world, at 4 steps.

    python experiments/ablations.py run      # every row: one `dvc exp run <stage> -S ...` from the baseline
    python experiments/ablations.py table    # experiments/ablations.md from the rows' recorded numbers
    python experiments/ablations.py show     # print the commands only

Run from the root of a git checkout where `dvc repro` has run once and whose `dvc.lock` is committed (the rows
share its upstream artifacts; with `TLCM_TRACKING` on, each row's stage run is an MLflow run as usual).
Each row is one `dvc exp run <stage> -S ...` (named ``abl-<row>``, so `dvc exp show` lists its params) started
from the baseline: before a row the workspace's params.yaml and dvc.lock are restored from git and `dvc checkout`
restores the outputs, because a workspace `dvc exp run` applies its result to the workspace and the next row would
otherwise inherit the previous row's overrides. A stage-1 row retrains `mlcd` only, a stage-2 row `ilcd` only.
The row's number is the stage's own end-of-training evaluation (`final_eval` in `artifacts/metrics/<stage>.json`:
alignment ± s.e. and Fréchet distance at 4 steps on held-out prompts, judged by the evaluator), read right after
the row and kept in `experiments/ablations.json` (the metrics files live under the git-ignored artifacts folder, so
the experiment commits do not carry them). The benchmark (`tlcm stage evaluate`) is the reference for the shipped
LoRA.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

OUT, NUMBERS = Path("experiments/ablations.md"), Path("experiments/ablations.json")  # in the checkout run from


@dataclass(frozen=True)
class Row:
    name: str
    paper: str  # the paper's row label (Table 2/3)
    paper_numbers: str  # CS / FID / AS / IR as printed in the paper (SDXL, 4 steps)
    stage: str  # the stage whose final_eval is the row's number
    overrides: tuple[str, ...] = ()


TABLE2 = (
    Row("lcd-s", "L_lcd-s (MSE)", "31.61 / 32.90 / 5.89 / 0.41", "mlcd",
        ("mlcd.num_segments=1", "mlcd.loss=mse")),
    Row("mlcd-s", "L_mlcd-s (MSE)", "31.76 / 27.01 / 5.98 / 0.58", "mlcd", ("mlcd.mds=single", "mlcd.loss=mse")),
    Row("mlcd-s-lpips", "+ L-LPIPS", "31.99 / 27.61 / 5.92 / 0.61", "mlcd", ("mlcd.mds=single",)),
    Row("mlcd-m", "L_mlcd-m (+ L-LPIPS)", "32.31 / 30.99 / 6.01 / 0.69", "mlcd"),
    Row("lcd2", "+ L_lcd2 (whole range)", "32.74 / 32.05 / 6.00 / 0.72", "ilcd", ("ilcd.timesteps=uniform",)),
    Row("ilcd2", "+ L_ilcd2 (milestones)", "33.06 / 25.44 / 5.96 / 0.77", "ilcd"),
    Row("mhp", "+ L_mhp (MPS)", "33.16 / 28.40 / 6.01 / 0.90", "mps"),
    Row("dm", "+ L_dfdm", "33.32 / 30.58 / 6.03 / 0.97", "dmgan", ("dmgan.gan_weight=0",)),
    Row("gan", "+ L_gan", "33.52 / 30.33 / 6.06 / 1.01", "dmgan"),
)
TABLE3 = tuple(Row(f"ilcd-p{p}", f"iLCD teacher steps p = {p}", paper, "ilcd", (f"ilcd.teacher_steps_p={p}",) if p != 3 else ())
               for p, paper in ((1, "32.78 / 26.19 / 5.95 / 0.66"), (2, "32.97 / 25.73 / 5.95 / 0.71"),
                                (3, "33.06 / 25.44 / 5.96 / 0.77"), (4, "33.10 / 25.18 / 5.97 / 0.78")))


def command(row: Row) -> list[str]:
    cmd = ["dvc", "exp", "run", row.stage, "--name", f"abl-{row.name}"]
    for o in row.overrides:
        cmd += ["-S", o]
    return cmd


def unique_rows() -> list[Row]:
    seen, out = set(), []
    for r in TABLE2 + TABLE3:
        key = (r.stage, r.overrides)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def reset_to_baseline() -> None:
    """params.yaml and dvc.lock as committed, and the outputs they name (from the DVC cache)."""
    subprocess.run(["git", "checkout", "--", "params.yaml", "dvc.lock"], check=True)
    if subprocess.run(["dvc", "checkout", "--force", "--quiet"]).returncode:  # outputs of stages never run: absent
        print("dvc checkout: some outputs are not in the cache; `dvc exp run` rebuilds those the row needs", flush=True)


def run() -> None:
    numbers = json.loads(NUMBERS.read_text()) if NUMBERS.is_file() else {}
    for row in unique_rows():
        reset_to_baseline()
        print("$", " ".join(command(row)), flush=True)
        subprocess.run(command(row), check=True)
        m = json.loads(Path(f"artifacts/metrics/{row.stage}.json").read_text())
        numbers[f"abl-{row.name}"] = {"command": " ".join(command(row)), "final_eval": m.get("final_eval") or {}}
        NUMBERS.parent.mkdir(parents=True, exist_ok=True)
        NUMBERS.write_text(json.dumps(numbers, indent=1))
    reset_to_baseline()


def table() -> str:
    numbers = json.loads(NUMBERS.read_text()) if NUMBERS.is_file() else {}
    lines = ["# The paper's ablations on the shapes world (4 steps)", "",
             "Produced by `python experiments/ablations.py run` then `table` (one `dvc exp run` per row; the command "
             "of each row is in the last column). Ours: alignment (± s.e.) and Fréchet distance of the student at 4 "
             "steps on held-out prompts, judged by the evaluator; the paper's: CS / FID / AS / IR on SDXL at 4 steps.",
             ""]
    for title, rows in (("Table 2", TABLE2), ("Table 3 (iLCD teacher steps p)", TABLE3)):
        lines += [f"## {title}", "", "| row | paper (CS / FID / AS / IR) | ours: align. | ± s.e. | Fréchet | command |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            key = next((f"abl-{x.name}" for x in unique_rows() if (x.stage, x.overrides) == (r.stage, r.overrides)), "")
            f = numbers.get(key, {}).get("final_eval", {})
            a, se, fr = f.get("alignment_4step"), f.get("alignment_4step_se"), f.get("frechet_4step")
            cell = lambda v, fmt: "–" if v is None else format(v, fmt)  # noqa: E731
            lines.append(f"| {r.paper} | {r.paper_numbers} | {cell(a, '.3f')} | {cell(se, '.3f')} | {cell(fr, '.1f')} | "
                         f"`{' '.join(command(r))}` |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("run", "table", "show"))
    a = ap.parse_args()
    if a.what == "show":
        for row in unique_rows():
            print(" ".join(command(row)))
    elif a.what == "run":
        run()
    else:
        OUT.write_text(table())
        print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
