"""The one check of an output folder before any work: can this process write there?

>>> check_writable("results/run1", "-o")        # raises UsageError("-o results/run1: cannot write there ...")

An existing folder is probed with a file of its own (created, then removed: nothing else in the
folder is touched); a folder still to be made is checked at its nearest existing ancestor, which
must be a folder this process may create entries in (``os.access``, which also sees a read-only
file system). Nothing is created either way.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError

PROBE = ".nnunet-ima-write-probe"


def _probe(folder: Path) -> None:
    """Create and remove a probe file in ``folder``; OSError when that is not possible."""
    path = folder / f"{PROBE}-{os.getpid()}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)
        path.unlink()


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(folder, flag: str) -> None:
    """Raise :class:`UsageError` (``<flag> <folder>: cannot write there (...)``) unless ``folder`` is, or
    can become, a folder this process writes files in."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file: give a folder (new or from an earlier run)")
    try:
        if folder.is_dir():
            _probe(folder)
            return
        base = _nearest_existing(folder)
        if not base.is_dir():
            raise NotADirectoryError(f"{base} is a file, not a folder")
        if not os.access(base, os.W_OK | os.X_OK):
            raise PermissionError(f"no permission to create {folder.name!r} in {base}")
    except OSError as e:
        why = e.strerror if e.strerror else str(e)
        raise UsageError(f"{flag} {folder}: cannot write there ({why})") from None
