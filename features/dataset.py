"""Dataset directories: a manifest and a success marker make a directory readable.

Every dataset directory the project writes (raw synthetic logs, feature datasets) carries
``_MANIFEST.json`` and, written last, ``_SUCCESS``. Readers call :func:`read_manifest`, which refuses a
directory without the marker, so a crashed writer never leaves something a reader would pick up.
These helpers work on local paths; the Spark job writes the same two files through Hadoop's
FileSystem so that it works on any filesystem Spark understands.
"""

from __future__ import annotations

import json
import os
from typing import Any

from common.files import atomic_write_text, local_path

MANIFEST_NAME = "_MANIFEST.json"
SUCCESS_NAME = "_SUCCESS"


class IncompleteDatasetError(FileNotFoundError):
    """A dataset directory without its success marker (missing, or still being written)."""


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


def manifest_json(manifest: dict[str, Any]) -> str:
    """The manifest's on-disk text (for writers that go through another filesystem API). Keys keep
    their order: a recorded event schema's fields, tables, columns and tasks are ordered mappings
    (the order of the training columns), which sorted keys would scramble."""
    return json.dumps(manifest, indent=2) + "\n"


def check_replaceable(target: str | os.PathLike[str], kind: str, description: str) -> None:
    """Refuse to replace anything but a missing or empty directory or a dataset of ``kind`` (its
    manifest's ``dataset``): a command that rewrites its output never deletes what it did not write.
    ``description`` names that output in the error ("synthetic logs")."""
    root = local_path(target)
    if not root.exists():
        return
    if not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory")
    if not any(root.iterdir()):
        return
    try:
        found = json.loads((root / MANIFEST_NAME).read_text()).get("dataset")
    except (OSError, ValueError, AttributeError):
        found = None
    if found != kind:
        raise FileExistsError(f"{root} is not empty and not {description} written by this command; "
                              "refusing to replace it")
