"""``python -m nnunet_ima.classify [run|train|eval] ...``

With no arguments: ``run`` on Moons (the earlier paper's experiment: STD, SAT0.3, IMA; 30 epochs,
Linf, PGD-100 / IFGSM-10 at eps 0.1, 0.2, 0.3), a few minutes on a 2-core CPU; prints the table and
the output folder. ``--quick`` shrinks any run (2000 training / 500 test samples, at most 10
epochs, IMA's Delta raised to eps_max / epochs) for smoke tests.

Multi-process: ``torchrun --nproc_per_node 2 -m nnunet_ima.classify train ...``.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from .datasets import DatasetMissingError, load_dataset
from .evaluate import ATTACKS, EvalConfig, evaluate, format_table
from .experiment import RunConfig, default_out, load_splits, run_experiment, train_config
from .methods import METHODS
from .presets import PRESETS, get_preset
from .train import model_from_checkpoint, train

QUICK = {"limit_train": 2000, "limit_test": 500, "max_epochs": 10}


def _floats(s: str) -> tuple:
    return tuple(float(v) for v in s.split(",") if v.strip())


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and run")
    g.add_argument("--dataset", default="moons", choices=sorted(PRESETS))
    g.add_argument("--data-root", default=None, help="folder with the dataset files (default per dataset)")
    g.add_argument("--out", default=None, help="output folder (default runs/classify/<dataset>-<time>)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--quick", action="store_true", help="small and fast: 2000/500 samples, <= 10 epochs")
    g.add_argument("--limit-train", type=int, default=None)
    g.add_argument("--limit-test", type=int, default=None)
    g.add_argument("--no-progress", action="store_true")
    h = p.add_argument_group("training (defaults: the dataset's preset from the papers)")
    h.add_argument("--epochs", type=int)
    h.add_argument("--batch-size", type=int)
    h.add_argument("--lr", type=float)
    h.add_argument("--optimizer", choices=("adam", "adamw", "sgd"))
    h.add_argument("--norm", choices=("l2", "linf"))
    h.add_argument("--eps-train", type=float, help="training bound (IMA eps_max, SAT/TRADES/FAT/rand eps, MMA d_max)")
    h.add_argument("--delta", type=float, help="IMA margin expansion step")
    h.add_argument("--std-warmup-epochs", type=int, help="clean epochs before the method starts")
    h.add_argument("--resume", action="store_true", help="continue from <out>/<method>/checkpoint.pt")
    h.add_argument("--init-from", default=None, help="start from these weights (a checkpoint.pt, e.g. of STD); in 'run', 'std' means "
                        "this run's STD model")
    m = p.add_argument_group("method options")
    m.add_argument("--steps", type=int, help="K, PGD steps of the training attacks (20)")
    m.add_argument("--search-steps", type=int, help="N, binary-search steps (10)")
    m.add_argument("--ima-loss", choices=("mean", "beta"), help="later paper's (L0+L1)/2 or earlier paper's beta loss")
    m.add_argument("--ima-beta", type=float)
    m.add_argument("--ima-rule", choices=("later", "earlier"), help="margin update rules of the later/earlier paper")
    m.add_argument("--trades-beta", type=float)
    m.add_argument("--fat-tau", type=int, help="fixed tau (default: FAT's dynamic schedule)")
    m.add_argument("--mma-clean-weight", type=float)
    e = p.add_argument_group("evaluation")
    e.add_argument("--eps", type=_floats, help="noise levels, comma-separated (default: the papers')")
    e.add_argument("--attacks", default=",".join(ATTACKS), help="subset of pgd,ifgsm,aa")
    e.add_argument("--pgd-steps", type=int)
    e.add_argument("--aa-queries", type=int, help="Square queries for the 2-class AutoAttack (5000)")
    e.add_argument("--eval-split", choices=("test", "val"), default="test")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nnunet_ima.classify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="train several methods, evaluate them, print the comparison table")
    _common(r)
    r.add_argument("--methods", default="std,sat,ima",
                   help=f"comma-separated, from {sorted(METHODS)}; 'sat:0.1' sets that method's eps")
    t = sub.add_parser("train", help="train one method")
    _common(t)
    t.add_argument("--method", default="ima", help=f"one of {sorted(METHODS)} (optionally name:eps)")
    t.add_argument("--stop-after-epoch", type=int, default=None, help="stop after this epoch (resume later)")
    v = sub.add_parser("eval", help="evaluate checkpoints")
    _common(v)
    v.add_argument("checkpoints", nargs="+", help="checkpoint.pt files written by train/run")
    return p


def run_config(a) -> RunConfig:
    p = get_preset(a.dataset).with_(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, optimizer=a.optimizer,
                                    norm=a.norm, eps_train=a.eps_train, delta=a.delta, eval_eps=a.eps,
                                    std_warmup_epochs=a.std_warmup_epochs)
    limit_train, limit_test = a.limit_train, a.limit_test
    if a.quick:
        limit_train = limit_train or QUICK["limit_train"]
        limit_test = limit_test or QUICK["limit_test"]
        epochs = min(p.epochs, QUICK["max_epochs"]) if a.epochs is None else p.epochs
        p = p.with_(epochs=epochs, std_warmup_epochs=min(p.std_warmup_epochs, epochs // 2),
                    delta=a.delta or max(p.delta, p.eps_train / epochs))
    mo = {k: getattr(a, k) for k in ("steps", "search_steps", "ima_loss", "ima_beta", "ima_rule", "trades_beta",
                                     "fat_tau", "mma_clean_weight") if getattr(a, k) is not None}
    eo = {"attacks": tuple(s for s in a.attacks.split(",") if s)}
    if a.pgd_steps:
        eo["pgd_steps"] = a.pgd_steps
    if a.aa_queries:
        eo["aa_queries"] = a.aa_queries
    return RunConfig(dataset=a.dataset, data_root=a.data_root, out=a.out, seed=a.seed, device=a.device, preset=p,
                     limit_train=limit_train, limit_test=limit_test, eval_split=a.eval_split, resume=a.resume,
                     init_from=a.init_from, progress=not a.no_progress, method_overrides=mo, eval_overrides=eo)


def _parse_methods(spec: str) -> tuple:
    out = []
    for s in spec.split(","):
        name = s.split(":")[0].strip()
        if name not in METHODS:
            raise SystemExit(f"error: unknown method {name!r}; known: {sorted(METHODS)}")
        out.append(s.strip())
    return tuple(out)


def cmd_run(a) -> int:
    cfg = run_config(a)
    cfg.methods = _parse_methods(a.methods)
    cfg.out = cfg.out or default_out(cfg.dataset)
    t0 = time.perf_counter()
    results = run_experiment(cfg)
    if results:
        import json

        print(Path(cfg.out, "table.txt").read_text(), end="")
        extra = json.loads(Path(cfg.out, "run.json").read_text())
        for k, v in extra.items():
            if k.startswith("suggested_sat_eps_"):
                m = k.removeprefix("suggested_sat_eps_")
                print(f"{m.upper()} margins: median {v:.4g} (suggested SAT eps, see margins_{m}.png), "
                      f"mean {extra['margins_' + m]['mean']:.4g}")
        print(f"outputs in {Path(cfg.out).resolve()} ({time.perf_counter() - t0:.0f}s): "
              + ", ".join(extra["files"]) + ", one folder per method (checkpoint.pt, train_log.jsonl)")
    return 0


def cmd_train(a) -> int:
    cfg = run_config(a)
    spec = _parse_methods(a.method)[0]
    cfg.out = cfg.out or default_out(cfg.dataset)
    if cfg.preset.threads and not str(cfg.device).startswith("cuda"):
        torch.set_num_threads(cfg.preset.threads)
    splits = load_splits(cfg)
    tc = train_config(cfg, spec, Path(cfg.out), splits.clip)
    tc = replace(tc, stop_after_epoch=a.stop_after_epoch)
    res = train(tc, splits)
    print(f"checkpoint: {res.checkpoint.resolve()}")
    if getattr(res.method, "uses_margins", False):
        print(f"{res.method.summary()}; suggested SAT eps (median margin): {res.method.store.suggest_sat_eps():.4g}")
    return 0


def cmd_eval(a) -> int:
    cfg = run_config(a)
    results = {}
    splits = None
    for path in a.checkpoints:
        model, ck = model_from_checkpoint(path, a.device)
        meta = ck["meta"]
        if splits is None:  # dataset and norm of the (first) checkpoint unless given
            cfg.dataset = meta["dataset"]
            norm = a.norm or meta["config"]["method_cfg"]["norm"]
            cfg.preset = get_preset(cfg.dataset).with_(eval_eps=a.eps, norm=norm)
            splits = load_splits(cfg)
        ecfg = replace(EvalConfig(eps=cfg.preset.eval_eps, norm=cfg.preset.norm, clip=splits.clip, seed=a.seed,
                                  device=a.device, progress=not a.no_progress), **cfg.eval_overrides)
        data = splits.val if a.eval_split == "val" else splits.test
        name = meta["config"]["method"]
        if name in ("sat", "rand"):  # fixed-eps methods carry their eps in the name, as in the papers
            name += f"{meta['config']['method_cfg']['eps']:g}"
        name = name if name not in results else f"{name}({path})"
        results[name] = evaluate(model, data, splits.num_classes, ecfg, desc=f"eval {name}")
    print(format_table(results, title=f"{cfg.dataset}, {cfg.preset.norm.upper()} norm"))
    if a.out:
        import json

        from .train import _plain

        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "table.txt").write_text(format_table(results) + "\n")
        Path(a.out, "results.json").write_text(json.dumps(_plain(results), indent=1))
    return 0


COMMANDS = {"run": cmd_run, "train": cmd_train, "eval": cmd_eval}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["run"] + argv
    a = build_parser().parse_args(argv)
    try:
        return COMMANDS[a.command](a)
    except DatasetMissingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
