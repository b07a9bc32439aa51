"""What every params section shares: strict, frozen sections (unknown keys rejected), the range
constants the checks use, and :class:`Source`, the typed `train`-or-a-location choice."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator


T_TRAIN = 1000  # discrete DDPM timesteps of the teacher (SD, SDXL and the shapes teacher): range checks below
TLCM_MAX_STEPS = 8  # models/scheduler.py: TLCM sampling on the M = 8 milestones supports 1..8 steps
LCM_MAX_STEPS = 50  # diffusers' LCMScheduler: at most original_inference_steps (50)


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the file and key."""


class Section(BaseModel):
    """Strict types (a bool is not an int, a string is not a number), finite floats, unknown keys rejected."""
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _lists_as_tuples(cls, data: Any) -> Any:
        """YAML lists are tuples here (strict mode takes no list for a tuple field)."""
        if isinstance(data, dict):
            return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return data


TRAIN = "train"  # the YAML word for "this pipeline's own stage trains it"


class Source(BaseModel):
    """Where a network a stage uses comes from, written in YAML as one string: ``train`` (this pipeline's
    own stage trains it in the shapes world) or the location of a pretrained one (a local folder or file, or
    a hub id). Serialises back to that string, so records and stage identities read as the YAML does."""
    model_config = ConfigDict(frozen=True, strict=True)
    location: str | None = Field(None, description="folder / file / hub id of a pretrained network; None = trained here")

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, data: Any) -> Any:
        if isinstance(data, (Source, dict)):  # Source(location=...) in Python
            return data
        if not isinstance(data, str) or not data.strip():
            raise ValueError(f"must be `{TRAIN}` (trained by this pipeline) or a folder, file or hub id")
        return {"location": None if data == TRAIN else data}

    @model_serializer
    def _to_yaml(self) -> str:
        return TRAIN if self.location is None else self.location

    @property
    def trained(self) -> bool:
        """Built by this pipeline's own stage (the shapes world)."""
        return self.location is None

    @property
    def pretrained(self) -> bool:
        """Loaded from :attr:`location` (a real model: SDXL, SD1.5, MPS)."""
        return self.location is not None

    def resolve(self, trained_at: Path) -> str:
        """The location to load from: ``trained_at`` (the stage's output folder) when trained here."""
        return str(trained_at) if self.location is None else self.location

    def __str__(self) -> str:
        return self._to_yaml()


def _each_in(values: tuple[int, ...], lo: int, hi: int, what: str) -> tuple[int, ...]:
    bad = [v for v in values if not lo <= v <= hi]
    if bad:
        raise ValueError(f"{bad} out of range: each must be in {lo}..{hi} ({what})")
    return values
