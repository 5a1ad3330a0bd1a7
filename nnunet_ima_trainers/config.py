"""Settings of the IMA / SAT / STD trainers, read without code: environment variables or a JSON file.

``nnUNetv2_train`` passes no arguments to a trainer, so every setting comes from

1. an environment variable ``NNUNET_IMA_<KEY>`` (wins), else
2. the JSON file named by ``NNUNET_IMA_CONFIG`` with the same keys in lower case, else
3. the trainer class (length variants such as ``nnUNetTrainerIMA_50epochs_50iters``), else
4. the defaults below: the paper's (section 3.5) for Heart / Hippocampus / Prostate 2d, otherwise
   the generic rule of :func:`generic_eps_max`.

Keys: eps_max, delta, k, n, dice_threshold, dice_reduction, attack_samples, norm, expand_rule,
sat_eps, epochs, iters, val_iters, init_weights, initial_lr, seed.

* ``dice_reduction``: how the "is this segmentation correct" predicate reduces the per-class Dice
  over the foreground classes before comparing it with ``dice_threshold``: ``mean`` (default) or
  ``max`` (the authors' nnU-Net code, ``getOnlineDiceMax``). The paper does not say.
* ``attack_samples``: which samples of a batch are attacked: ``correct`` (default; Algorithm 1
  attacks only the samples the clean forward segments correctly) or ``all`` (the authors' code,
  whose clean check is ``Dice >= 0``; the margin then moves by the noisy sample's correctness).
* ``expand_rule``: when a margin grows: ``prediction`` (default, Algorithm 1 line 13) or
  ``no_crossing``.
* ``initial_lr``: the start of nnU-Net's poly learning-rate schedule (default: the trainer's, nnU-Net's
  0.01). nnU-Net restarts the schedule at 0.01 for a model started from ``init_weights`` too.
* ``seed``: makes a run reproducible on one machine and library version (torch, numpy and Python RNGs,
  the data loader and augmentation on a stream of their own, deterministic algorithms where torch has
  them; see :mod:`nnunet_ima_trainers.seeding`). Unset (default): nnU-Net's unseeded behaviour.

Any other ``NNUNET_IMA_*`` variable (a misspelt key) is an error naming the closest known one,
as an unknown key in the JSON file is.

>>> cfg = load_config("Dataset004_Hippocampus", patch_elements=56 * 40, is_2d=True, environ={})
>>> cfg.delta, cfg.eps_max, cfg.k, cfg.n, cfg.dice_reduction, cfg.attack_samples
(2.0, 15.0, 20, 10, 'mean', 'correct')

Everything is checked once, at start-up, and every problem is reported in one :class:`ConfigError`
(one line; an uncaught one prints without a traceback, see :mod:`nnunet_ima_trainers`).
"""
from __future__ import annotations

import difflib
import json
import math
import os
import zipfile
from dataclasses import dataclass, field, fields

from nnunet_ima.ima_step import ATTACK_SAMPLES, EXPAND_RULES
from nnunet_ima.norms import NORMS
from nnunet_ima.predicates import REDUCTIONS

ENV_PREFIX = "NNUNET_IMA_"
CONFIG_FILE_VAR = "NNUNET_IMA_CONFIG"

# (delta, eps_max) of the paper's nnU-Net experiments (section 3.5, 2d, L2 over the whole slice)
PAPER_TASKS: dict[str, tuple[float, float]] = {
    "heart": (5.0, 20.0),
    "hippocampus": (2.0, 15.0),
    "prostate": (10.0, 40.0),
}
DICE_REDUCTIONS = tuple(REDUCTIONS)   # ("mean", "max"): nnunet_ima.predicates.reduce_classes
# EXPAND_RULES ("prediction", "no_crossing") and ATTACK_SAMPLES ("correct", "all"): the kernel's IMA step


class ConfigError(ValueError):
    """Invalid IMA trainer settings (raised at start-up, before any epoch)."""


@dataclass(frozen=True)
class IMAConfig:
    """Validated settings of one training run. ``sources`` says where each value came from."""

    eps_max: float                 # epsilon_train: upper bound of every margin (and of the attack), input units
    delta: float                   # Delta_epsilon: margin expansion step of Algorithm 1
    k: int = 20                    # PGD steps of BPGD (and of SAT's PGD); step size 4 * eps / k
    n: int = 10                    # binary-search steps of BPGD
    dice_threshold: float = 0.6    # a sample is "correct" when its foreground Dice >= this (section 3.5)
    dice_reduction: str = "mean"   # foreground Dice of a sample: "mean" or "max" (authors' code) over classes
    attack_samples: str = "correct"  # attacked: "correct" (clean-correct only, Algorithm 1) or "all" (authors' code)
    norm: str = "l2"               # attack norm over the whole input patch: "l2" (paper) or "linf"
    expand_rule: str = "prediction"  # when a margin grows: "prediction" (Algorithm 1 line 13) or "no_crossing"
    sat_eps: float = 0.0           # nnUNetTrainerSAT's fixed eps; default eps_max (the shared upper bound, 3.1)
    epochs: int | None = None      # None: the trainer class / nnU-Net default
    iters: int | None = None       # training iterations per epoch
    val_iters: int | None = None   # validation iterations per epoch
    init_weights: str | None = None  # nnU-Net checkpoint to start from, every weight (segmentation heads too)
    initial_lr: float | None = None  # start of the poly lr schedule; None: the trainer's (nnU-Net: 0.01)
    seed: int | None = None        # None: unseeded (nnU-Net's behaviour); else a reproducible run
    sources: dict = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        lines = ["nnunet-ima trainer settings (env NNUNET_IMA_<KEY> > NNUNET_IMA_CONFIG file > trainer > default):"]
        for f in fields(self):
            if f.name != "sources":
                lines.append(f"  {f.name:<15} = {getattr(self, f.name)!s:<10} ({self.sources.get(f.name, 'default')})")
        return "\n".join(lines)


KEYS = tuple(f.name for f in fields(IMAConfig) if f.name != "sources")
_COUNT_KEYS = ("k", "n", "epochs", "iters", "val_iters")  # integers >= 1
_INT_KEYS = (*_COUNT_KEYS, "seed")
_PATH_KEYS = {"init_weights"}
CHOICES: dict[str, tuple[str, ...]] = {   # the string settings and their allowed values
    "norm": tuple(sorted(NORMS)),
    "expand_rule": EXPAND_RULES,
    "dice_reduction": DICE_REDUCTIONS,
    "attack_samples": ATTACK_SAMPLES,
}
_STR_KEYS = set(CHOICES)


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


ENV_NAMES = frozenset([CONFIG_FILE_VAR, *(env_name(k) for k in KEYS)])  # every NNUNET_IMA_* variable read


def generic_eps_max(patch_elements: int) -> float:
    """Generic eps_max: the paper's section 3.1 rule, the same average per-element perturbation as
    L2 eps = 3 on a 32x32x3 CIFAR image: 3 * sqrt(d / 3072), d = elements of one input patch
    (all channels). Rounded to 3 significant digits."""
    value = 3.0 * math.sqrt(patch_elements / 3072.0)
    return float(f"{value:.3g}")


def paper_task(dataset_name: str) -> str | None:
    """The paper's task a dataset name refers to ("Dataset002_Heart" -> "heart"), or None."""
    name = dataset_name.split("_", 1)[-1].lower()
    return next((t for t in PAPER_TASKS if t in name), None)


def load_config(dataset_name: str, patch_elements: int, is_2d: bool, *, trainer_defaults: dict | None = None,
                environ=None) -> IMAConfig:
    """Read, complete and validate the settings. Raises :class:`ConfigError` listing every problem.

    ``patch_elements``: elements of one input patch, all channels (for the generic eps_max);
    ``environ``: the variables to read (default ``os.environ``). The steps: refuse unknown
    ``NNUNET_IMA_*`` names; layer trainer class < file < environment; fill the eps defaults;
    validate the whole.
    """
    environ = os.environ if environ is None else environ
    errors = unknown_variables(environ)
    chosen: dict[str, tuple] = {}                       # key -> (value, source)
    chosen.update(_from_trainer(trainer_defaults))
    chosen.update(_from_file(environ.get(CONFIG_FILE_VAR), errors))
    chosen.update(_from_env(environ, errors))
    # a value that did not parse is already an error: the others are still validated, so that one
    # message names every problem (the failed key falls back to its default meanwhile)
    chosen = {k: v for k, v in chosen.items() if v[0] is not None}
    chosen.update(_eps_defaults(dataset_name, patch_elements, is_2d, chosen))
    cfg = IMAConfig(**{k: v for k, (v, _) in chosen.items()}, sources={k: s for k, (_, s) in chosen.items()})
    _validate(cfg, errors)
    if errors:
        raise ConfigError(_message(errors))
    return cfg


def closest(word: str, candidates) -> str | None:
    """The candidate most like ``word`` (difflib ratio >= 0.6; ties go to the longer shared prefix), or None."""
    word = word.lower()
    scored = [(difflib.SequenceMatcher(None, word, c.lower()).ratio(), len(os.path.commonprefix([word, c.lower()])),
               c) for c in candidates]
    score, _, best = max(scored, default=(0.0, 0, None))
    return best if score >= 0.6 else None


def unknown_variables(environ) -> list[str]:
    """One error per ``NNUNET_IMA_*`` variable (any case) that this module does not read, naming the
    closest known variable."""
    errors = []
    suffixes = {name[len(ENV_PREFIX):]: name for name in ENV_NAMES}
    for name in sorted(n for n in environ if n.upper().startswith(ENV_PREFIX) and n not in ENV_NAMES):
        guess = closest(name[len(ENV_PREFIX):], suffixes)
        hint = f"did you mean {suffixes[guess]}?" if guess else f"known: {', '.join(sorted(ENV_NAMES))}"
        errors.append(f"unknown variable {name} ({hint})")
    return errors


def _from_trainer(defaults: dict | None) -> dict:
    return {k: (v, "trainer class") for k, v in (defaults or {}).items() if v is not None}


def _from_file(path: str | None, errors: list[str]) -> dict:
    """The settings of the JSON file ``path`` (none when unset); unknown keys are errors."""
    if not path:
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
    except (OSError, ValueError) as e:
        errors.append(f"{CONFIG_FILE_VAR}={path}: cannot read the config file ({e})")
        return {}
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        guesses = [f"{u} -> {g}" for u in unknown if (g := closest(u, KEYS))]
        hint = f"did you mean {', '.join(guesses)}? " if guesses else ""
        errors.append(f"{CONFIG_FILE_VAR}={path}: unknown keys {unknown} ({hint}known: {list(KEYS)})")
    return {key: (_parse(key, data[key], f"{path}:{key}", errors), f"file {path}")
            for key in KEYS if data.get(key) is not None}


def _from_env(environ, errors: list[str]) -> dict:
    """The settings given as non-empty ``NNUNET_IMA_<KEY>`` variables."""
    out = {}
    for key in KEYS:
        raw = environ.get(env_name(key))
        if raw is not None and raw.strip() != "":
            out[key] = (_parse(key, raw, env_name(key), errors), "env " + env_name(key))
    return out


def _eps_defaults(dataset_name: str, patch_elements: int, is_2d: bool, chosen: dict) -> dict:
    """eps_max, delta and sat_eps where no layer set them: the paper's values for its tasks (2d),
    otherwise eps_max by :func:`generic_eps_max`, delta = eps_max / 4, sat_eps = eps_max."""
    out = {}
    task = paper_task(dataset_name) if is_2d else None
    eps = chosen.get("eps_max")
    if eps is None:
        eps = out["eps_max"] = ((PAPER_TASKS[task][1], f"paper default for {task} (2d)") if task else
                                (generic_eps_max(patch_elements), f"generic default 3*sqrt({patch_elements}/3072)"))
    if "delta" not in chosen:
        out["delta"] = ((PAPER_TASKS[task][0], f"paper default for {task} (2d)") if task and eps[1].startswith("paper")
                        else (float(f"{eps[0] / 4:.3g}"), "default eps_max / 4"))
    if "sat_eps" not in chosen:
        out["sat_eps"] = (eps[0], "default eps_max")
    return out


def _message(errors: list[str]) -> str:
    return "invalid nnunet-ima trainer settings: " + "; ".join(errors)


def _parse(key: str, raw, where: str, errors: list[str]):
    try:
        if isinstance(raw, bool) and key not in _STR_KEYS:  # JSON true/false is no number (int(True) == 1)
            raise ValueError
        if key in _STR_KEYS:
            return str(raw).strip().lower()
        if key in _PATH_KEYS:
            if not isinstance(raw, str):
                raise ValueError
            return os.path.abspath(os.path.expanduser(raw.strip()))
        if key in _INT_KEYS:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(str(raw).strip()) if not isinstance(raw, (int, float)) else int(raw)
        return float(raw)
    except (TypeError, ValueError):
        kind = "a string" if key in _STR_KEYS or key in _PATH_KEYS else "an integer" if key in _INT_KEYS else "a number"
        errors.append(f"{where}={raw!r} is not {kind}")
        return None


def _validate(cfg: IMAConfig, errors: list[str]) -> None:
    """Append one message per invalid value of ``cfg``, each naming where the value came from."""
    def src(key):
        return f"(from {cfg.sources.get(key, 'default')})"

    _check_eps(cfg, src, errors)
    if not 0.0 < cfg.dice_threshold < 1.0:
        errors.append(f"dice_threshold must be in (0, 1), got {cfg.dice_threshold} {src('dice_threshold')}")
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            errors.append(f"unknown {key} {getattr(cfg, key)!r} {src(key)}, known: {list(allowed)}")
    for key in _COUNT_KEYS:
        value = getattr(cfg, key)
        if value is not None and value < 1:
            errors.append(f"{key} must be >= 1, got {value} {src(key)}")
    if cfg.seed is not None and cfg.seed < 0:
        errors.append(f"seed must be an integer >= 0, got {cfg.seed} {src('seed')}")
    if cfg.initial_lr is not None and not (math.isfinite(cfg.initial_lr) and cfg.initial_lr > 0):
        errors.append(f"initial_lr must be > 0, got {cfg.initial_lr} {src('initial_lr')}")
    if cfg.init_weights is not None:
        problem = checkpoint_problem(cfg.init_weights)
        if problem:
            errors.append(f"init_weights: {problem} {src('init_weights')}")


def _check_eps(cfg: IMAConfig, src, errors: list[str]) -> None:
    """eps_max > 0; 0 < delta <= eps_max; sat_eps > 0. A default derived from a bad eps_max is not
    reported again (its error would only repeat eps_max's)."""
    eps_ok = math.isfinite(cfg.eps_max) and cfg.eps_max > 0
    if not eps_ok:
        errors.append(f"eps_max must be > 0, got {cfg.eps_max} {src('eps_max')}")

    def derived(key):
        return not eps_ok and cfg.sources.get(key, "").startswith("default eps_max")

    if derived("delta"):
        pass
    elif not (math.isfinite(cfg.delta) and cfg.delta > 0):
        errors.append(f"delta must be > 0, got {cfg.delta} {src('delta')}")
    elif math.isfinite(cfg.eps_max) and cfg.delta > cfg.eps_max:
        errors.append(f"delta must be <= eps_max, got delta={cfg.delta} {src('delta')} > eps_max={cfg.eps_max} "
                      f"{src('eps_max')}")
    if not derived("sat_eps") and not (math.isfinite(cfg.sat_eps) and cfg.sat_eps > 0):
        errors.append(f"sat_eps must be > 0, got {cfg.sat_eps} {src('sat_eps')}")


# torch.save's legacy (pre-1.6) format starts with this pickled magic number; the current one is a zip
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` cannot be a PyTorch checkpoint (missing, not a file, not written by ``torch.save``),
    or None. Reads only the file's header / zip directory, not the weights."""
    if os.path.isdir(path):
        return f"{path} is a directory, not a checkpoint file"
    if not os.path.isfile(path):
        return f"no such file {path}"
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist()):
                    return None
        else:
            with open(path, "rb") as f:
                if f.read(len(_LEGACY_TORCH_MAGIC)) == _LEGACY_TORCH_MAGIC:
                    return None
    except OSError as e:
        return f"cannot read {path} ({e.strerror or e})"
    return f"{path} is not a PyTorch checkpoint (expected nnU-Net's checkpoint_final.pth or checkpoint_best.pth)"
