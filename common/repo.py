"""Where the project's own files are: the repository root (or the installed tree), from which
``conf/`` files and the scripts the launchers start by path are found."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
