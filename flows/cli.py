"""The ``tlcm`` command: run stages, the whole pipeline, sample images, export, register.

An entry point, like the Prefect flow beside it: it parses arguments and calls the stages
(``tasks``) and the library (``tlcm``); nothing imports it (``python -m flows.cli`` runs it too)."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from tasks.register import PromotionRefused
from tlcm.core.locks import StageBusy
from tlcm.core.params import ParamsError, load_params
from tlcm.core.paths import Paths
from tlcm.core.storage import ArtifactError, disk_error_message
from tlcm.tracking.runs import TrackingError
from tlcm.core.training import NonFiniteLoss


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--preset", default=None, help="preset overlay: smoke, mini (default) or sdxl")
    p.add_argument("--artifacts", default=os.environ.get("TLCM_ARTIFACTS", "artifacts"),
                   help="artifacts folder (default: artifacts, or $TLCM_ARTIFACTS)")


def build_parser() -> argparse.ArgumentParser:
    from tlcm.core.stages import NAMES

    ap = argparse.ArgumentParser(prog="tlcm", description="TLCM: data-free distillation of a latent diffusion model "
                                 "into a few-step LoRA (arXiv 2406.05768).")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("stage", help="run one pipeline stage (what each dvc.yaml stage calls)")
    s.add_argument("name", choices=NAMES)
    _common(s)
    s.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="train on N processes (accelerate launch: CPU gloo, or one per GPU; same result as 1 process "
                        "at the same global batch_size, which must divide by N)")

    r = sub.add_parser("run", help="run every stage in order, in this process (skipping those that are up to date)")
    _common(r)
    r.add_argument("--until", choices=NAMES, default=None, help="stop after this stage")

    g = sub.add_parser("generate", help="sample images from the teacher (or a LoRA) and write a PNG grid")
    _common(g)
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--guidance", type=float, default=None, help="CFG weight (default: evaluate.guidance_scale)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--teacher", default=None, help="teacher hub id or folder (default: from params)")
    g.add_argument("--lora", default=None, help="a TLCM LoRA folder or MLflow URI (models:/tlcm-shapes@champion): "
                   "samples the student with TLCMScheduler, CFG off")
    g.add_argument("--out", default="samples.png")

    dv = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage declarations (tlcm/core/stages.py) and the code")
    _common(dv)
    dv.add_argument("--check", action="store_true", help="write nothing; exit 1 if dvc.yaml differs from the declarations")

    ex = sub.add_parser("export", help="write the shipped LoRA for other tools: a diffusers folder, a peft folder "
                        "(official TLCM inference) or one kohya .safetensors (ComfyUI, Automatic1111)")
    _common(ex)
    ex.add_argument("source", nargs="?", default=None, help="a LoRA folder or a registered version "
                    "(models:/tlcm-shapes@champion); default: the shipped LoRA under --artifacts")
    ex.add_argument("--format", required=True, choices=("diffusers", "peft", "kohya"))
    ex.add_argument("--out", required=True, help="output folder (diffusers, peft) or .safetensors file (kohya)")
    ex.add_argument("--teacher", default=None, help="the base model (kohya names need its UNet config); default: "
                    "the version's own base, else teacher.source from params")

    pp = sub.add_parser("params", help="print the resolved params (after the preset overlay)")
    _common(pp)

    pr = sub.add_parser("promote", help="set alias 'champion' on a registered version if it passes register.gates")
    _common(pr)
    pr.add_argument("version", help="model version number (see alias 'candidate')")
    pr.add_argument("--force", action="store_true", help="promote even if the gates fail (recorded on the version)")

    cm = sub.add_parser("convert-mps", help="one-time conversion of the released (pickled) MPS checkpoint to safetensors")
    _common(cm)
    cm.add_argument("checkpoint", help="MPS_overall_checkpoint.pth (a pickled module: only convert files you trust)")
    cm.add_argument("out", help="output folder (model.safetensors + config.json); then set reward.source to it")
    cm.add_argument("--trust-pickled", action="store_true", help="required: allow torch.load(weights_only=False)")
    cm.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder or cached hub id to copy alongside")

    pl = sub.add_parser("plan", help="print the computed memory/throughput plan (SDXL on A100s, and the mini teacher)")
    _common(pl)
    pl.add_argument("--only", choices=("sdxl", "mini"), default=None, help="one of the two plans (default: both)")
    pl.add_argument("--mfu", type=float, default=0.40, help="assumed A100 model-FLOPs utilisation (default 0.40)")
    pl.add_argument("--headroom", type=float, default=0.10, help="fraction of the 80 GiB kept free (default 0.10)")
    pl.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="SDXL weights/activations")

    from tools.check_gpu import add_arguments

    cg = sub.add_parser("check-gpu", help="the GPU acceptance check (smoke pipeline, SDXL-architecture stages, 1024² "
                        "sampling, bf16 vs float32) -> JSON; on a machine without CUDA it says so and exits 0")
    add_arguments(cg)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    log = logging.getLogger("tlcm")
    if args.cmd == "check-gpu":
        from tools.check_gpu import run

        return run(args)
    try:
        params = load_params(args.params, args.preset)
        paths = Paths(Path(args.artifacts))
        if args.cmd == "params":
            print(json.dumps(params.model_dump(mode="json"), indent=2))
        elif args.cmd == "stage":
            from tasks.registry import run_stage
            from tlcm.core.distributed import launched
            from tlcm.core.launch import launch_or_join
            from tlcm.core.locks import stage_lock

            launcher = args.num_processes > 1 and not launched()  # it holds the lock for the processes it starts
            with stage_lock(paths.root, args.name) if launcher else contextlib.nullcontext():
                code = launch_or_join(args.num_processes, sys.argv[1:] if argv is None else argv, params, args.name)
            if code is not None:
                return code
            run_stage(args.name, params, paths)
        elif args.cmd == "run":
            from tasks.registry import run_if_changed
            from tlcm.tracking import runs as tracking
            from tools.preflight import require_assets
            from tlcm.core.stages import NAMES

            require_assets(params)  # missing external assets fail here, in seconds, all named at once
            with tracking.pipeline_run(params, paths, tags={"tlcm.entry": "tlcm run"}):
                for name in NAMES:
                    run_if_changed(name, params, paths)
                    if name == args.until:
                        break
        elif args.cmd == "dvc-yaml":
            from tlcm.core import dvc_yaml

            if args.check:
                if dvc_yaml.differs():
                    log.error("dvc.yaml differs from the stage declarations; run `tlcm dvc-yaml`")
                    return 1
                print("dvc.yaml matches the stage declarations")
            else:
                print(dvc_yaml.write())
        elif args.cmd == "promote":
            from tasks.register import promote

            res = promote(args.version, params, force=args.force)
            print(f"{res.model_name} version {res.version} -> champion" + (" (forced past failing gates)" if res.forced else ""))
        elif args.cmd == "export":
            from tasks.register import final_artifact
            from tools.export import export
            from tlcm.loaders.teacher_io import resolve_teacher

            teacher = args.teacher or resolve_teacher(params.teacher.source, paths.teacher)
            print(export(args.source or str(final_artifact(paths)), args.format, Path(args.out), teacher))
        elif args.cmd == "convert-mps":
            from tlcm.loaders.reward_io import convert_mps

            print(convert_mps(args.checkpoint, args.out, args.trust_pickled, args.tokenizer))
        elif args.cmd == "plan":
            import torch

            from tools.plan import markdown_tables, mini_plan, sdxl_plan

            plans = []
            if args.only != "mini":
                plans.append(sdxl_plan(args.mfu, args.headroom, dtype=getattr(torch, args.dtype), params_file=args.params))
            if args.only != "sdxl":
                plans.append(mini_plan(params, args.params))
            print("\n".join(markdown_tables(p) for p in plans))
        elif args.cmd == "generate":
            from tasks.generate import generate

            out = generate(params, paths, args.prompt, args.steps, args.guidance, args.seed, args.teacher, Path(args.out),
                           args.lora)
            print(out)
        return 0
    except (ParamsError, ArtifactError, NonFiniteLoss, TrackingError, PromotionRefused, StageBusy) as e:
        log.error("%s", e)
        return 2
    except OSError as e:  # a full disk or an unwritable folder outside the atomic writers: one line, no traceback
        msg = disk_error_message(e)
        if msg is None:
            raise
        log.error("%s", msg)
        return 2


if __name__ == "__main__":
    sys.exit(main())
