"""Before `tlcm run`: are the external assets params name really here? One error listing all that is missing.

Checks (nothing is downloaded; a hub id counts as present only when it is in the Hugging Face cache):
the teacher (``teacher.source`` other than ``train``: ``model_index.json`` and UNet weights), a real
BAPPS root (``bapps.source`` other than ``synthetic``), a prompt file (``prompts.source`` other than
``world``), a real MPS checkpoint (``reward.source`` other than ``train``, when `mps` is enabled) and
every ``suite`` path that is set. Assets the pipeline builds itself are not checked here.
"""
from __future__ import annotations

from pathlib import Path

from tlcm.core.params import Params
from tlcm.core.storage import ArtifactError, read_json

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _teacher_problem(source: str) -> str | None:
    from tlcm.loaders.hub import cached_snapshot, looks_like_hub_id

    if looks_like_hub_id(source):
        folder = cached_snapshot(source)
        where = f"hub id '{source}' is not in the Hugging Face cache"
        get = f"`hf download {source}` (or set teacher.source to a local folder)"
    else:
        folder = Path(source).expanduser()
        where, get = f"'{folder}' has no model_index.json", "set teacher.source to an SDXL/SD1.5 diffusers folder"
    if folder is None or not (folder / "model_index.json").is_file():
        return f"teacher weights (teacher.source): {where}; get them with {get}, or use `teacher.source: train`"
    try:
        index = read_json(folder / "model_index.json", "teacher model_index.json", f"get the teacher again with {get}")
    except ArtifactError as e:
        return f"teacher weights (teacher.source '{source}'): {e}"
    unet = folder / "unet"
    if "unet" in index and not (unet.is_dir() and any(f.suffix in WEIGHT_SUFFIXES for f in unet.iterdir())):
        return f"teacher weights (teacher.source '{source}'): no UNet weight file in {unet}; the download is incomplete"
    return None


def _bapps_problem(root: str) -> str | None:
    from tlcm.loaders.bapps_io import GET_BAPPS, SPLITS

    base = Path(root).expanduser()
    missing = [s for s in SPLITS if not any(p.is_dir() for p in (base / "2afc" / s).glob("*"))]
    if missing:
        return (f"BAPPS (bapps.source): no 2AFC sets under {base}/2afc/{{{','.join(missing)}}}; {GET_BAPPS}")
    return None


def _suite_problems(params: Params) -> list[str]:
    from tlcm.loaders import suite_io as io

    s = params.suite
    checks = [  # (set value, what, how it is checked)
        (s.coco_captions, "suite.coco_captions",
         lambda v: Path(v).expanduser().is_file() or f"'{v}' not found (captions_val2017.json from "
                                                      "http://images.cocodataset.org/annotations/annotations_trainval2017.zip)"),
        (s.coco_images, "suite.coco_images",
         lambda v: Path(v).expanduser().is_dir() or f"folder '{v}' not found (unzip {io.COCO_IMAGES_URL})"),
        (s.clip_model, "suite.clip_model", lambda v: io.resolve_folder(v, "suite.clip_model", f"`hf download {io.CLIP_G_HUB}`")),
        (s.aesthetic_clip, "suite.aesthetic_clip",
         lambda v: io.resolve_folder(v, "suite.aesthetic_clip", f"`hf download {io.CLIP_L_HUB}`")),
        (s.aesthetic_head, "suite.aesthetic_head",
         lambda v: io.resolve_file(v, io.AESTHETIC_FILE, "suite.aesthetic_head", f"download {io.AESTHETIC_URL}")),
        (s.image_reward, "suite.image_reward",
         lambda v: io.resolve_file(v, io.IMAGEREWARD_FILES[0], "suite.image_reward",
                                   f"`hf download {io.IMAGEREWARD_HUB} {' '.join(io.IMAGEREWARD_FILES)}`")),
        (s.fid_inception, "suite.fid_inception",
         lambda v: Path(v).expanduser().is_file() or f"'{v}' not found (download {io.INCEPTION_URL})"),
    ]
    problems = []
    for value, what, check in checks:
        if not value:
            continue
        try:
            ok = check(value)
        except ArtifactError as e:
            problems.append(str(e))
            continue
        if isinstance(ok, str):
            problems.append(f"{what}: {ok}")
    return problems


def _reward_problem(source: str, trust_pickled: bool) -> str | None:
    """What the reward stage itself checks (:func:`tlcm.loaders.reward_io.check_mps_source`): a `tlcm convert-mps` folder
    (before: only a file passed here, so the converted folder the sdxl preset names was reported missing)."""
    from tlcm.loaders.reward_io import check_mps_source

    try:
        check_mps_source(Path(source).expanduser(), trust_pickled)
    except ArtifactError as e:
        return f"MPS reward checkpoint (reward.source): {e}"
    return None


def check_assets(params: Params) -> list[str]:
    """Every external asset ``params`` names that is not available locally, one message each (empty = all there)."""
    problems = []
    if params.teacher.source.pretrained:
        problems.append(_teacher_problem(params.teacher.source.location))
    if params.bapps.source != "synthetic":
        problems.append(_bapps_problem(params.bapps.source))
    if params.prompts.source != "world":
        p = Path(params.prompts.source).expanduser()
        if not p.is_file():
            problems.append(f"prompt file (prompts.source): '{p}' not found; a .txt (one caption per line), .jsonl or "
                            f".parquet of captions (field/column prompts.caption_key = '{params.prompts.caption_key}')")
    if params.mps.enabled and params.reward.source.pretrained:
        problems.append(_reward_problem(params.reward.source.location, params.reward.trust_pickled))
    problems += _suite_problems(params)
    return [p for p in problems if p]


def require_assets(params: Params) -> None:
    """Raise one :class:`ArtifactError` listing every missing asset (see :func:`check_assets`)."""
    problems = check_assets(params)
    if problems:
        raise ArtifactError(f"preset '{params.preset}': {len(problems)} asset(s) missing, nothing was run:\n  - "
                            + "\n  - ".join(problems))
