"""Folders that commands write into (exports, plots): made with their parents, or refused in words.

`mkdir(parents=True, exist_ok=True)` below a file says "[Errno 17] File exists: 'f/afile'", which
reads as if the folder were there; these say which part of the path is a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import ExportError


def first_missing(path: Path) -> Path | None:
    """The outermost folder that making `path` (with its parents) creates: `path` or the first of its
    ancestors that does not exist, which undoing that removes; None when `path` exists."""
    top = None
    while not path.exists():
        top, path = path, path.parent
    return top


def file_in_the_way(path: Path) -> str | None:
    """'X is a file, not a folder' where `path` or the nearest of its ancestors that exists is a file."""
    created = first_missing(path)
    if created is not None and created.is_symlink():  # exists() is False for a link to nothing: mkdir then said "File exists"
        return f"{created} is a link to {os.readlink(created)}, which does not exist"
    existing = path if created is None else created.parent
    return None if existing.is_dir() else f"{existing} is a file, not a folder"


def make_folder(path: Path, what: str) -> Path | None:
    """Make the folder `path` (`what` names it in messages: "output folder out/") with its parents;
    return `first_missing(path)`. ExportError if a part of the path is a file or the system refuses."""
    created = first_missing(path)
    if (problem := file_in_the_way(path)) is not None:
        raise ExportError(f"cannot make {what}: {problem}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(f"cannot make {what}: {error.strerror or error}") from None
    return created


def make_parent(file: str | Path) -> None:
    """Make the folder `file` goes in, as `make_folder` does."""
    make_folder(Path(file).parent, f"a folder for {file}")


def save_figure(figure, file: str | Path) -> None:
    """Write a matplotlib figure to `file`, making its folder, and close it; ExportError naming the file
    where the system refuses (a read-only folder was a bare '[Errno 13] Permission denied', status 1)."""
    import matplotlib.pyplot as plt

    try:
        make_parent(file)
        figure.savefig(file, dpi=100)
    except OSError as error:
        raise ExportError(f"cannot write {file}: {error.strerror or error}") from None
    finally:
        plt.close(figure)


def staging_folder(folder: Path, prefix: str) -> Path:
    """A new hidden folder inside `folder` to write into before moving files in place (tempfile.mkdtemp);
    ExportError naming `folder`, not the staging folder, if the system refuses."""
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    except OSError as error:
        raise ExportError(f"cannot write into {folder}: {error.strerror or error}") from None
