"""What each demo product was built from, so that a rerun with other settings rebuilds it.

The demo keeps its dataset and models between runs (a rerun skips what is done). A product is
reused only when the settings it was built from are the ones asked for now; each product folder
holds a small JSON record of them (:data:`RECORD`):

* the dataset (``nnUNet_raw/Dataset990_MNIBrain``): ``--resolution`` and ``--slab``. Other values
  would change every image, the preprocessed data and every model, so a changed dataset is refused
  with the ways out named (``--overwrite`` rebuilds it, or another ``--output`` / ``--dataset-id``);
* each model (its ``fold_0`` folder): the dataset's record, the 2d configuration of its plans (the
  network and batch size), the ``NNUNET_IMA_*`` settings that trainer reads (its seed included), and
  for SAT / IMA the SHA-256 of the standard model they start from (a retrained STD retrains them). A
  changed model is retrained, with what changed printed. Beside them (``info``, not compared) the
  record keeps what the training produced: its training-state digest and the library versions.

The evaluation keeps its own fingerprints (checkpoint content, test data, code version; see
:mod:`nnunet_ima_eval.provenance`), so a retrained model is always re-attacked.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from nnunet_ima.plumbing import atomic_write_text

RECORD = "nnunet_ima_demo.json"

# the demo's NNUNET_IMA_* settings each trainer reads (any other NNUNET_IMA_* the user exported counts for all)
DEMO_KEYS = ("EPOCHS", "ITERS", "VAL_ITERS", "K", "N", "DELTA", "EPS_MAX", "SAT_EPS", "INIT_WEIGHTS", "INITIAL_LR",
             "SEED")
READS = {"nnUNetTrainerSTD": ("EPOCHS", "ITERS", "VAL_ITERS", "SEED"),
         "nnUNetTrainerSAT": ("EPOCHS", "ITERS", "VAL_ITERS", "K", "SAT_EPS", "INIT_WEIGHTS", "INITIAL_LR", "SEED"),
         "nnUNetTrainerIMA": ("EPOCHS", "ITERS", "VAL_ITERS", "K", "N", "DELTA", "EPS_MAX", "INIT_WEIGHTS", "INITIAL_LR",
                              "SEED")}
INFO = "info"  # what the training produced (its training-state digest, the library versions): told, never compared


def read(folder: Path) -> dict | None:
    """The record in ``folder``; None when there is none or it cannot be read (then nothing is reused)."""
    try:
        out = json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def write(folder: Path, settings: dict, info: dict | None = None) -> None:
    """Write the record: ``settings`` (what :func:`changes` compares) and ``info`` (stored, not compared)."""
    record = {**settings, **({INFO: info} if info else {})}
    atomic_write_text(Path(folder) / RECORD, json.dumps(record, indent=1, sort_keys=True))


def changes(old: dict | None, new: dict) -> str:
    """What differs, in words ("EPOCHS 10 -> 20, plans changed"); "" when nothing does."""
    if old is None:
        return f"no record of its settings ({RECORD})"
    words = []
    for key in sorted((set(old) | set(new)) - {INFO}):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            words += [f"{key} {w}" for w in changes(a, b).split(", ")]
        elif isinstance(b, str) and len(b) == 64 or isinstance(a, str) and len(a) == 64:  # digests: no values
            words.append(f"{key} changed")
        else:
            words.append(f"{key} {_show(a)} -> {_show(b)}")
    return ", ".join(words)


def _show(v) -> str:
    return "unset" if v is None else str(v)


def dataset_settings(resolution: float, slab: int) -> dict:
    return {"resolution": float(resolution), "slab": int(slab)}


def model_settings(trainer: str, training_env: dict, dataset: dict, plans_2d: dict,
                   start_digest: str | None) -> dict:
    """The inputs of one trained model (see the module docstring)."""
    reads = READS.get(trainer, DEMO_KEYS)
    env = {k[len("NNUNET_IMA_"):]: v for k, v in training_env.items() if k.startswith("NNUNET_IMA_")}
    chosen = {k: v for k, v in env.items() if k in reads or k not in DEMO_KEYS}
    if "INIT_WEIGHTS" in chosen:
        chosen["INIT_WEIGHTS"] = start_digest  # the standard model's content, not its path
    return {"trainer": trainer, "dataset": dataset, "settings": chosen,
            "plans_2d": hashlib.sha256(json.dumps(plans_2d, sort_keys=True).encode()).hexdigest()}
