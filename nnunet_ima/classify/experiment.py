"""One comparison run: train several methods on one dataset the same way, evaluate them the same
way, write the table, CSV/JSON and figures. Used by ``python -m nnunet_ima.classify run``.
"""
from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from nnunet_ima.plumbing import atomic_write, atomic_write_text, to_plain
from nnunet_ima.ui import check_writable, plot_margin_histogram, spelling

from . import distributed as ddp
from .checks import check_eps_scale
from .datasets import DatasetError, Splits, fingerprint, load_dataset
from .evaluate import EvalConfig, aa_announcement, evaluate, format_table, result_rows
from .methods import MethodConfig
from .models import build_model, input_problem, model_for_shape
from .plots import plot_accuracy_vs_eps, plot_decision_boundaries
from .presets import STD_OPTIMIZER, Preset, get_preset
from .resume import check_resume
from .train import CHECKPOINT, LOG, RunExistsError, TrainConfig, TrainResult, train
from .verdict import verdict


@dataclass
class RunConfig:
    dataset: str = "moons"
    methods: tuple = ("std", "sat", "ima")
    data_root: str | None = None
    out: str | None = None
    seed: int = 0
    device: str = "cpu"
    preset: Preset | None = None            # None -> the dataset's preset
    model: str | None = None                # None -> the preset's (imagefolder: chosen from the image size)
    image_size: int | None = None           # imagefolder / covid: resize images to this many pixels a side
    test_split: float | None = None         # imagefolder DIR/<class> layout: fraction held out for testing
    val_split: float | None = None          # ... and for validation
    limit_train: int | None = None
    limit_test: int | None = None
    eval_split: str = "test"                # "test" or "val"
    resume: bool = False
    overwrite: bool = False                 # start again in an ``out`` that holds an old run
    init_from: str | None = None            # weights for the non-STD methods; "std": this run's STD model
    progress: bool = True
    method_overrides: dict = field(default_factory=dict)  # MethodConfig fields (trades_beta, fat_tau, ...)
    eval_overrides: dict = field(default_factory=dict)    # EvalConfig fields (attacks, pgd_steps, ...)


class ModelInputError(ValueError):
    """The chosen model cannot take the dataset's inputs; the message names --image-size / --model."""


FIXED_EPS = ("sat", "rand")  # methods trained at one eps: their rows carry it (SAT0.3), as in the papers
RESULT_FILES = ("run.json", "table.txt", "results.csv", "results.json", "verdict.txt", "accuracy_vs_eps.png",
                "decision_boundaries.png")


def default_out(dataset: str) -> str:
    return str(Path("runs") / "classify" / f"{dataset}-{time.strftime('%Y%m%d-%H%M%S')}")


def data_spec(cfg: RunConfig) -> dict:
    """How the data is loaded (saved in checkpoints, so ``eval`` loads the same split)."""
    root = str(Path(cfg.data_root).resolve()) if cfg.data_root else None
    return {"dataset": cfg.dataset, "root": root, "seed": cfg.seed, "image_size": cfg.image_size,
            "test_split": cfg.test_split, "val_split": cfg.val_split, "limit_train": cfg.limit_train,
            "limit_test": cfg.limit_test}


def load_splits(cfg: RunConfig) -> Splits:
    kwargs = {"augment": cfg.preset.augment} if cfg.dataset == "cifar10" else {}
    if cfg.image_size and cfg.dataset in ("imagefolder", "covid"):
        kwargs["size"] = cfg.image_size
    if cfg.dataset == "imagefolder":
        splits = {"test_split": cfg.test_split, "val_split": cfg.val_split}
        kwargs.update({k: v for k, v in splits.items() if v is not None})
    splits = load_dataset(cfg.dataset, cfg.data_root, seed=cfg.seed, **kwargs)
    splits.split_digest = fingerprint(splits.train, splits.test)  # the whole split, before any limit
    return splits.limit(cfg.limit_train, cfg.limit_test)


def check_model(name: str, num_classes: int, in_shape) -> None:
    """Raise :class:`ModelInputError` unless model ``name`` takes inputs of ``in_shape``: the known size
    rules first (a message naming --image-size / --model), then one forward of two zero samples."""
    problem = input_problem(name, in_shape)
    if problem is None:
        model = build_model(name, num_classes, in_shape).train()
        try:
            with torch.no_grad():
                model(torch.zeros(2, *in_shape))
        except (RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            problem = (f"--model {name} cannot take inputs of shape {tuple(in_shape)} ({first}); choose --model or "
                       "--image-size")
    if problem:
        raise ModelInputError(problem)


def resolve_model(cfg: RunConfig, splits: Splits) -> Preset:
    """The preset with its model settled: ``cfg.model``, else chosen from the input shape where the
    preset says so (imagefolder), else the preset's; checked against the inputs (:func:`check_model`)."""
    p = cfg.preset
    name = cfg.model or (model_for_shape(splits.in_shape) if p.model_by_size else p.model)
    check_model(name, splits.num_classes, splits.in_shape)
    threads = p.threads or (1 if name in ("moons_mlp", "digits_mlp") else None)
    return p.with_(model=name, threads=threads)


def method_config(p: Preset, clip, **overrides) -> MethodConfig:
    return replace(MethodConfig(eps=p.eps_train, norm=p.norm, delta=p.delta, clip=clip, augment=p.augment), **overrides)


def parse_spec(spec: str) -> tuple[str, float | None, str]:
    """'sat:0.1' -> ("sat", 0.1, "sat0.1"); 'ima' -> ("ima", None, "ima")."""
    name, _, eps = spec.partition(":")
    return name.strip(), (float(eps) if eps else None), name.strip() + eps.strip()


def method_label(spec: str, eps_train: float) -> str:
    """Folder and row name of a method spec: 'sat' -> 'sat0.3' (the preset's eps), 'sat:0.1' -> 'sat0.1',
    'ima' -> 'ima'."""
    name, eps, label = parse_spec(spec)
    return f"{name}{eps_train:g}" if name in FIXED_EPS and eps is None else label


def method_dirs(cfg: RunConfig, single: bool = False) -> dict[str, Path]:
    """{method spec: the folder of its checkpoint}: ``out/<label>`` per method (``run``), or ``out`` itself
    for the one method of ``train`` (``single``)."""
    out = Path(cfg.out)
    return {s: out if single else out / method_label(s, cfg.preset.eps_train) for s in cfg.methods}


def existing_outputs(cfg: RunConfig, single: bool = False) -> list[str]:
    """Files of an earlier run in ``cfg.out`` that this run would write (relative names)."""
    out = Path(cfg.out)
    names = list(RESULT_FILES) + [os.path.relpath(d / f, out) for d in method_dirs(cfg, single).values()
                                  for f in (CHECKPOINT, LOG)]
    return [n for n in names if (out / n).is_file()]


def prepare_run(cfg: RunConfig, single: bool = False) -> Splits:
    """Everything that can fail before training, without writing anything: the output folder (writable; an
    old run there needs resume or overwrite, and a resumed one the settings that produced it), the data,
    the model against the data, the noise levels against the data. Settles ``cfg.preset`` (its model) and
    ``cfg.out``. ``single``: the one method of ``train`` keeps its checkpoint in ``out`` itself."""
    cfg.preset = cfg.preset or get_preset(cfg.dataset)
    cfg.out = cfg.out or default_out(cfg.dataset)
    check_writable(cfg.out, spelling("output"))
    found = existing_outputs(cfg, single)
    if found and not (cfg.resume or cfg.overwrite):
        raise RunExistsError(f"--output {cfg.out} already holds a run ({', '.join(found[:3])}"
                             f"{', ...' if len(found) > 3 else ''}); pass --resume to continue it or --overwrite "
                             "to start again")
    dirs = method_dirs(cfg, single)
    if cfg.resume and not any((d / CHECKPOINT).is_file() for d in dirs.values()):
        names = ", ".join(os.path.relpath(d, cfg.out) for d in dirs.values() if not single)
        raise RunExistsError(f"--resume: {cfg.out} holds no run to continue (no {CHECKPOINT}"
                             f"{' of ' + names if names else ''}); leave out --resume to start one")
    splits = load_splits(cfg)
    if cfg.eval_split == "val" and splits.val is None:
        raise DatasetError(f"--eval-split val: {splits.name} has no validation split here; use --eval-split test")
    cfg.preset = resolve_model(cfg, splits)
    if cfg.init_from and cfg.init_from != "std":
        check_init_weights(cfg.init_from, cfg.preset.model, splits)
    check_eps_scale(cfg.preset, splits)
    if cfg.resume:
        for spec, folder in dirs.items():
            if (folder / CHECKPOINT).is_file():
                check_resume(folder / CHECKPOINT, resolved_train_config(cfg, spec, dirs, splits), splits.split_digest)
    return splits


def resolved_train_config(cfg: RunConfig, spec: str, dirs: dict, splits: Splits) -> TrainConfig:
    """The TrainConfig method ``spec`` trains with, ``--init-from std`` resolved to this run's STD checkpoint."""
    tc = train_config(cfg, spec, dirs[spec], splits.clip)
    if tc.init_from == "std":
        tc = replace(tc, init_from=str(dirs.get("std", Path(cfg.out) / "std") / CHECKPOINT))
    return tc


def check_init_weights(path: str, model: str, splits: Splits) -> None:
    """--init-from weights must fit the model that will be trained (same layers and shapes)."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    try:
        build_model(model, splits.num_classes, splits.in_shape).load_state_dict(ck["model"] if "model" in ck else ck)
    except (RuntimeError, KeyError, TypeError) as err:
        first = " ".join(str(err).split())[:200]
        raise ModelInputError(f"--init-from {path}: its weights do not fit --model {model} on inputs "
                              f"{tuple(splits.in_shape)} ({first})") from None


def train_config(cfg: RunConfig, spec: str, out: Path, clip) -> TrainConfig:
    p = cfg.preset
    method, eps, _ = parse_spec(spec)
    overrides = dict(cfg.method_overrides, **({"eps": eps} if eps is not None else {}))
    opt, wd = (p.optimizer, p.weight_decay)
    if method == "std" and cfg.dataset in STD_OPTIMIZER:
        opt, wd = STD_OPTIMIZER[cfg.dataset]
    return TrainConfig(method=method, model=p.model, epochs=p.epochs, batch_size=p.batch_size, optimizer=opt,
                       lr=p.lr, weight_decay=wd, seed=cfg.seed, device=cfg.device, out=str(out), resume=cfg.resume,
                       overwrite=cfg.overwrite, init_from=cfg.init_from if method != "std" else None,
                       std_warmup_epochs=p.std_warmup_epochs if method != "std" else 0, progress=cfg.progress,
                       method_cfg=method_config(p, clip, **overrides), data=data_spec(cfg))


def _clear_results(out: Path) -> None:
    """--overwrite: remove the old run's tables and figures first (checkpoints: :func:`train`)."""
    for n in RESULT_FILES:
        (out / n).unlink(missing_ok=True)
    for f in out.glob("margins_*.png"):
        f.unlink()


def run_experiment(cfg: RunConfig) -> dict:
    """Train every method in ``cfg.methods``, evaluate, write outputs; returns the results dict.

    Nothing is written before :func:`prepare_run` has checked the folder, the data and the model."""
    splits = prepare_run(cfg)
    out = Path(cfg.out)
    t0 = time.perf_counter()
    if cfg.preset.threads and not str(cfg.device).startswith("cuda"):
        torch.set_num_threads(cfg.preset.threads)
    if cfg.overwrite and ddp.is_main() and out.is_dir():
        _clear_results(out)
    trained: dict[str, TrainResult] = {}
    dirs = method_dirs(cfg)
    for spec in cfg.methods:
        label = method_label(spec, cfg.preset.eps_train)
        if cfg.init_from == "std" and parse_spec(spec)[0] != "std" and "std" not in trained:  # STD's weights first
            raise ValueError("--init-from std: put 'std' first in --methods")
        if cfg.resume and not (dirs[spec] / CHECKPOINT).is_file() and ddp.is_main():
            print(f"{label}: no {CHECKPOINT} in {dirs[spec]} to resume; trained from the start", flush=True)
        trained[label] = train(resolved_train_config(cfg, spec, dirs, splits), splits)
    results: dict = {}
    if ddp.is_main():
        results = evaluate_all(cfg, splits, trained)
        results_extra = write_outputs(cfg, splits, trained, results, out)
        results_extra["seconds"] = time.perf_counter() - t0
        atomic_write_text(out / "run.json", json.dumps(to_plain(results_extra, for_json=True), indent=1))
    ddp.barrier()
    return results


def evaluate_all(cfg: RunConfig, splits: Splits, trained: dict) -> dict:
    """Every trained model on the evaluation split, with the same attacks (AutoAttack announced)."""
    p = cfg.preset
    ecfg = replace(EvalConfig(eps=p.eval_eps, norm=p.norm, attacks=p.eval_attacks, clip=splits.clip, seed=cfg.seed,
                              device=cfg.device, progress=cfg.progress), **cfg.eval_overrides)
    note = aa_announcement(ecfg, splits.num_classes)
    if note and cfg.progress:
        print(note, flush=True)
    data = splits.val if cfg.eval_split == "val" else splits.test
    return {m: evaluate(tr.model, data, splits.num_classes, ecfg, desc=f"eval {m}") for m, tr in trained.items()}


def write_outputs(cfg: RunConfig, splits: Splits, trained: dict, results: dict, out: Path) -> dict:
    p = cfg.preset
    title = (f"{splits.name}, {p.model}, {p.norm.upper()} norm, eps_train {p.eps_train:g}, "
             f"{len(splits.train)} train samples")
    table = format_table(results, title=title)
    atomic_write_text(out / "table.txt", table + "\n")
    rows = result_rows(results, p.norm)
    with atomic_write(out / "results.csv", "w") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    atomic_write_text(out / "results.json", json.dumps(to_plain(results, for_json=True), indent=1))
    sentences = verdict(results)
    atomic_write_text(out / "verdict.txt", "".join(s + "\n" for s in sentences))
    extra = {"table": table, "verdict": sentences, "out": str(out), "model": p.model,
             "files": ["table.txt", "verdict.txt", "results.csv", "results.json"]}
    plot_accuracy_vs_eps(results, out / "accuracy_vs_eps.png", title=splits.name)
    extra["files"].append("accuracy_vs_eps.png")
    for m, tr in trained.items():
        if getattr(tr.method, "uses_margins", False):
            plot_margin_histogram(tr.method.store, out / f"margins_{m}.png",
                                  title=f"{m.upper()} margins on {splits.name}")
            extra["files"].append(f"margins_{m}.png")
            extra[f"suggested_sat_eps_{m}"] = tr.method.store.suggest_sat_eps()
            extra[f"margins_{m}"] = tr.method.store.summary()
    if len(splits.in_shape) == 1 and splits.in_shape[0] == 2:
        x, y = splits.test.tensors()
        plot_decision_boundaries({m: tr.model for m, tr in trained.items()}, x, y, out / "decision_boundaries.png")
        extra["files"].append("decision_boundaries.png")
    return extra
