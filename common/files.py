"""Durable file operations every component shares: a crash never leaves a half-written file or
directory where a reader would pick it up.

These work on local paths; the Spark jobs do the same through Hadoop's FileSystem
(:class:`features.hadoop.HadoopFiles`) so that they work on any filesystem Spark understands.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

HIDDEN_PREFIXES = ("_", ".")
"""Path components that readers skip: markers (``_SUCCESS``), state, temporaries being written."""


def local_path(path: str | os.PathLike[str]) -> Path:
    text = str(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (an undefined metric) as ``None``, recursively, so the
    files the project writes stay standard JSON."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def atomic_write_text(target: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``target``, fsync it, then rename over ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates owner-only files; the target gets the permissions open() would give it.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(target: Path, record: Any, *, indent: int | None = 2) -> None:
    """Write ``record`` as standard JSON (undefined metrics as ``null``, :func:`json_safe`), keys
    sorted, atomically (:func:`atomic_write_text`)."""
    atomic_write_text(Path(target), json.dumps(json_safe(record), indent=indent, sort_keys=True) + "\n")


def visible_files(root: Path, suffix: str = ".parquet") -> list[Path]:
    """The data files below ``root`` ending in ``suffix``, sorted, skipping every path with a
    component under ``root`` that starts with one of :data:`HIDDEN_PREFIXES`."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(path for path in root.rglob(f"*{suffix}")
                  if not any(part.startswith(HIDDEN_PREFIXES) for part in path.relative_to(root).parts))


def point_symlink(link: Path, target: str) -> None:
    """Make ``link`` a symlink to ``target`` (relative to the link's folder), atomically: a new link
    under a unique hidden name is renamed over the old one, so readers see the old or the new."""
    link = Path(link)
    temporary = link.parent / f".{link.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    os.symlink(target, temporary)
    try:
        os.replace(temporary, link)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Yield an empty hidden directory beside ``target`` to build in; when the block succeeds it
    replaces ``target`` whole (:func:`replace_directory`); when it fails it is removed and ``target``
    stays as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        # mkdtemp's private 0700 would outlive the rename.
        staging.chmod(0o777 & ~_current_umask())
        yield staging
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_directory(staging: Path, target: Path) -> None:
    """Move the complete directory ``staging`` to its sibling ``target``, replacing what is there:
    the previous ``target`` is moved aside first and removed only after the new one is in place."""
    if not target.exists():
        os.replace(staging, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.retired-", dir=target.parent))
    os.replace(target, retired / target.name)
    os.replace(staging, target)
    shutil.rmtree(retired)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
