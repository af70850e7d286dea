"""Dataset directories: a manifest and a success marker make a directory readable.

Every dataset directory the project writes (raw synthetic logs, feature datasets) carries
``_MANIFEST.json`` and, written last, ``_SUCCESS``. Readers call :func:`read_manifest`, which refuses a
directory without the marker, so a crashed writer never leaves something a reader would pick up.
These helpers work on local paths; the Spark job writes the same two files through Hadoop's
FileSystem so that it works on any filesystem Spark understands.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

MANIFEST_NAME = "_MANIFEST.json"
SUCCESS_NAME = "_SUCCESS"


class IncompleteDatasetError(FileNotFoundError):
    """A dataset directory without its success marker (missing, or still being written)."""


def local_path(path: str | os.PathLike[str]) -> Path:
    text = str(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def is_complete(path: str | os.PathLike[str]) -> bool:
    return (local_path(path) / SUCCESS_NAME).is_file()


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    root = local_path(path)
    if not is_complete(root):
        raise IncompleteDatasetError(
            f"{root} is not a complete dataset (no {SUCCESS_NAME} marker): it is missing, was "
            "written by a run that failed, or is still being written")
    return json.loads((root / MANIFEST_NAME).read_text())


def write_manifest(path: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    """Write the manifest atomically, then the success marker (last)."""
    root = local_path(path)
    atomic_write_text(root / MANIFEST_NAME, manifest_json(manifest))
    atomic_write_text(root / SUCCESS_NAME, "")


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (an undefined metric) as ``None``, recursively, so the
    files the project writes stay standard JSON."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def manifest_json(manifest: dict[str, Any]) -> str:
    """The manifest's on-disk text (for writers that go through another filesystem API)."""
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


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
