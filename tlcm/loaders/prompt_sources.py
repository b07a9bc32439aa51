"""Prompt sources: the data-free stages' captions (``params.prompts``) and MSCOCO-2017 evaluation captions.

``prompts.source``:

- ``world``: the shapes world's train prompts (built by the `world` stage);
- a local ``.txt`` file (one caption per line), ``.jsonl`` (one JSON object per line, the caption
  under ``prompts.caption_key``) or ``.parquet`` (the caption in column ``prompts.caption_key``;
  LAION-Aesthetics 6+ metadata calls it ``TEXT``).

Captions are whitespace-stripped, empty ones dropped, file order kept; ``prompts.limit`` > 0
keeps the first ``limit``.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from tlcm.core.params import Params
from tlcm.core.paths import Paths
from tlcm.core.storage import ArtifactError

FORMATS = (".txt", ".jsonl", ".parquet")
COCO_CAPTIONS_URL = "http://images.cocodataset.org/annotations/annotations_trainval2017.zip"


def _what_to_put(path: Path, key: str) -> str:
    return (f"prompts.source = '{path}': put one caption per line in a .txt file, or a .jsonl/.parquet file with the "
            f"caption under '{key}' (prompts.caption_key), e.g. LAION-Aesthetics 6+ captions; or set "
            "`prompts.source: world` for the shapes world's prompts")


def _clean(captions: list, path: Path, key: str) -> list[str]:
    out = []
    for i, c in enumerate(captions, 1):
        if c is None:
            continue
        if not isinstance(c, str):
            raise ArtifactError(f"{path}: caption {i} under '{key}' is {type(c).__name__}, not a string")
        if c.strip():
            out.append(c.strip())
    return out


def _read_txt(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_jsonl(path: Path, key: str) -> list[str]:
    captions = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path}: line {i} is not JSON ({e}); {_what_to_put(path, key)}") from e
        if not isinstance(row, dict) or key not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ArtifactError(f"{path}: line {i} has no '{key}' field (found {keys}); set prompts.caption_key "
                                "to the field that holds the caption")
        captions.append(row[key])
    return _clean(captions, path, key)


def _read_parquet(path: Path, key: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported with its name
        raise ArtifactError(f"{path}: not a readable parquet file ({e}); {_what_to_put(path, key)}") from e
    if key not in names:
        raise ArtifactError(f"{path}: no column '{key}' (columns: {names}); set prompts.caption_key to the column "
                            "that holds the caption (LAION-Aesthetics metadata: TEXT)")
    return _clean(pq.read_table(path, columns=[key]).column(key).to_pylist(), path, key)


def read_caption_file(path: str | Path, caption_key: str = "caption") -> list[str]:
    """Every non-empty caption of a local .txt / .jsonl / .parquet file, in file order."""
    path = Path(path).expanduser()
    if path.suffix not in FORMATS:
        raise ArtifactError(f"unsupported prompt file type '{path.suffix}' ({path}); {_what_to_put(path, caption_key)}")
    if not path.is_file():
        raise ArtifactError(f"prompt file not found: {path}; {_what_to_put(path, caption_key)}")
    if path.suffix == ".txt":
        captions = _read_txt(path)
    elif path.suffix == ".jsonl":
        captions = _read_jsonl(path, caption_key)
    else:
        captions = _read_parquet(path, caption_key)
    if not captions:
        raise ArtifactError(f"{path}: no captions; {_what_to_put(path, caption_key)}")
    return captions


def read_prompts(params: Params, paths: Paths) -> list[str]:
    """The training prompts of the data-free stages, as ``params.prompts`` says."""
    p = params.prompts
    if p.source == "world":
        from tlcm.loaders.world_io import read_prompts as read_world_prompts

        captions = [s.caption() for s in read_world_prompts(paths, "train")]
    else:
        captions = read_caption_file(p.source, p.caption_key)
    return captions[: p.limit] if p.limit else captions


def read_coco_captions(path: str | Path, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (image file, caption) pairs from MSCOCO ``captions_val2017.json``: one caption per image.

    Deterministic in ``seed`` and prefix-stable: images are ordered by one seeded permutation of
    all captioned images (sorted by id) and each image's caption is a seeded pick among its
    captions (sorted by annotation id), so the first k pairs are the same for every n >= k.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ArtifactError(f"COCO captions not found: {path}; set suite.coco_captions to "
                            f"annotations/captions_val2017.json from {COCO_CAPTIONS_URL}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = {im["id"]: im["file_name"] for im in data["images"]}
        caps: dict[int, list[tuple[int, str]]] = defaultdict(list)
        for a in data["annotations"]:
            caps[a["image_id"]].append((a["id"], " ".join(a["caption"].split())))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: not a COCO captions file ({type(e).__name__}: {e}); expected "
                            f"captions_val2017.json from {COCO_CAPTIONS_URL}") from e
    ids = sorted(i for i in files if caps.get(i))
    if n > len(ids):
        raise ArtifactError(f"{path}: asked for {n} captioned images, the file has {len(ids)} (lower suite.n_images)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    picks = rng.integers(0, 2**31 - 1, size=len(ids))
    out = []
    for j in order[:n]:
        options = sorted(caps[ids[j]])
        out.append((files[ids[j]], options[picks[j] % len(options)][1]))
    return out
