"""Hugging Face hub ids, resolved from the local cache only (nothing is downloaded at run time): what
counts as a hub id, the cached snapshot and revision of one, and a folder or file given as a local path
or a cached hub id. Errors name the param and the command that fetches what is missing."""
from __future__ import annotations

from pathlib import Path

from tlcm.core.storage import ArtifactError


def looks_like_hub_id(source: str) -> bool:
    """``owner/name`` that is not an existing local path."""
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).exists()


def cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of ``repo_id`` in the Hugging Face cache, or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def resolve_folder(source: str, what: str, hint: str, marker: str = "config.json") -> Path:
    """A local folder holding ``marker``: ``source`` itself, or the cached snapshot of hub id ``source``."""
    folder = Path(source).expanduser()
    if looks_like_hub_id(source):
        snap = cached_snapshot(source)
        if snap is None or not (snap / marker).is_file():
            raise ArtifactError(f"{what}: hub id '{source}' is not in the Hugging Face cache (nothing is downloaded at "
                                f"run time); get it with `hf download {source}` or point params at a local folder. {hint}")
        return snap
    if not (folder / marker).is_file():
        raise ArtifactError(f"{what}: no {marker} in '{folder}'. {hint}")
    return folder


def resolve_file(source: str, filename: str, what: str, hint: str) -> Path:
    """A local file: ``source`` itself, ``source/filename``, or ``filename`` in the cached hub repo ``source``."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        raise ArtifactError(f"{what}: '{path / filename}' not found. {hint}")
    if looks_like_hub_id(source):
        snap = cached_snapshot(source)
        if snap is not None and (snap / filename).is_file():
            return snap / filename
        raise ArtifactError(f"{what}: '{filename}' of hub repo '{source}' is not in the Hugging Face cache; get it with "
                            f"`hf download {source} {filename}` or point params at a local file. {hint}")
    raise ArtifactError(f"{what}: '{path}' not found. {hint}")


def hub_revision(repo_id: str) -> str | None:
    """The commit of ``repo_id`` in the local Hugging Face cache (no network), or None."""
    from huggingface_hub import try_to_load_from_cache

    f = try_to_load_from_cache(repo_id, "model_index.json")
    return Path(f).parent.name if isinstance(f, str) else None
