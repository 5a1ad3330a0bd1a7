"""Finished units on disk: one file per (run, unit), written atomically by the process that computed it.

A run is one (model, attack, eps) with its settings (its key, as in results.json) and the fingerprints
of what produced it (its inputs: checkpoint, test data, code; :mod:`.provenance`). A unit is one test
case of that run: all its slices (2d) or tiles (3d). The unit's per-sample TP / FP / FN counts, the
perturbation's norms (for the budget check) and its provenance go to::

    <-o>/shards/<run digest>/<case>.npz

``<run digest>`` hashes the key and the inputs, so a run with other settings, another checkpoint or
other data never finds this folder; the file also holds the key, the inputs and the starts of its
samples, and is read back only when all three match (a file from elsewhere, a half-written or damaged
file is not a finished unit). Rank 0 merges a run only when every unit is there (:meth:`ShardStore.merge`)
and removes the run's folder once results.json holds the merged run.

>>> shards = ShardStore(Path("out"))
>>> shards.write(key, inputs, "case_007", starts, evaluation, {"rank": 1, "job": "a1b2"})
>>> shards.read(key, inputs, "case_007", starts).counts.n
8
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_ima.plumbing import atomic_write

from .metrics import Counts

FOLDER = "shards"


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def run_digest(key: dict, inputs: dict) -> str:
    """16 hex digits naming a run's shard folder: its settings and its inputs."""
    return hashlib.sha256(_canonical([key, inputs]).encode()).hexdigest()[:16]


def unit_file(unit: str) -> str:
    """The file name of a unit (a case id; characters unsafe in a file name replaced, plus a hash then)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", unit)
    if safe != unit or safe.startswith("."):
        safe = f"{safe}-{hashlib.sha256(unit.encode()).hexdigest()[:8]}"
    return f"{safe}.npz"


@dataclass
class Shard:
    """One finished unit: its counts (N samples, K classes), per-sample perturbation norms on the whole
    input (``distance``) and on padding (``on_pad``), the samples' starts and the record of who made it
    (``meta``: rank, world size, job, seconds)."""

    counts: Counts
    distance: np.ndarray
    on_pad: np.ndarray
    starts: list
    meta: dict


class ShardStore:
    """The shards of an output folder. Nothing is created before the first :meth:`write`."""

    def __init__(self, out: Path):
        self.root = Path(out) / FOLDER

    def folder(self, key: dict, inputs: dict) -> Path:
        return self.root / run_digest(key, inputs)

    def path(self, key: dict, inputs: dict, unit: str) -> Path:
        return self.folder(key, inputs) / unit_file(unit)

    def write(self, key: dict, inputs: dict, unit: str, starts: list, evaluation, meta: dict) -> Path:
        """Store one finished unit (``evaluation``: its :class:`~.runner.Evaluation`) atomically."""
        path = self.path(key, inputs, unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        c = evaluation.counts
        record = {"key": key, "inputs": inputs, "unit": unit, "seconds": round(evaluation.seconds, 3), **meta}
        buf = io.BytesIO()
        np.savez_compressed(buf, tp=c.tp, fp=c.fp, fn=c.fn, cases=np.array(c.cases, dtype=str),
                            starts=np.array(starts, dtype=np.int64).reshape(len(starts), -1),
                            distance=np.asarray(evaluation.distance, np.float64),
                            on_pad=np.asarray(evaluation.on_pad, np.float64), meta=np.array(_canonical(record)))
        with atomic_write(path, "wb") as f:
            f.write(buf.getvalue())
        return path

    def read(self, key: dict, inputs: dict, unit: str, starts: list) -> Shard | None:
        """The finished unit, or None: missing, unreadable, or made by another run (key, inputs) or of other
        samples (``starts``: the samples the unit has now)."""
        try:
            with np.load(self.path(key, inputs, unit), allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                got = [tuple(int(v) for v in s) for s in z["starts"]]
                shard = Shard(Counts(z["tp"], z["fp"], z["fn"], [str(c) for c in z["cases"]]), z["distance"],
                              z["on_pad"], got, meta)
        except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile):
            return None
        same = (_canonical(meta.get("key")) == _canonical(key) and meta.get("inputs") == inputs
                and meta.get("unit") == unit and got == [tuple(s) for s in starts])
        return shard if same and shard.counts.n == len(starts) else None

    def finished(self, key: dict, inputs: dict, units: dict) -> list[str]:
        """The units (of ``units``: unit -> starts) whose shard is finished and matches."""
        return [u for u, starts in units.items() if self.read(key, inputs, u, starts) is not None]

    def merge(self, key: dict, inputs: dict, units: dict) -> tuple[list[Shard], list[str]]:
        """(the shards of every unit of ``units``, in its order; the units missing). A run is merged only
        when the second is empty."""
        shards, missing = [], []
        for u, starts in units.items():
            s = self.read(key, inputs, u, starts)
            if s is None:
                missing.append(u)
            else:
                shards.append(s)
        return shards, missing

    def clear(self, key: dict, inputs: dict) -> None:
        """Remove a run's shards (once results.json holds the merged run)."""
        shutil.rmtree(self.folder(key, inputs), ignore_errors=True)
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()
