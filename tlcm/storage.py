"""Atomic writes, safe weight loading and resumable checkpoints.

Every file or folder a stage publishes is first written beside its final
place under a temporary name and then renamed into place, so a later stage
(or a killed run) never sees half of it. Weights are read with safetensors
only; a file that cannot be read stops with a message naming it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class ArtifactError(RuntimeError):
    """An input artifact that is missing or unreadable; the message says what to do."""


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces ``path`` in one rename.
    On error the temporary folder is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = _tmp_sibling(path)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """Load a safetensors file; missing or corrupt files raise ``ArtifactError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(
            f"{what} file is corrupt or not a safetensors file: {path} ({e}). "
            "Delete it and re-run the stage that writes it (for example `dvc repro`)."
        ) from e


def read_json(path: str | Path, what: str, fix: str) -> Any:
    """Read a JSON file; a missing or corrupt one raises ``ArtifactError`` naming the file and ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} not found: {path}; {fix}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{what} is corrupt (not valid JSON): {path} ({e}); {fix}") from e


# ---- nested state (optimizer, RNG, counters) <-> flat safetensors ----------------

def _flatten(obj: Any, prefix: str, tensors: dict) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    return obj


def _unflatten(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, dict) and "__list__" in obj:
        items = [_unflatten(v, tensors) for v in obj["__list__"]]
        return tuple(items) if obj.get("tuple") else items
    return obj


class Checkpointer:
    """Numbered checkpoints in ``folder``; ``latest.json`` points at the newest good one.

    A checkpoint is written completely (temporary name, fsync, rename) before
    the pointer moves, so a kill at any moment leaves the previous good
    checkpoint in place. ``fingerprint`` ties checkpoints to the params that
    made them: a checkpoint for other params is not resumed.
    """

    def __init__(self, folder: str | Path, fingerprint: str, keep: int = 2):
        self.folder, self.fingerprint, self.keep = Path(folder), fingerprint, keep

    def save(self, step: int, state: dict[str, Any]) -> Path:
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _flatten(state, "s", tensors)
        path = self.folder / f"step-{step:08d}.safetensors"
        save_tensors(path, tensors, {"skeleton": json.dumps(skeleton), "fingerprint": self.fingerprint})
        atomic_write_json(self.folder / "latest.json", {"step": step, "file": path.name, "fingerprint": self.fingerprint})
        for old in sorted(self.folder.glob("step-*.safetensors"))[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self) -> tuple[int, dict[str, Any]] | None:
        pointer = self.folder / "latest.json"
        if not pointer.is_file():
            return None
        meta = read_json(pointer, "checkpoint pointer", f"delete {self.folder} to start over")
        if meta.get("fingerprint") != self.fingerprint:
            return None
        path = self.folder / meta["file"]
        tensors = load_tensors(path, what="checkpoint")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            skeleton = json.loads(f.metadata()["skeleton"])
        return int(meta["step"]), _unflatten(skeleton, tensors)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
