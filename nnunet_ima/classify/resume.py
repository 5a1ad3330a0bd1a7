"""What produced a checkpoint, compared before it is continued (``--resume``) or evaluated (``eval``).

A checkpoint's ``meta`` records its training settings (``config``: the :class:`~.train.TrainConfig`),
how its data were loaded (``data``) and the fingerprint of the whole train / test split
(``split_digest``, :func:`~.datasets.fingerprint`). A run is continued only when everything that
shaped the weights so far is unchanged: the model, optimiser, learning rate, batch size, seed, initial
weights, warm-up, the method's own settings (:attr:`~.methods.Method.settings`: STD reads none) and
the training data (same split, same ``--limit-train``). ``--epochs`` may grow (the documented way to
train longer). An evaluation must use the split the checkpoint was trained on, or its test images
could be training images. Each refusal is one line naming the settings that changed.

>>> check_resume(Path("out/ima/checkpoint.pt"), train_config, splits.split_digest)   # RunExistsError if changed
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from nnunet_ima.plumbing import to_plain

from .checks import FIELD_FLAGS, ArgError
from .methods import METHODS
from .train import RunExistsError, TrainConfig, load_checkpoint

#: TrainConfig fields that shape the weights (besides the method's settings and the data), with their flag
TRAIN_FLAGS = {"model": "--model", "optimizer": "--optimizer", "lr": "--lr", "batch_size": "--batch-size",
               "weight_decay": "the preset's weight decay", "seed": "--seed", "init_from": "--init-from",
               "std_warmup_epochs": "--std-warmup-epochs"}
#: how the data were loaded (TrainConfig.data), with their flag; all but limit_train make the split
DATA_FLAGS = {"dataset": "--dataset", "root": "--data-root", "image_size": "--image-size", "seed": "--seed",
              "test_split": "--test-split", "val_split": "--val-split", "limit_train": "--limit-train"}


def _show(v) -> str:
    return "(default)" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _changes(old: dict, new: dict, flags: dict, loose: bool = False) -> list[str]:
    """"--lr 0.001 -> 0.5" for each field of ``flags`` that differs (``loose``: only where both are given)."""
    out = []
    for field, flag in flags.items():
        a, b = old.get(field), new.get(field)
        if field == "init_from" and a and b:
            a, b = os.path.abspath(a), os.path.abspath(b)
        if a != b and not (loose and (a is None or b is None)):
            out.append(f"{flag} {_show(a)} -> {_show(b)}")
    return out


def data_changes(meta: dict, data: dict, split_digest: str | None, split_only: bool = False) -> list[str]:
    """What differs between the data a checkpoint was trained on and ``data`` (a data spec) whose split has
    ``split_digest``. With both fingerprints, an equal split needs no equal settings (defaults spelt out or
    not); a different split names the settings that differ, or says that the files did."""
    old = meta.get("data") or {}
    flags = {k: v for k, v in DATA_FLAGS.items() if not (split_only and k == "limit_train")}
    known = meta.get("split_digest") and split_digest
    if known and meta["split_digest"] == split_digest:
        return [] if split_only else _changes(old, data, {"limit_train": "--limit-train"})
    named = _changes(old, data, flags, loose=not known)
    if known and not [c for c in named if not c.startswith("--limit-train")]:
        named.append(f"the images under {old.get('root') or 'the data root'} (the split's fingerprint changed)")
    return named


def setting_changes(meta: dict, cfg: TrainConfig, split_digest: str | None) -> list[str]:
    """Every difference between what produced a checkpoint (its ``meta``) and ``cfg`` that matters for
    continuing it (see the module docstring)."""
    old, new = meta.get("config") or {}, to_plain(asdict(cfg), for_json=True)
    out = _changes(old, new, TRAIN_FLAGS)
    if old.get("method") != new["method"]:
        out.append(f"--method {old.get('method')} -> {new['method']}")
    fields = METHODS[cfg.method].settings if cfg.method in METHODS else ()
    out += _changes(old.get("method_cfg") or {}, new["method_cfg"],
                    {f: FIELD_FLAGS.get(f, f"the preset's {f}") for f in fields})
    return list(dict.fromkeys(out + data_changes(meta, cfg.data, split_digest)))


def check_resume(path: Path, cfg: TrainConfig, split_digest: str | None) -> None:
    """RunExistsError (one line) unless the checkpoint at ``path`` may be continued with ``cfg``."""
    meta = load_checkpoint(path).get("meta") or {}
    changed = setting_changes(meta, cfg, split_digest)
    if changed:
        raise RunExistsError(f"--resume: {path} was trained with other settings ({'; '.join(changed)}); resume with "
                             f"the same settings, or start again with --overwrite or another --output")


def check_eval_split(path: str, meta: dict, data: dict, split_digest: str | None) -> None:
    """ArgError unless checkpoint ``path`` was trained on the split ``data`` loads (no test image trained on)."""
    changed = data_changes(meta, data, split_digest, split_only=True)
    if changed:
        raise ArgError(f"{path} was trained on another split ({'; '.join(changed)}): its test images could be "
                       f"training images; evaluate with the checkpoint's own data settings (leave these out)")
