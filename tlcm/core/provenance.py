"""Provenance: the project's git commit and content hashes of files and folders (what a run, a stage
identity and a registered version are recorded with)."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def git_commit(cwd: Path | None = None) -> str:
    """``HEAD`` of the project repo, with ``-dirty`` if tracked files changed; ``unknown`` outside git."""
    try:
        kw = dict(cwd=cwd or Path.cwd(), capture_output=True, text=True, timeout=10)
        sha = subprocess.run(["git", "rev-parse", "HEAD"], **kw).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **kw).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def file_sha256(path: Path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(path: Path) -> str | None:
    """Content hash of a file or folder (relative names + bytes); None if it does not exist."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        h.update((file_sha256(f) or "").encode() + b"\n")
    return h.hexdigest()
