"""What names a model in the results: everything that tells two evaluated models apart.

A model is its trainer *and* the dataset, plans, configuration, fold and checkpoint it was
evaluated from (:func:`identity`). Rows, per-case rows and checks keep the trainer in ``trainer``
and carry the model's name in ``model`` (:func:`name_models`): the trainer alone while the output
folder holds one model of that trainer (so the single-model case reads as before, e.g. the demo's
verdict keyed by trainer), otherwise the trainer with what differs between its models::

    nnUNetTrainerIMA (plans nnUNetPlans)     nnUNetTrainerIMA (plans nnUNetResEncUNetMPlans)
    nnUNetTrainer (fold 0)                   nnUNetTrainer (fold 1, checkpoint_best.pth)

The names are recomputed from every row in the folder each time results are written, so the same
model keeps one name in the CSV, JSON, table and plot of a run.
"""
from __future__ import annotations

import re
from pathlib import Path

#: what tells two models of one trainer apart, with the word it is shown with
MODEL_FIELDS = {"dataset": "{}", "plans": "plans {}", "configuration": "{}", "fold": "fold {}", "checkpoint": "{}"}


def trainer_of(item: dict) -> str:
    return str(item.get("trainer") or item["model"])


def identity(item: dict) -> tuple:
    """(trainer, dataset, plans, configuration, fold, checkpoint) of a row, check or run key."""
    return (trainer_of(item), *(str(item.get(f)) for f in MODEL_FIELDS))


def has_identity(item: dict) -> bool:
    """Whether ``item`` records the fields of :func:`identity` (checks written before issue 24 do not)."""
    return all(f in item for f in MODEL_FIELDS)


def same_model(item: dict, ident: tuple) -> bool:
    """Whether ``item`` belongs to the model ``ident``; an item without the fields is matched by trainer."""
    return identity(item) == ident if has_identity(item) else str(item.get("model")) == ident[0]


def labels(identities) -> dict[tuple, str]:
    """{identity: name}: the trainer, plus what differs among the identities of that trainer."""
    by_trainer: dict[str, list] = {}
    for ident in dict.fromkeys(identities):
        by_trainer.setdefault(ident[0], []).append(ident)
    names = {}
    for trainer, ids in by_trainer.items():
        differ = [i for i in range(len(MODEL_FIELDS)) if len({x[1 + i] for x in ids}) > 1]
        words = list(MODEL_FIELDS.values())
        for x in ids:
            names[x] = trainer if len(ids) == 1 else f"{trainer} ({', '.join(words[i].format(x[1 + i]) for i in differ)})"
    return names


def name_models(*groups: list) -> None:
    """Set ``trainer`` and ``model`` (the name) of every item of ``groups`` that records its identity, in place."""
    items = [it for g in groups for it in g if has_identity(it)]
    for it in items:
        it["trainer"] = trainer_of(it)
    names = labels(identity(it) for it in items)
    for it in items:
        it["model"] = names[identity(it)]


def folder_name(ident: tuple) -> Path:
    """A folder for one model's files (examples): ``<trainer>/<dataset>__<plans>__<configuration>__fold_<f>__<ckpt>``."""
    def safe(v):
        return re.sub(r"[^A-Za-z0-9._-]", "_", str(v)).strip(".") or "_"

    trainer, dataset, plans, configuration, fold, checkpoint = ident
    return Path(safe(trainer)) / "__".join([safe(dataset), safe(plans), safe(configuration), f"fold_{safe(fold)}",
                                           safe(Path(checkpoint).stem)])
