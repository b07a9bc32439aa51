"""Resumable training checkpoints, one folder per run identity; never a lost or a stale one.

Layout: ``<artifacts>/checkpoints/<stage>/<fingerprint>/step-NNNNNNNN.safetensors`` plus
``latest.json`` (the file written last) and ``identity.json`` (what the fingerprint covers:
params, input artifacts, code; see :mod:`tlcm.core.identity`). So:

- a run resumes only checkpoints of its own identity; checkpoints of other identities (other
  params, inputs or code) are never resumed: the stage says so in one log line naming what
  differs, starts fresh, and leaves them where they are until its new output is published
  (:meth:`Checkpointer.prune_others`, called after a successful stage);
- retention removes only older checkpoints of the same identity, never the one just written,
  so ``latest.json`` always names a file that exists;
- each checkpoint records the sha256 of its tensors; a checkpoint that cannot be read or whose
  tensors do not match is named, renamed ``*.corrupt`` (kept for inspection), and the run falls
  back to the previous good checkpoint of the same identity, or starts fresh, saying so.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from tlcm.core import distributed
from tlcm.core.storage import atomic_write_json, save_tensors

log = logging.getLogger("tlcm")

_STEP_FILE = re.compile(r"^step-(\d{8})\.safetensors$")
POINTER, MANIFEST = "latest.json", "identity.json"
_in_use: contextvars.ContextVar[list | None] = contextvars.ContextVar("tlcm_checkpointers", default=None)


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


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class UnusableCheckpoint(Exception):
    """A checkpoint file that cannot be resumed (unreadable, or its tensors do not match its checksum)."""


def _step_of(f: Path) -> int:
    return int(_STEP_FILE.match(f.name).group(1))


def _differences(mine: dict, other: dict) -> list[str]:
    """What differs between two identity manifests, as short names (``params mlcd.seed``, ``input teacher``)."""
    out = []
    for part, label in (("params", "params"), ("inputs", "input"), ("code", "code")):
        a, b = mine.get(part, {}), other.get(part, {})
        out += [f"{label} {k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return out


class Checkpointer:
    """Numbered checkpoints of one run identity (``fingerprint``) under ``folder/<fingerprint>/``.

    ``identity``: the manifest the fingerprint was computed from (recorded beside the checkpoints,
    so that a later run of another identity can say what changed)."""

    def __init__(self, folder: str | Path, fingerprint: str, keep: int = 2, identity: dict | None = None,
                 stage: str | None = None):
        self.root, self.fingerprint, self.keep, self.identity = Path(folder), fingerprint, max(1, keep), identity
        self.folder = self.root / fingerprint
        self.stage = stage or self.root.name

    def _in_use(self) -> None:
        """This identity is the running stage's (it saved or resumed): see :func:`prune_after_success`."""
        used = _in_use.get()
        if used is not None and self not in used:
            used.append(self)

    # -- writing -------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``step-<step>`` completely, then move ``latest.json`` to it, then drop older ones of this identity."""
        self._in_use()
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _flatten(state, "s", tensors)
        path = self.folder / f"step-{step:08d}.safetensors"
        checksum = tensors_sha256(tensors)
        save_tensors(path, tensors, {"skeleton": json.dumps(skeleton), "fingerprint": self.fingerprint,
                                     "tensors_sha256": checksum, "step": str(step)})
        if self.identity is not None and not (self.folder / MANIFEST).is_file():
            atomic_write_json(self.folder / MANIFEST, self.identity)
        atomic_write_json(self.folder / POINTER, {"step": step, "file": path.name, "fingerprint": self.fingerprint,
                                                  "tensors_sha256": checksum})
        older = sorted((f for f in self._files() if _step_of(f) < step), key=_step_of, reverse=True)
        for old in older[self.keep - 1:]:
            old.unlink(missing_ok=True)
        return path

    # -- reading -------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return [f for f in self.folder.iterdir() if _STEP_FILE.match(f.name)]

    def _read(self, path: Path) -> tuple[int, dict[str, Any]]:
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UnusableCheckpoint(f"not a readable safetensors file ({type(e).__name__}: {e})") from None
        if meta.get("fingerprint") != self.fingerprint:
            raise UnusableCheckpoint(f"it belongs to run identity {meta.get('fingerprint')!r}, not {self.fingerprint!r}")
        if "tensors_sha256" not in meta:
            raise UnusableCheckpoint("it has no tensor checksum")
        if tensors_sha256(tensors) != meta["tensors_sha256"]:
            raise UnusableCheckpoint("its tensors do not match the checksum recorded when it was written")
        try:
            state = _unflatten(json.loads(meta["skeleton"]), tensors)
        except (KeyError, ValueError) as e:
            raise UnusableCheckpoint(f"its state layout is unreadable ({e})") from None
        return _step_of(path), state

    def load(self, max_step: int | None = None) -> tuple[int, dict[str, Any]] | None:
        """The newest good checkpoint of this identity (at most ``max_step``), or None: start fresh.

        Says in the log why it starts fresh (checkpoints of other identities, or none left that
        is good) and which checkpoint it falls back to after a corrupt one."""
        files = sorted(self._files(), key=_step_of, reverse=True)
        beyond = [f for f in files if max_step is not None and _step_of(f) > max_step]
        bad: list[Path] = []
        for f in files:
            if f in beyond:
                continue
            try:
                found = self._read(f)
            except UnusableCheckpoint as e:
                log.error("%s: checkpoint %s is unusable: %s; renamed to %s.corrupt", self.stage, f, e, f.name)
                bad.append(f)
                if distributed.is_main():
                    f.replace(f.with_name(f.name + ".corrupt"))
                continue
            self._in_use()
            if bad:
                log.warning("%s: falling back to the previous good checkpoint %s (step %d)", self.stage, f, found[0])
            if distributed.is_main() and self._pointer_file() != f.name:
                atomic_write_json(self.folder / POINTER, {"step": found[0], "file": f.name,
                                                          "fingerprint": self.fingerprint})
            return found
        if bad:
            log.warning("%s: no good checkpoint left in %s; starting fresh", self.stage, self.folder)
            if distributed.is_main():
                (self.folder / POINTER).unlink(missing_ok=True)
        elif beyond:
            log.info("%s: the checkpoints in %s are past steps=%s (step %d); starting fresh (they are kept)",
                     self.stage, self.folder, max_step, _step_of(beyond[-1]))
        elif not files:
            self._announce_others()
        return None

    def load_latest(self) -> tuple[int, dict[str, Any]] | None:
        return self.load()

    def _pointer_file(self) -> str | None:
        try:
            return json.loads((self.folder / POINTER).read_text()).get("file")
        except (OSError, ValueError, AttributeError):
            return None

    # -- other identities ----------------------------------------------------------------
    def others(self) -> list[Path]:
        """Checkpoints of other identities in this stage's folder (their folders; a legacy flat layout's files)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if p != self.folder and not p.name.startswith(".")
                      and (p.is_dir() or _STEP_FILE.match(p.name) or p.name == POINTER))

    def _announce_others(self) -> None:
        others = [p for p in self.others() if p.is_dir()]
        legacy = [p for p in self.others() if p.is_file()]
        if not others and not legacy:
            return
        if others:
            newest = max(others, key=lambda p: p.stat().st_mtime)
            try:
                theirs = json.loads((newest / MANIFEST).read_text())
                what = ", ".join(_differences(self.identity or {}, theirs)[:6]) or "the identity"
            except (OSError, ValueError):
                what = "unknown (no identity.json)"
            where = newest
        else:
            what, where = "made by an older layout without a recorded identity", self.root
        log.warning("%s: the checkpoints in %s are of other inputs (differs: %s); not resumed, starting fresh. "
                    "They stay there until this run publishes its output.", self.stage, where, what)

    def prune_others(self) -> list[Path]:
        """After this identity's output was published: delete the checkpoints of other identities."""
        gone = self.others()
        for p in gone:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        if gone:
            log.info("%s: removed checkpoints of earlier inputs: %s", self.stage, ", ".join(p.name for p in gone))
        return gone


@contextlib.contextmanager
def prune_after_success():
    """Around one stage: once it returned (its output published), delete the checkpoints of other
    identities of every :class:`Checkpointer` that saved or resumed in it. After a failure, they all stay."""
    used: list[Checkpointer] = []
    token = _in_use.set(used)
    try:
        yield used
    finally:
        _in_use.reset(token)
    if distributed.is_main():
        for c in used:
            c.prune_others()
