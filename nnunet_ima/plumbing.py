"""Shared plumbing used by every part of the project: atomic writes and plain-type conversion.
Small on purpose; nothing here knows about IMA. Argument parsing and figures live above the kernel,
in :mod:`nnunet_ima.ui`.

* :func:`atomic_write` / :func:`atomic_write_text` / :func:`atomic_torch_save` - write to a temporary
  file in the same folder, flush + fsync, then ``os.replace``: a crash leaves the old file intact.
* :func:`to_plain` - numpy scalars/arrays to Python numbers/lists (checkpoints that load with
  ``torch.load(weights_only=True)``); ``for_json=True`` also turns tensors and tuples into lists and
  dict keys into strings.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


@contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open ``path.tmp-<pid>`` for writing; on success fsync and move it onto ``path``.

    >>> with atomic_write("results.json", "w") as f:
    ...     f.write(text)
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_torch_save(obj, path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def to_plain(obj, *, for_json: bool = False):
    """Numpy scalars/arrays -> Python numbers/lists, recursively through dicts, lists and tuples.

    With ``for_json=True`` tensors become lists, tuples become lists and dict keys strings, so that
    ``json.dumps`` takes the result (NaN is kept; ``json`` writes it as ``NaN``).
    """
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        return {(str(k) if for_json else k): to_plain(v, for_json=for_json) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, for_json=for_json) for v in obj]
        return items if for_json or isinstance(obj, list) else type(obj)(items)
    if for_json and isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj
