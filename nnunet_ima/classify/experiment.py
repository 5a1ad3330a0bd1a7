"""One comparison run: train several methods on one dataset the same way, evaluate them the same
way, write the table, CSV/JSON and figures. Used by ``python -m nnunet_ima.classify run``.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import distributed as ddp
from .datasets import Splits, load_dataset
from .evaluate import EvalConfig, evaluate, format_table, result_rows
from .methods import MethodConfig
from .plots import plot_accuracy_vs_eps, plot_decision_boundaries
from .presets import STD_OPTIMIZER, Preset, get_preset
from .train import TrainConfig, TrainResult, _plain, train


@dataclass
class RunConfig:
    dataset: str = "moons"
    methods: tuple = ("std", "sat", "ima")
    data_root: str | None = None
    out: str | None = None
    seed: int = 0
    device: str = "cpu"
    preset: Preset | None = None            # None -> the dataset's preset
    limit_train: int | None = None
    limit_test: int | None = None
    eval_split: str = "test"                # "test" or "val"
    resume: bool = False
    init_from: str | None = None            # weights for the non-STD methods; "std": this run's STD model
    progress: bool = True
    method_overrides: dict = field(default_factory=dict)  # MethodConfig fields (trades_beta, fat_tau, ...)
    eval_overrides: dict = field(default_factory=dict)    # EvalConfig fields (attacks, pgd_steps, ...)


def default_out(dataset: str) -> str:
    return str(Path("runs") / "classify" / f"{dataset}-{time.strftime('%Y%m%d-%H%M%S')}")


def load_splits(cfg: RunConfig) -> Splits:
    kwargs = {"augment": cfg.preset.augment} if cfg.dataset == "cifar10" else {}
    splits = load_dataset(cfg.dataset, cfg.data_root, seed=cfg.seed, **kwargs)
    return splits.limit(cfg.limit_train, cfg.limit_test)


def method_config(p: Preset, clip, **overrides) -> MethodConfig:
    return replace(MethodConfig(eps=p.eps_train, norm=p.norm, delta=p.delta, clip=clip, augment=p.augment), **overrides)


def parse_spec(spec: str) -> tuple[str, float | None, str]:
    """'sat:0.1' -> ("sat", 0.1, "sat0.1"); 'ima' -> ("ima", None, "ima")."""
    name, _, eps = spec.partition(":")
    return name.strip(), (float(eps) if eps else None), name.strip() + eps.strip()


def train_config(cfg: RunConfig, spec: str, out: Path, clip) -> TrainConfig:
    p = cfg.preset
    method, eps, _ = parse_spec(spec)
    overrides = dict(cfg.method_overrides, **({"eps": eps} if eps is not None else {}))
    opt, wd = (p.optimizer, p.weight_decay)
    if method == "std" and cfg.dataset in STD_OPTIMIZER:
        opt, wd = STD_OPTIMIZER[cfg.dataset]
    return TrainConfig(method=method, model=p.model, epochs=p.epochs, batch_size=p.batch_size, optimizer=opt,
                       lr=p.lr, weight_decay=wd, seed=cfg.seed, device=cfg.device, out=str(out), resume=cfg.resume,
                       init_from=cfg.init_from if method != "std" else None,
                       std_warmup_epochs=p.std_warmup_epochs if method != "std" else 0, progress=cfg.progress,
                       method_cfg=method_config(p, clip, **overrides))


def run_experiment(cfg: RunConfig) -> dict:
    """Train every method in ``cfg.methods``, evaluate, write outputs; returns the results dict."""
    cfg.preset = cfg.preset or get_preset(cfg.dataset)
    cfg.out = cfg.out or default_out(cfg.dataset)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if cfg.preset.threads and not str(cfg.device).startswith("cuda"):
        torch.set_num_threads(cfg.preset.threads)
    splits = load_splits(cfg)
    trained: dict[str, TrainResult] = {}
    for spec in cfg.methods:
        label = parse_spec(spec)[2]
        tc = train_config(cfg, spec, out / label, splits.clip)
        if tc.init_from == "std":  # start from the STD model trained earlier in this run
            if "std" not in trained:
                raise ValueError("--init-from std: put 'std' first in --methods")
            tc = replace(tc, init_from=str(trained["std"].checkpoint))
        trained[label] = train(tc, splits)
    results: dict = {}
    if ddp.is_main():
        p = cfg.preset
        ecfg = replace(EvalConfig(eps=p.eval_eps, norm=p.norm, clip=splits.clip, seed=cfg.seed, device=cfg.device,
                                  progress=cfg.progress), **cfg.eval_overrides)
        data = splits.val if cfg.eval_split == "val" else splits.test
        for m, tr in trained.items():
            results[m] = evaluate(tr.model, data, splits.num_classes, ecfg, desc=f"eval {m}")
        results_extra = write_outputs(cfg, splits, trained, results, out)
        results_extra["seconds"] = time.perf_counter() - t0
        with open(out / "run.json", "w") as f:
            json.dump(_plain(results_extra), f, indent=1)
    ddp.barrier()
    return results


def write_outputs(cfg: RunConfig, splits: Splits, trained: dict, results: dict, out: Path) -> dict:
    p = cfg.preset
    title = f"{splits.name}, {p.norm.upper()} norm, eps_train {p.eps_train:g}, {len(splits.train)} train samples"
    table = format_table(results, title=title)
    (out / "table.txt").write_text(table + "\n")
    rows = result_rows(results)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "results.json", "w") as f:
        json.dump(_plain(results), f, indent=1)
    extra = {"table": table, "out": str(out), "files": ["table.txt", "results.csv", "results.json"]}
    plot_accuracy_vs_eps(results, out / "accuracy_vs_eps.png", title=splits.name)
    extra["files"].append("accuracy_vs_eps.png")
    for m, tr in trained.items():
        if getattr(tr.method, "uses_margins", False):
            tr.method.store.plot_histogram(out / f"margins_{m}.png", title=f"{m.upper()} margins on {splits.name}")
            extra["files"].append(f"margins_{m}.png")
            extra[f"suggested_sat_eps_{m}"] = tr.method.store.suggest_sat_eps()
            extra[f"margins_{m}"] = tr.method.store.summary()
    if len(splits.in_shape) == 1 and splits.in_shape[0] == 2:
        x, y = splits.test.tensors()
        plot_decision_boundaries({m: tr.model for m, tr in trained.items()}, x, y, out / "decision_boundaries.png")
        extra["files"].append("decision_boundaries.png")
    return extra
