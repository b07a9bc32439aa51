"""Typed, frozen params: one object per ``params.yaml`` section, unknown keys rejected.

``params.yaml`` holds the default preset (``mini``) in full. Another preset
(``smoke``, ``sdxl``) is a partial overlay in ``configs/presets/<name>.yaml``
merged over it; select it with the top-level ``preset`` key (so
``dvc exp run -S preset=smoke`` works) or ``--preset`` on the command line.
The code defaults are the ``mini`` values: ``tests/test_params.py`` checks that
``Params()`` equals ``params.yaml``, so the two never disagree.

The package: ``core`` (what every section shares, :class:`Source`, range constants); the sections
by role: ``networks`` (the shapes world and the networks trained in it, or the real ones used
instead), ``distillation`` (prompts, the consistency stages, MPS and DM+GAN), ``benchmark``
(evaluate, applications, the Table 1 suite, register); ``loading`` (:class:`Params`, presets,
:func:`load_params`).
"""
from tlcm.core.params.benchmark import ApplicationsParams, EvaluateParams, GateParams, RegisterParams, SuiteParams
from tlcm.core.params.core import LCM_MAX_STEPS, T_TRAIN, TLCM_MAX_STEPS, TRAIN, ParamsError, Section, Source
from tlcm.core.params.distillation import (ConsistencyParams, DmganParams, IlcdParams, MlcdParams, MpsParams, PromptsParams,
                                      TechniqueParams)
from tlcm.core.params.loading import BASE_PRESET, PRESET_NAME, PRESETS_DIR, ROOT, Params, load_params
from tlcm.core.params.networks import (AutoencoderParams, BappsParams, ControlNetParams, EvaluatorParams, LatentLpipsParams,
                                  RewardParams, TeacherParams, TextParams, UNetParams, WorldParams)

__all__ = [
    "ApplicationsParams", "AutoencoderParams", "BappsParams", "BASE_PRESET", "ConsistencyParams", "ControlNetParams",
    "DmganParams", "EvaluateParams", "EvaluatorParams", "GateParams", "IlcdParams", "LatentLpipsParams", "LCM_MAX_STEPS",
    "MlcdParams",
    "load_params", "MpsParams", "Params", "ParamsError", "PRESET_NAME", "PRESETS_DIR", "PromptsParams",
    "RegisterParams", "RewardParams", "ROOT", "Section", "Source", "SuiteParams", "T_TRAIN", "TeacherParams", "TechniqueParams",
    "TextParams", "TLCM_MAX_STEPS", "TRAIN", "UNetParams", "WorldParams",
]
