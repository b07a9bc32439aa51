"""One run of a stage per artifacts folder at a time.

``<artifacts>/.locks/<stage>.lock`` holds the owner's PID, host and start time while a stage runs
(created with ``O_EXCL``; removed when the stage ends, however it ends). A second run of the same
stage on the same folder stops at once, naming the owner. A lock left by a process that no longer
exists on this host (killed with SIGKILL, a crashed machine) is taken over with a log line. Checks
and takeovers on one host are serialised by an ``flock`` on ``.locks/.guard``.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

log = logging.getLogger("tlcm")


class StageBusy(RuntimeError):
    """The stage is already running on this artifacts folder (the message names the owner)."""


def lock_path(root: str | Path, stage: str) -> Path:
    return Path(root) / ".locks" / f"{stage}.lock"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID from the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = owner.get("proc_start")
    return started is None or _start_time(pid) in (None, started)


def _read(f: Path) -> dict | None:
    try:
        data = json.loads(f.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def _guard(folder: Path) -> Iterator[None]:
    with open(folder / ".guard", "a") as g:
        fcntl.flock(g, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(g, fcntl.LOCK_UN)


def _acquire(f: Path, stage: str, me: dict) -> None:
    with _guard(f.parent):
        owner = _read(f)
        if owner is not None:
            host, pid = owner.get("host"), owner.get("pid")
            if host == me["host"] and not _alive(owner):
                log.warning("%s: taking over the stale lock %s (pid %s on %s, started %s, is no longer running)",
                            stage, f, pid, host, owner.get("started", "?"))
                f.unlink(missing_ok=True)
            else:
                where = "this host" if host == me["host"] else f"host {host}"
                raise StageBusy(
                    f"stage '{stage}' is already running on {f.parent.parent} (pid {pid} on {where}, since "
                    f"{owner.get('started', '?')}); wait for it to finish. If no such process runs any more, "
                    f"delete the lock with `rm {f}` and re-run.")
        fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as out:
            json.dump(me, out)
            out.flush()
            os.fsync(out.fileno())


@contextlib.contextmanager
def stage_lock(root: str | Path, stage: str) -> Iterator[Path]:
    """Hold the lock of ``stage`` on the artifacts folder ``root`` for the block (raises :class:`StageBusy`)."""
    from tlcm.core.storage import writing

    f = lock_path(root, stage)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage, "proc_start": _start_time(os.getpid()),
          "started": dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    with writing(f.parent):
        f.parent.mkdir(parents=True, exist_ok=True)
        _acquire(f, stage, me)
    try:
        yield f
    finally:
        owner = _read(f)
        if owner is not None and owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
            f.unlink(missing_ok=True)


def stage_lock_here(root: str | Path, stage: str):
    """:func:`stage_lock`, except in the processes of a launch whose launcher holds it already
    (``tlcm stage --num-processes N``) and in the non-main ranks of a launch started by hand."""
    from tlcm.core import distributed
    from tlcm.core.launch import LAUNCHED_ENV

    if os.environ.get(LAUNCHED_ENV) or not distributed.is_main():
        return contextlib.nullcontext()
    return stage_lock(root, stage)
