"""A development check that a stage reads only the artifacts it declares (``TLCM_CHECK_READS=1``; the tests set it).

Python's audit hook sees every ``open`` (and ``os.listdir``/``os.scandir``) of the process; while a
stage runs, the files it opens under the artifacts root must lie in its declared ``inputs``, its
own outputs, its checkpoints or the pipeline's bookkeeping (locks, stamps). Files opened by native
code (safetensors, tokenizers) are not seen; their folders are, through the JSON configs beside them.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import re
import sys
from pathlib import Path
from typing import Iterator

ENV = "TLCM_CHECK_READS"
_TMP = re.compile(r"^\.(.+)\.tmp-\d+-[0-9a-f]+$")  # tlcm.core.storage's temporary siblings
_active: contextvars.ContextVar[tuple[Path, set] | None] = contextvars.ContextVar("tlcm_read_audit", default=None)
_installed = False


class UndeclaredInput(RuntimeError):
    """A stage read an artifact that tlcm/core/stages.py does not declare as its input."""


def _hook(event: str, args: tuple) -> None:
    if event not in ("open", "os.listdir", "os.scandir"):
        return
    active = _active.get()
    if active is None or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    if event == "open" and isinstance(args[1], str) and any(c in args[1] for c in "wax+"):
        return  # writes are checked by the outputs, not here
    if event == "open" and args[1] is None and isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR):
        return
    root, seen = active
    try:
        rel = Path(os.path.abspath(os.fsdecode(args[0]))).relative_to(root)
    except ValueError:
        return
    seen.add(rel)


def _normal(rel: Path) -> str:
    return "/".join(_TMP.sub(r"\1", part) for part in rel.parts)


@contextlib.contextmanager
def declared_reads(stage, root: str | Path) -> Iterator[None]:
    """While the block runs, record what ``stage`` opens under ``root``; raise :class:`UndeclaredInput`
    after it if something lies outside its declared inputs and outputs (only with ``TLCM_CHECK_READS=1``)."""
    global _installed
    if os.environ.get(ENV, "") not in ("1", "true", "yes"):
        yield
        return
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True
    seen: set[Path] = set()
    token = _active.set((Path(os.path.abspath(root)), seen))
    try:
        yield
    finally:
        _active.reset(token)
    allowed = (*stage.inputs, *stage.outputs, *stage.caches, f"checkpoints/{stage.name}", ".locks", ".stamps")
    bad = sorted({p for p in map(_normal, seen) if not any(p == a or p.startswith(a + "/") for a in allowed)} - {"."})
    if bad:
        raise UndeclaredInput(f"stage '{stage.name}' read {', '.join(bad)} under the artifacts folder, which "
                              "tlcm/core/stages.py does not declare as its inputs: add them there, then run `tlcm dvc-yaml`")
