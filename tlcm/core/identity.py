"""A stage's identity: everything it reads, hashed. One hash for DVC, Prefect, `tlcm run` and checkpoints.

Identity of stage X (declared in :mod:`tlcm.core.stages`) = the resolved values of the params it
declares (after the preset overlay) + the content hashes of the input artifacts it declares +
the content hashes of its code: the project-internal import closure of ``tasks/X.py``
(:func:`code_closure`: every ``import`` anywhere in the module, inside functions too, followed
through the project's packages ``tlcm``, ``models``, ``tasks``, ``tools`` and ``flows``).

- :func:`stage_identity` ``.hash`` is the Prefect cache input and what ``tlcm run`` compares with
  the stamp the last successful run left (``<artifacts>/.stamps/<stage>.json``);
- ``.fingerprint`` (the same, less the stage's own budget keys: raise ``steps`` to train longer
  from where a run stopped) names the stage's checkpoint folder: a checkpoint of other inputs,
  params or code is never resumed (:mod:`tlcm.core.checkpoints`);
- ``dvc.yaml`` lists the same params, inputs and code (``tlcm dvc-yaml``, :mod:`tlcm.core.dvc_yaml`).
"""
from __future__ import annotations

import ast
import contextlib
import contextvars
import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from tlcm.core import stages as S
from tlcm.core.checkpoints import Checkpointer
from tlcm.core.params import ROOT, Params
from tlcm.core.storage import atomic_write_json
from tlcm.core.provenance import file_sha256, tree_sha256

log = logging.getLogger("tlcm")

PACKAGES = ("tlcm", "models", "tasks", "tools", "flows")  # the project's code; everything else is a dependency
# Budget keys do not change what a step computes: a checkpoint made under another budget is resumed
# (raise `steps` to train longer from where a run stopped; the LR schedule follows the new total).
BUDGET_KEYS = frozenset({"steps", "max_minutes", "checkpoint_every", "eval_every", "eval_prompts"})


# ---- code: the import closure ----------------------------------------------------------------

def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imports(file: Path, module: str) -> set[str]:
    """Every module name ``file`` imports (at any depth of the syntax tree), absolute."""
    tree = ast.parse(file.read_text(), str(file))
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in [*parts, base] if p)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


@lru_cache(maxsize=None)
def _closure(module: str, root: Path, stamp: tuple) -> tuple[str, ...]:
    todo, seen, files = [module], set(), set()
    while todo:
        m = todo.pop()
        if m in seen or m.split(".")[0] not in PACKAGES:
            continue
        seen.add(m)
        parts = m.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py too
            f = _module_file(".".join(parts[:i]), root)
            if f is not None and f not in files:
                files.add(f)
                todo.extend(_imports(f, ".".join(parts[:i])))
    return tuple(sorted(f.relative_to(root).as_posix() for f in files))


def code_closure(module: str, root: Path = ROOT) -> tuple[str, ...]:
    """The project files (relative paths, sorted) that ``module`` imports, directly or not."""
    sources = tuple(sorted((str(p), p.stat().st_mtime_ns) for pkg in PACKAGES for p in (root / pkg).rglob("*.py")))
    return _closure(module, Path(root), sources)


# ---- params ---------------------------------------------------------------------------------

def _sections(params: Params) -> list[str]:
    return [k for k in type(params).model_fields if k != "preset"]


def declared_params(stage: S.Stage, params: Params | None = None) -> tuple[str, ...]:
    if stage.params == (S.ALL_PARAMS,):
        return tuple(_sections(params) if params is not None else [k for k in Params.model_fields if k != "preset"])
    return stage.params


def param_values(stage: S.Stage, params: Params) -> dict[str, Any]:
    """The resolved values of the keys ``stage`` declares (works on a :func:`params_view` too)."""
    out = {}
    for key in declared_params(stage, params):
        node: Any = params
        for part in key.split("."):
            node = getattr(node, part)
        out[key] = node.model_dump(mode="json") if hasattr(node, "model_dump") else json.loads(json.dumps(node))
    return out


class UndeclaredParams(RuntimeError):
    """A stage read a params key that its declaration in tlcm/core/stages.py does not list."""


class _Guard:
    """Stands in for a params section (or part of one) that the stage did not declare."""

    def __init__(self, obj: Any, stage: str, key: str, allowed: tuple[str, ...]):
        self._obj, self._stage, self._key, self._allowed = obj, stage, key, allowed

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        key = f"{self._key}.{attr}"
        if attr in self._allowed:
            return getattr(self._obj, attr)
        sub = tuple(a.split(".", 1)[1] for a in self._allowed if a.startswith(attr + "."))
        if sub:
            return _Guard(getattr(self._obj, attr), self._stage, key, sub)
        raise UndeclaredParams(f"stage '{self._stage}' read params '{key}', which tlcm/core/stages.py does not declare for "
                               f"it: add it to the stage's params there, then run `tlcm dvc-yaml`")

    def __repr__(self) -> str:
        return f"<params '{self._key}' (not declared by stage '{self._stage}')>"


def params_view(stage: S.Stage, params: Params) -> Params:
    """``params`` in which only the sections and keys that ``stage`` declares can be read."""
    declared = declared_params(stage, params)
    update = {}
    for section in _sections(params):
        if section in declared:
            continue
        keys = tuple(k.split(".", 1)[1] for k in declared if k.startswith(section + "."))
        update[section] = _Guard(getattr(params, section), stage.name, section, keys)
    return params.model_copy(update=update)


# ---- the identity ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    stage: str
    manifest: dict  # {"params": {key: value}, "inputs": {artifact: sha256}, "code": {file: sha256}}
    hash: str  # everything: the Prefect cache input, `tlcm run`'s up-to-date check
    fingerprint: str  # less the stage's own budget keys: the checkpoint identity


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stage_identity(name: str, params: Params, artifacts: Path, root: Path = ROOT) -> Identity:
    """What ``name`` reads right now: params values, input artifact hashes, code hashes."""
    stage = S.get(name)
    manifest = {
        "params": param_values(stage, params),
        "inputs": {a: tree_sha256(Path(artifacts) / a) for a in stage.inputs},
        "code": {f: file_sha256(root / f) for f in code_closure(stage.module, root)},
    }
    own = manifest["params"].get(name)
    budgetless = {**manifest, "params": {**manifest["params"], **(
        {name: {k: v for k, v in own.items() if k not in BUDGET_KEYS}} if isinstance(own, dict) else {})}}
    return Identity(name, manifest, _digest(manifest), _digest(budgetless)[:16])


_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("tlcm_identity", default=None)


@contextlib.contextmanager
def running(ident: Identity) -> Iterator[Identity]:
    """The identity of the stage running in this context (what :func:`checkpointer` uses)."""
    token = _current.set(ident)
    try:
        yield ident
    finally:
        _current.reset(token)


def checkpointer(name: str, params: Params, paths, keep: int = 2) -> Checkpointer:
    """The checkpoints of stage ``name`` under its current identity (``paths.checkpoints(name)/<fingerprint>/``)."""
    ident = _current.get()
    if ident is None or ident.stage != name:
        ident = stage_identity(name, params, paths.root)
    return Checkpointer(paths.checkpoints(name), ident.fingerprint, keep, identity=ident.manifest, stage=name)


# ---- stamps: what the last successful run of a stage read and wrote ----------------------------

def outputs_hash(name: str, artifacts: Path) -> str | None:
    """Hash of the stage's declared outputs; None if any is missing."""
    hashes = {}
    for f in S.get(name).outputs:
        h = tree_sha256(Path(artifacts) / f)
        if h is None:
            return None
        hashes[f] = h
    return _digest(hashes)


def stamp_path(name: str, artifacts: Path) -> Path:
    return Path(artifacts) / ".stamps" / f"{name}.json"


def read_stamp(name: str, artifacts: Path) -> dict:
    try:
        data = json.loads(stamp_path(name, artifacts).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_stamp(ident: Identity, artifacts: Path, **extra: Any) -> None:
    """After a successful run: the identity it ran with and the outputs it left."""
    atomic_write_json(stamp_path(ident.stage, artifacts), {
        "stage": ident.stage, "identity": ident.hash, "outputs": outputs_hash(ident.stage, artifacts),
        "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"), **extra})


def up_to_date(ident: Identity, artifacts: Path) -> bool:
    """The last successful run had this identity and its outputs are still as it left them."""
    stamp = read_stamp(ident.stage, artifacts)
    return bool(stamp) and stamp.get("identity") == ident.hash and stamp.get("outputs") is not None \
        and stamp.get("outputs") == outputs_hash(ident.stage, artifacts)
