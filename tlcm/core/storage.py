"""Atomic writes and safe weight loading (resumable checkpoints: :mod:`tlcm.core.checkpoints`).

Every file or folder a stage publishes is first written beside its final
place under a temporary name and then renamed into place, so a later stage
(or a killed run) never sees half of it; a write that fails (full disk, no
permission) removes its temporary and stops with one line naming the folder.
Weights are read with safetensors only; a file that cannot be read stops with
a message naming it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save


class ArtifactError(RuntimeError):
    """An input artifact that is missing or unreadable; the message says what to do."""


class StorageError(ArtifactError):
    """A folder cannot be written (full disk, no permission, read-only); nothing half-written was published."""


# errno -> (what happened, what to do with the folder)
DISK_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free space there, or point --artifacts (TLCM_ARTIFACTS) at a disk "
                                                  "with room"),
    errno.EDQUOT: ("disk quota exceeded", "free space there, or point --artifacts (TLCM_ARTIFACTS) elsewhere"),
    errno.EFBIG: ("file too large for this file system or process limit", "point --artifacts elsewhere"),
    errno.EACCES: ("permission denied", "make {folder} writable (`chmod -R u+w {folder}`) or point --artifacts "
                                        "elsewhere"),
    errno.EPERM: ("operation not permitted", "make {folder} writable (`chmod -R u+w {folder}`) or point --artifacts "
                                             "elsewhere"),
    errno.EROFS: ("read-only file system", "point --artifacts (TLCM_ARTIFACTS) at a writable folder"),
}


_RUST_OS_ERROR = re.compile(r"os error (\d+)|Os \{ code: (\d+)")


def _errno_of(e: BaseException) -> int | None:
    """The errno of an OSError, or of the I/O error a Rust extension (safetensors, tokenizers) reports in its message."""
    if isinstance(e, OSError):
        return e.errno
    m = _RUST_OS_ERROR.search(str(e))
    return int(m.group(1) or m.group(2)) if m else None


def disk_error_message(e: BaseException, folder: str | Path | None = None) -> str | None:
    """One line for a full/unwritable folder (None for other errors)."""
    code = _errno_of(e)
    if code not in DISK_ERRORS:
        return None
    filename = getattr(e, "filename", None)
    where = Path(folder) if folder is not None else Path(filename).parent if filename else None
    what, fix = DISK_ERRORS[code]
    where_s = str(where) if where is not None else "the output folder"
    existing = where
    while existing is not None and not existing.exists() and existing.parent != existing:
        existing = existing.parent  # `chmod` needs a folder that exists
    return (f"cannot write {where_s}: {what}. Nothing half-written was published; "
            f"{fix.format(folder=existing if existing is not None else where_s)}, then re-run.")


@contextlib.contextmanager
def writing(folder: str | Path) -> Iterator[None]:
    """Turn a full-disk / permission error while writing into ``folder`` into a one-line :class:`StorageError`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - Rust extensions raise plain Exceptions for I/O errors
        msg = disk_error_message(e, folder)
        if msg is None:
            raise
        raise StorageError(msg) from None


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` that is removed if the block fails (the caller renames it into place)."""
    tmp = _tmp_sibling(path)
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    with _temporary(path) as tmp:
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
    tmp = _tmp_sibling(path)
    try:
        with writing(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        with writing(path):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with writing(path.parent):
        old = None
        if path.exists():
            old = _tmp_sibling(path)
            os.replace(path, old)
        os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


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
