"""What produced a result: fingerprints of the checkpoint, the test data and the code.

A finished (model, attack, eps) result is reused by a rerun only when its *inputs* are the same:

* ``checkpoint``: SHA-256 of the checkpoint file's content. Content, not size + mtime: a retrained
  model can have the same size, a copy (``cp``, ``rsync -t``) can keep the mtime of different
  content, and a plain copy of the same file changes the mtime without changing the model. Hashing
  costs about a second per 500 MB, nothing beside an attack run.
* ``plans``: SHA-256 of the model folder's ``plans.json`` and ``dataset.json`` (the network's layout and
  the preprocessing of raw test cases are read from them, not from the checkpoint).
* ``images`` / ``labels``: SHA-256 over the sorted file list and each file's content hash: the raw
  folders (``-i`` / ``-l``), or for the fold's validation cases ``splits_final.json`` plus the
  preprocessed files of those cases (images and labels live in the same files there).
* ``code``: :data:`CODE_VERSION`, bumped by hand whenever a change alters the figures (attacks,
  counting, metrics); package versions are recorded for information only.

Hashes of one file are cached in-process by (path, size, mtime), so each file is read once per run.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CODE_VERSION = "4"  # bump when a code change alters any reported figure (3: SEA's APGD, masks in every objective;
#                    4: each sample's random start seeded from (seed, attack, eps, case, position),
#                    batches within packs of whole cases)

_CACHE: dict[tuple, str] = {}


def file_digest(path) -> str:
    """SHA-256 (hex) of a file's content, cached by (path, size, mtime_ns)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _CACHE[key] = h.hexdigest()
    return _CACHE[key]


def files_digest(files: list[Path], root: Path) -> str:
    """One digest of a file set: names (relative to ``root``) and contents, in sorted order."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(os.path.relpath(f, root).encode() + b"\0" + file_digest(f).encode() + b"\n")
    return h.hexdigest()


def folder_digest(folder) -> str:
    """Digest of every regular file directly in ``folder`` (raw nnU-Net folders are flat)."""
    folder = Path(folder)
    return files_digest([p for p in folder.iterdir() if p.is_file()], folder)


def fold_files(preprocessed: Path, data_identifier: str, fold: str) -> tuple[list[Path], Path]:
    """The preprocessed files of ``fold``'s validation cases (all cases for fold "all") and the
    split file (nnU-Net's layout: ``<dataset>/<data_identifier>/<case>.*`` and ``<case>_seg.*``)."""
    folder = preprocessed / data_identifier
    split = preprocessed / "splits_final.json"
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if fold == "all" or not split.is_file():
        return files, split
    try:
        splits = json.loads(split.read_text())
        ids = set(splits[int(fold)]["val"])
    except (ValueError, IndexError, KeyError, TypeError):
        return files, split  # a broken split is reported by the loader; hash everything meanwhile

    def case_of(p: Path) -> str:
        stem = p.name.split(".")[0]
        return stem[:-4] if stem.endswith("_seg") else stem

    return [p for p in files if case_of(p) in ids], split


def data_inputs(source: str, images, labels, preprocessed: Path | None, data_identifier: str | None,
                fold: str) -> dict:
    """Fingerprints of the test data: {"images": digest, "labels": digest}."""
    if source != "fold":
        return {"images": folder_digest(images), "labels": folder_digest(labels)}
    files, split = fold_files(preprocessed, data_identifier, fold)
    both = files_digest(files + ([split] if split.is_file() else []), preprocessed)
    return {"images": both, "labels": both}


def describe_changes(old: dict, new: dict) -> str:
    """Which inputs differ, in words: "the checkpoint changed, the labels changed"."""
    words = {"checkpoint": "the checkpoint changed", "images": "the images changed", "labels": "the labels changed",
             "plans": "the model's plans.json or dataset.json changed",
             "code": f"the code version changed ({old.get('code')} -> {new.get('code')})"}
    diff = [words.get(k, f"{k} changed") if k in old else f"the {k} fingerprint was not recorded (a result of an earlier version)"
            for k in new if old.get(k) != new.get(k)]
    if new.get("images") == new.get("labels") and "the images changed" in diff and "the labels changed" in diff:
        diff.remove("the images changed")
        diff[diff.index("the labels changed")] = "the test data changed"
    return ", ".join(diff) or "unchanged"


def versions() -> dict:
    """Package versions, recorded with each result for information (not part of the reuse key)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("nnunet-ima", "nnunetv2", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
