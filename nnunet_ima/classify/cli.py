"""``python -m nnunet_ima.classify [run|train|eval] ...``

With no arguments: ``run`` on Moons (the earlier paper's experiment: STD, SAT0.3, IMA; 30 epochs,
Linf, PGD-100 / IFGSM-10 at eps 0.1, 0.2, 0.3), a few minutes on a 2-core CPU; prints the table, one
sentence per noise level saying what it shows, and the output folder (``runs/classify/<dataset>-<time>``).
``--quick`` shrinks any run for smoke tests (2000 training / 500 test samples, at most 10 epochs)
and says what it changed.

Your own images: ``run --dataset imagefolder --data-root DIR`` with ``DIR/<class>/*.png`` (split
here, ``--test-split``) or ``DIR/train/<class>`` + ``DIR/test/<class>``; ``--image-size`` resizes on
load, ``--model`` picks the network (default: chosen from the image size).

Every argument, path and device is checked before data are loaded or anything is trained; a bad
one is one line on stderr and exit code 2. A folder that holds a run is continued with ``--resume``
or started again with ``--overwrite``, never mixed.

Multi-process: ``torchrun --nproc_per_node 2 -m nnunet_ima.classify train ...``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from nnunet_ima.plumbing import atomic_write_text, to_plain
from nnunet_ima.ui import DEVICES, OneLineParser, UsageError, add_option, check_writable, report_error, resolve_device, \
    spelling

from .checks import FIELD_DESTS, PROG, ArgError, check_checkpoint, check_data_options, check_eps_scale, \
    check_eval_options, check_numbers, check_paths, check_schedule, parse_methods
from .datasets import DatasetError
from .evaluate import ATTACKS, EvalConfig, aa_announcement, evaluate, format_table
from .experiment import ModelInputError, RunConfig, check_model, data_spec, load_splits, method_config, prepare_run, \
    run_experiment, train_config
from .resume import check_eval_split
from .methods import METHODS, build_method
from .methods.base import method_params
from .models import MODELS
from .presets import PRESETS, get_preset
from .train import RunExistsError, model_from_checkpoint, train
from .verdict import verdict

COMMAND = "classify"  # its row in nnunet_ima.ui.VOCABULARY's old spellings
QUICK = {"limit_train": 2000, "limit_test": 500, "max_epochs": 10}


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and run")
    g.add_argument("--dataset", default="moons", choices=sorted(PRESETS))
    g.add_argument("--data-root", default=None, help="folder with the dataset's files (default per dataset); "
                   "imagefolder: DIR/<class>/*.png or DIR/train/<class> + DIR/test/<class>")
    g.add_argument("--image-size", type=int, help="imagefolder/covid: resize every image to N x N pixels on load")
    g.add_argument("--test-split", type=float, help="imagefolder DIR/<class> layout: fraction held out for testing "
                   "(default 0.2)")
    g.add_argument("--val-split", type=float, help="imagefolder DIR/<class> layout: fraction for validation "
                   "(default 0.1; used by --eval-split val)")
    add_option(g, COMMAND, "output", default=None, help="output folder (default runs/classify/<dataset>-<time>)")
    add_option(g, COMMAND, "seed", default=None, help="seed of the data split and training (0)")
    add_option(g, COMMAND, "device", default=None, help=f"{DEVICES} (default: cuda if available, else cpu)")
    g.add_argument("--quick", action="store_true", help="small and fast: 2000/500 samples, <= 10 epochs")
    g.add_argument("--limit-train", type=int, default=None)
    g.add_argument("--limit-test", type=int, default=None)
    add_option(g, COMMAND, "quiet", help="no progress bars")


def _train_args(p: argparse.ArgumentParser) -> None:
    h = p.add_argument_group("training (defaults: the dataset's preset from the papers)")
    h.add_argument("--model", choices=sorted(MODELS), help="network (default: the preset's; imagefolder: from the "
                   "image size: resnet18_in from 33 px, fashion_cnn/svhn_cnn at 25-32 px, digits_mlp below)")
    h.add_argument("--epochs", type=int)
    add_option(h, COMMAND, "batch_size")
    h.add_argument("--lr", type=float)
    h.add_argument("--optimizer", choices=("adam", "adamw", "sgd"))
    add_option(h, COMMAND, "norm", help="norm of the training perturbations and of the attacks")
    add_option(h, COMMAND, "eps_max", help="training bound (IMA eps_max, SAT/TRADES/FAT/rand eps, MMA d_max)")
    add_option(h, COMMAND, "delta", help="IMA margin expansion step")
    h.add_argument("--std-warmup-epochs", type=int, help="clean epochs before the method starts")
    h.add_argument("--resume", action="store_true", help="continue the run in --output (from its checkpoint.pt)")
    add_option(h, COMMAND, "overwrite", help="start again in an --output that holds an old run")
    h.add_argument("--init-from", default=None, help="start from these weights (a checkpoint.pt, e.g. of STD); in "
                   "'run', 'std' means this run's STD model")
    m = p.add_argument_group("method options")
    add_option(m, COMMAND, "k", help="K, PGD steps of the training attacks (20)")
    add_option(m, COMMAND, "n", help="N, binary-search steps (10)")
    for name, param in method_params().items():  # each method's own hyperparameters, declared with the field
        m.add_argument("--" + name.replace("_", "-"), type=param.type, choices=param.choices, help=param.help)


def _eval_args(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group("evaluation")
    add_option(e, COMMAND, "eps", help="noise levels, space-separated; 0 = clean (default: the papers')")
    add_option(e, COMMAND, "attacks", help=f"a subset of {' '.join(ATTACKS)}, space-separated (default: the "
               "preset's; AutoAttack 'aa' is slow and announced with its cost)")
    add_option(e, COMMAND, "pgd_steps", help="PGD iterations of the evaluation (100)")
    add_option(e, COMMAND, "ifgsm_steps", help="IFGSM iterations of the evaluation (10)")
    e.add_argument("--aa-queries", type=int, help="Square queries for the 2-class AutoAttack (5000)")
    e.add_argument("--eval-split", choices=("test", "val"), default="test")


def _common(p: argparse.ArgumentParser) -> None:
    _data_args(p)
    _train_args(p)
    _eval_args(p)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="train several methods, evaluate them, print the comparison table")
    _common(r)
    add_option(r, COMMAND, "methods", default=["std", "sat", "ima"],
               help=f"space-separated, from {' '.join(sorted(METHODS))}; 'sat:0.1' sets that method's eps")
    t = sub.add_parser("train", help="train one method")
    _common(t)
    t.add_argument("--method", default="ima", help=f"one of {sorted(METHODS)} (optionally name:eps)")
    t.add_argument("--stop-after-epoch", type=int, default=None, help="stop after this epoch (resume later)")
    v = sub.add_parser("eval", help="evaluate checkpoints")
    _common(v)
    v.add_argument("checkpoints", nargs="+", help="checkpoint.pt files written by train/run")
    return p


def quick_delta(delta: float, ima_epochs: int, target_eps: float, eps_max: float) -> tuple[float, str]:
    """--quick keeps IMA's Delta unless margins, growing by at most Delta per epoch, could not reach
    ``target_eps`` (the middle noise level evaluated) in the shortened schedule: then IMA could not be
    judged where the table judges it, and Delta becomes target_eps / epochs."""
    reach = ima_epochs * delta
    if reach >= target_eps - 1e-12 or ima_epochs < 1:
        return delta, f"IMA's Delta {delta:g} kept (margins can grow to {reach:g} in {ima_epochs} epochs)"
    new = min(target_eps / ima_epochs, eps_max)
    return new, (f"IMA's Delta raised from {delta:g} to {new:g} so that margins can reach the middle noise level "
                 f"evaluated ({target_eps:g}) in {ima_epochs} epochs")


def apply_quick(p, a, specs: tuple) -> tuple:
    """(preset, limit_train, limit_test, message) for --quick; the message lists every change."""
    lt, le = a.limit_train or QUICK["limit_train"], a.limit_test or QUICK["limit_test"]
    epochs = min(p.epochs, QUICK["max_epochs"]) if a.epochs is None else p.epochs
    warm = min(p.std_warmup_epochs, epochs // 2) if a.std_warmup_epochs is None else p.std_warmup_epochs
    said = [f"at most {lt} training / {le} test samples"]
    if epochs != p.epochs:
        said.append(f"{epochs} epochs instead of {p.epochs}")
    if warm != p.std_warmup_epochs:
        said.append(f"{warm} clean warm-up epochs instead of {p.std_warmup_epochs}")
    delta = p.delta
    if any(s.partition(":")[0] == "ima" for s in specs) and a.delta is None:
        levels = sorted(e for e in p.eval_eps if e > 0)  # eps 0 is the clean row
        if levels:
            delta, text = quick_delta(p.delta, epochs - warm, levels[len(levels) // 2], p.eps_train)
            said.append(text)
    return p.with_(epochs=epochs, std_warmup_epochs=warm, delta=delta), lt, le, "quick: " + "; ".join(said)


def _method_overrides(a) -> dict:
    """MethodConfig fields given on the command line (eps, delta and norm go through the preset)."""
    return {f: getattr(a, d) for f, d in FIELD_DESTS.items()
            if f not in ("eps", "delta", "norm") and getattr(a, d, None) is not None}


def _eval_overrides(a) -> dict:
    eo = {"attacks": tuple(a.attacks)} if a.attacks is not None else {}
    eo.update({k: getattr(a, k) for k in ("pgd_steps", "ifgsm_steps", "aa_queries") if getattr(a, k)})
    return eo


def check_args(a) -> None:
    """Everything about the command line that can be checked without data (see :mod:`.checks`);
    settles ``a.device`` (the one default rule: cuda if available, else cpu)."""
    check_numbers(a)
    check_eval_options(a)
    a.device = resolve_device(a.device)
    check_paths(a, a.command)
    check_data_options(a)


def run_config(a, specs: tuple = ()) -> RunConfig:
    """RunConfig from the parsed arguments, after :func:`check_args` and the preset-level checks."""
    check_args(a)
    p = get_preset(a.dataset).with_(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, optimizer=a.optimizer,
                                    norm=a.norm, eps_train=a.eps_max, delta=a.delta,
                                    eval_eps=tuple(a.eps) if a.eps else None,
                                    std_warmup_epochs=a.std_warmup_epochs)
    limit_train, limit_test = a.limit_train, a.limit_test
    message = None
    if a.quick:
        p, limit_train, limit_test, message = apply_quick(p, a, specs)
    mo = _method_overrides(a)
    makers = [lambda s=s: build_method(s.partition(":")[0], method_config(
        p, None, **dict(mo, **({"eps": float(s.partition(":")[2])} if ":" in s else {})))) for s in specs]
    check_schedule(p, specs, a.init_from, makers)
    if message and a.command != "eval":
        print(message, flush=True)
    return RunConfig(dataset=a.dataset, data_root=a.data_root, out=a.output, seed=a.seed or 0, device=a.device,
                     preset=p, model=a.model, image_size=a.image_size, test_split=a.test_split,
                     val_split=a.val_split, limit_train=limit_train, limit_test=limit_test, eval_split=a.eval_split,
                     resume=a.resume, overwrite=a.overwrite, init_from=a.init_from, progress=not a.quiet,
                     method_overrides=mo, eval_overrides=_eval_overrides(a))


def cmd_run(a) -> int:
    specs = parse_methods(a.methods)
    cfg = run_config(a, specs)
    cfg.methods = specs
    t0 = time.perf_counter()
    results = run_experiment(cfg)
    if results:
        extra = json.loads(Path(cfg.out, "run.json").read_text())
        print(Path(cfg.out, "table.txt").read_text(), end="")
        for k, v in extra.items():
            if k.startswith("suggested_sat_eps_"):
                m = k.removeprefix("suggested_sat_eps_")
                print(f"{m.upper()} margins: median {v:.4g} (suggested SAT eps, see margins_{m}.png), "
                      f"mean {extra['margins_' + m]['mean']:.4g}")
        for sentence in extra["verdict"]:
            print(sentence)
        print(f"outputs in {Path(cfg.out).resolve()} ({time.perf_counter() - t0:.0f}s): "
              + ", ".join(extra["files"]) + ", one folder per method (checkpoint.pt, train_log.jsonl)")
    return 0


def cmd_train(a) -> int:
    spec = parse_methods([a.method], "--method")
    cfg = run_config(a, spec)
    cfg.methods = spec
    splits = prepare_run(cfg, single=True)
    if cfg.preset.threads and not str(cfg.device).startswith("cuda"):
        torch.set_num_threads(cfg.preset.threads)
    tc = train_config(cfg, spec[0], Path(cfg.out), splits.clip)
    res = train(replace(tc, stop_after_epoch=a.stop_after_epoch), splits)
    print(f"checkpoint: {res.checkpoint.resolve()}")
    if getattr(res.method, "uses_margins", False):
        print(f"{res.method.summary()}; suggested SAT eps (median margin): {res.method.store.suggest_sat_eps():.4g}")
    return 0


def _eval_data(a, cfg: RunConfig, meta: dict):
    """The data a checkpoint was trained on (its saved split settings, unless given here), checked
    against the model's input shape."""
    data = meta.get("data") or {}
    cfg.dataset = meta["dataset"]
    cfg.data_root = a.data_root or data.get("root")
    cfg.seed = a.seed if a.seed is not None else data.get("seed", 0)
    cfg.image_size = a.image_size or data.get("image_size")
    cfg.test_split = a.test_split if a.test_split is not None else data.get("test_split")
    cfg.val_split = a.val_split if a.val_split is not None else data.get("val_split")
    norm = a.norm or meta["config"]["method_cfg"]["norm"]
    cfg.preset = get_preset(cfg.dataset).with_(eval_eps=a.eps, norm=norm)
    splits = load_splits(cfg)
    check_eps_scale(cfg.preset, splits)
    if tuple(splits.in_shape) != tuple(meta["in_shape"]):
        raise ModelInputError(f"the checkpoint's model takes inputs of shape {tuple(meta['in_shape'])}, this data "
                              f"gives {tuple(splits.in_shape)}: pass --image-size {meta['in_shape'][-1]}")
    return splits


def _row_name(meta: dict, path: str, taken) -> str:
    name = meta["config"]["method"]
    if name in ("sat", "rand"):  # fixed-eps methods carry their eps in the name, as in the papers
        name += f"{meta['config']['method_cfg']['eps']:g}"
    return name if name not in taken else f"{name}({path})"


def cmd_eval(a) -> int:
    if a.model:
        raise ArgError(f"--model {a.model}: eval rebuilds each model from its checkpoint; leave --model out")
    cfg = run_config(a)
    if a.output:
        check_writable(a.output, spelling("output"))
    metas = [check_checkpoint("checkpoint", path)["meta"] for path in a.checkpoints]
    results, splits = {}, None
    for path, meta in zip(a.checkpoints, metas):
        if splits is None:  # dataset, split and norm of the (first) checkpoint unless given
            splits = _eval_data(a, cfg, meta)
            check_model(meta["model"], splits.num_classes, splits.in_shape)
        check_eval_split(path, meta, data_spec(cfg), splits.split_digest)  # every checkpoint: no test image trained on
        model, _ = model_from_checkpoint(path, a.device)
        ecfg = replace(EvalConfig(eps=cfg.preset.eval_eps, norm=cfg.preset.norm, attacks=cfg.preset.eval_attacks,
                                  clip=splits.clip, seed=cfg.seed, device=a.device, progress=not a.quiet),
                       **cfg.eval_overrides)
        if not results and (note := aa_announcement(ecfg, splits.num_classes)) and not a.quiet:
            print(note, flush=True)
        data = splits.val if a.eval_split == "val" else splits.test
        name = _row_name(meta, path, results)
        results[name] = evaluate(model, data, splits.num_classes, ecfg, desc=f"eval {name}")
    print(format_table(results, title=f"{cfg.dataset}, {cfg.preset.norm.upper()} norm"))
    for sentence in verdict(results):
        print(sentence)
    if a.output:
        Path(a.output).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(a.output, "table.txt"), format_table(results) + "\n")
        atomic_write_text(Path(a.output, "results.json"), json.dumps(to_plain(results, for_json=True), indent=1))
    return 0


COMMANDS = {"run": cmd_run, "train": cmd_train, "eval": cmd_eval}
USER_ERRORS = (UsageError, DatasetError, ModelInputError, RunExistsError)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["run"] + argv
    a = build_parser().parse_args(argv)
    try:
        return COMMANDS[a.command](a)
    except USER_ERRORS as err:
        return report_error(f"{PROG} {a.command}", err)
