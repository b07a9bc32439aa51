"""Where each stage reads and writes, under one artifacts root (a DVC-managed folder, not a package)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path = Path("artifacts")

    @property
    def world(self) -> Path:
        return self.root / "world"

    @property
    def tokenizer(self) -> Path:
        return self.world / "tokenizer"

    def prompts(self, split: str) -> Path:
        return self.world / f"prompts_{split}.jsonl"

    @property
    def autoencoder(self) -> Path:
        return self.root / "autoencoder"

    @property
    def evaluator(self) -> Path:
        return self.root / "evaluator"

    @property
    def reward(self) -> Path:
        return self.root / "reward"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def controlnet(self) -> Path:
        return self.root / "controlnet"

    @property
    def benchmark(self) -> Path:
        return self.root / "benchmark"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def checkpoints(self, stage: str) -> Path:
        return self.root / "checkpoints" / stage

    def lora(self, stage: str) -> Path:
        """The student LoRA after ``stage`` (mlcd, ilcd, lcm_baseline, ...), a diffusers LoRA folder."""
        return self.root / f"lora_{stage}"
