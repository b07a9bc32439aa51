"""The shapes world's prompt sets on disk (``<artifacts>/world/prompts_<split>.jsonl``, written by the
``world`` stage): one JSON object a line with the caption, the canonical labels and the scene spec."""
from __future__ import annotations

import dataclasses
import json

from tlcm.shapes import world as W
from tlcm.core.paths import Paths
from tlcm.core.storage import ArtifactError


def spec_to_json(spec: W.Spec) -> dict:
    return {"caption": spec.caption(), "labels": spec.canonical(), "spec": dataclasses.asdict(spec)}


def spec_from_json(d: dict) -> W.Spec:
    s = d["spec"]
    return W.Spec(tuple(W.Obj(**o) for o in s["objects"]), s["bg"], s.get("position"), s.get("relation"))


def read_prompts(paths: Paths, split: str) -> list[W.Spec]:
    f = paths.prompts(split)
    if not f.is_file():
        raise ArtifactError(f"prompt set not found: {f}. Build it with `tlcm stage world` (or `dvc repro world`).")
    return [spec_from_json(json.loads(line)) for line in f.read_text().splitlines() if line.strip()]
