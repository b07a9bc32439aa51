"""The whole params object (one typed section per ``params.yaml`` section) and how it is read:
``params.yaml`` (the ``mini`` preset in full), a preset overlay from ``configs/presets/``, validation
with errors that name the file and the key."""
from __future__ import annotations

import difflib
import re
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tlcm.core.params.benchmark import ApplicationsParams, EvaluateParams, RegisterParams, SuiteParams
from tlcm.core.params.core import ParamsError, Section
from tlcm.core.params.distillation import DmganParams, IlcdParams, MlcdParams, MpsParams, PromptsParams
from tlcm.core.params.networks import (AutoencoderParams, BappsParams, ControlNetParams, EvaluatorParams, LatentLpipsParams,
                                 RewardParams, TeacherParams, WorldParams)


ROOT = Path(__file__).resolve().parents[3]
PRESETS_DIR = ROOT / "configs" / "presets"
BASE_PRESET = "mini"
PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


# `register` (the stage) shadows ABCMeta.register on the class; harmless for a field, so silence pydantic.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class Params(Section):
        preset: str = BASE_PRESET
        world: WorldParams = WorldParams()
        evaluator: EvaluatorParams = EvaluatorParams()
        autoencoder: AutoencoderParams = AutoencoderParams()
        teacher: TeacherParams = TeacherParams()
        bapps: BappsParams = BappsParams()
        latent_lpips: LatentLpipsParams = LatentLpipsParams()
        mlcd: MlcdParams = MlcdParams()
        ilcd: IlcdParams = IlcdParams(seed=8, steps=100, lr=5e-5, eval_every=100, checkpoint_every=50)
        lcm_baseline: MlcdParams = MlcdParams(num_segments=1)
        prompts: PromptsParams = PromptsParams()
        reward: RewardParams = RewardParams()
        mps: MpsParams = MpsParams()
        dmgan: DmganParams = DmganParams()
        controlnet: ControlNetParams = ControlNetParams()
        evaluate: EvaluateParams = EvaluateParams()
        applications: ApplicationsParams = ApplicationsParams()
        suite: SuiteParams = SuiteParams()
        register: RegisterParams = RegisterParams()

        def section(self, name: str) -> Section:
            return getattr(self, name)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _explain(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            known = _known_keys(Params, e["loc"])
            hint = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            lines.append(
                f"{source}: unknown key '{key}'"
                + (f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(known)})")
            )
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"{source}: '{key}': {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_params(path: str | Path = "params.yaml", preset: str | None = None) -> Params:
    """Read ``path``, overlay ``preset`` (or the file's own ``preset`` key), validate."""
    path = Path(path)
    data = _read_yaml(path)
    name = preset or data.get("preset", BASE_PRESET)
    source = str(path)
    known = sorted([p.stem for p in PRESETS_DIR.glob("*.yaml")] + [BASE_PRESET])
    if not isinstance(name, str) or not PRESET_NAME.match(name):
        raise ParamsError(f"preset {name!r} is not a preset name: give one of {', '.join(known)} (presets are "
                          f"names of files in {PRESETS_DIR}, not paths)")
    if name != BASE_PRESET:
        overlay_path = PRESETS_DIR / f"{name}.yaml"
        if not overlay_path.is_file():
            raise ParamsError(f"unknown preset '{name}' (known: {', '.join(known)})")
        data = _deep_merge(data, _read_yaml(overlay_path))
        source = f"{path} + {overlay_path}"
    data["preset"] = name
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise ParamsError(_explain(e, source)) from None
