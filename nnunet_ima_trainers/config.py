"""Settings of the IMA / SAT / STD trainers, read without code: environment variables or a JSON file.

``nnUNetv2_train`` passes no arguments to a trainer, so every setting comes from

1. an environment variable ``NNUNET_IMA_<KEY>`` (wins), else
2. the JSON file named by ``NNUNET_IMA_CONFIG`` with the same keys in lower case, else
3. the trainer class (length variants such as ``nnUNetTrainerIMA_50epochs_50iters``), else
4. the defaults below: the paper's (section 3.5) for Heart / Hippocampus / Prostate 2d, otherwise
   the generic rule of :func:`generic_eps_max`.

Keys: eps_max, delta, k, n, dice_threshold, norm, expand_rule, sat_eps, epochs, iters, val_iters, init_weights.

>>> cfg = load_config("Dataset004_Hippocampus", patch_elements=56 * 40, is_2d=True, environ={})
>>> cfg.delta, cfg.eps_max, cfg.k, cfg.n
(2.0, 15.0, 20, 10)

Everything is checked once, at start-up, and every problem is reported in one :class:`ConfigError`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields

from nnunet_ima.norms import NORMS

ENV_PREFIX = "NNUNET_IMA_"
CONFIG_FILE_VAR = "NNUNET_IMA_CONFIG"

# (delta, eps_max) of the paper's nnU-Net experiments (section 3.5, 2d, L2 over the whole slice)
PAPER_TASKS: dict[str, tuple[float, float]] = {
    "heart": (5.0, 20.0),
    "hippocampus": (2.0, 15.0),
    "prostate": (10.0, 40.0),
}


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
    norm: str = "l2"               # attack norm over the whole input patch: "l2" (paper) or "linf"
    expand_rule: str = "prediction"  # when a margin grows: "prediction" (Algorithm 1 line 13) or "no_crossing"
    sat_eps: float = 0.0           # nnUNetTrainerSAT's fixed eps; default eps_max (the shared upper bound, 3.1)
    epochs: int | None = None      # None: the trainer class / nnU-Net default
    iters: int | None = None       # training iterations per epoch
    val_iters: int | None = None   # validation iterations per epoch
    init_weights: str | None = None  # nnU-Net checkpoint to start from, every weight (segmentation heads too)
    sources: dict = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        lines = ["nnunet-ima trainer settings (env NNUNET_IMA_<KEY> > NNUNET_IMA_CONFIG file > trainer > default):"]
        for f in fields(self):
            if f.name != "sources":
                lines.append(f"  {f.name:<15} = {getattr(self, f.name)!s:<10} ({self.sources.get(f.name, 'default')})")
        return "\n".join(lines)


KEYS = tuple(f.name for f in fields(IMAConfig) if f.name != "sources")
_INT_KEYS = {"k", "n", "epochs", "iters", "val_iters"}
_STR_KEYS = {"norm", "expand_rule"}
_PATH_KEYS = {"init_weights"}
EXPAND_RULES = ("prediction", "no_crossing")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


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
    """Read, complete and validate the settings. Raises :class:`ConfigError` listing every problem."""
    environ = os.environ if environ is None else environ
    errors: list[str] = []
    values: dict = {}
    sources: dict = {}

    path = environ.get(CONFIG_FILE_VAR)
    if path:
        try:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
        except (OSError, ValueError) as e:
            raise ConfigError(f"{CONFIG_FILE_VAR}={path}: cannot read the config file ({e})") from None
        unknown = sorted(set(data) - set(KEYS))
        if unknown:
            errors.append(f"{CONFIG_FILE_VAR}={path}: unknown keys {unknown} (known: {list(KEYS)})")
        for key in KEYS:
            if key in data and data[key] is not None:
                values[key], sources[key] = _parse(key, data[key], f"{path}:{key}", errors), f"file {path}"
    for key in KEYS:
        raw = environ.get(env_name(key))
        if raw is not None and raw.strip() != "":
            values[key], sources[key] = _parse(key, raw, env_name(key), errors), "env " + env_name(key)
    for key, value in (trainer_defaults or {}).items():
        if key not in values and value is not None:
            values[key], sources[key] = value, "trainer class"
    if errors:
        raise ConfigError(_message(errors))

    task = paper_task(dataset_name) if is_2d else None
    if "eps_max" not in values:
        if task:
            values["eps_max"], sources["eps_max"] = PAPER_TASKS[task][1], f"paper default for {task} (2d)"
        else:
            values["eps_max"] = generic_eps_max(patch_elements)
            sources["eps_max"] = f"generic default 3*sqrt({patch_elements}/3072)"
    if "delta" not in values:
        if task and sources["eps_max"].startswith("paper"):
            values["delta"], sources["delta"] = PAPER_TASKS[task][0], f"paper default for {task} (2d)"
        else:
            values["delta"], sources["delta"] = float(f"{values['eps_max'] / 4:.3g}"), "default eps_max / 4"
    if "sat_eps" not in values:
        values["sat_eps"], sources["sat_eps"] = values["eps_max"], "default eps_max"
    cfg = IMAConfig(**values, sources=sources)
    _validate(cfg, errors)
    if errors:
        raise ConfigError(_message(errors))
    return cfg


def _message(errors: list[str]) -> str:
    return "invalid nnunet-ima trainer settings: " + "; ".join(errors)


def _parse(key: str, raw, where: str, errors: list[str]):
    try:
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
        if isinstance(raw, bool):
            raise ValueError
        return float(raw)
    except (TypeError, ValueError):
        kind = "a string" if key in _STR_KEYS | _PATH_KEYS else "an integer" if key in _INT_KEYS else "a number"
        errors.append(f"{where}={raw!r} is not {kind}")
        return None


def _validate(cfg: IMAConfig, errors: list[str]) -> None:
    def src(key):
        return f"(from {cfg.sources.get(key, 'default')})"

    eps_ok = math.isfinite(cfg.eps_max) and cfg.eps_max > 0
    if not eps_ok:
        errors.append(f"eps_max must be > 0, got {cfg.eps_max} {src('eps_max')}")

    def derived(key):  # a default computed from a bad eps_max: its error would only repeat that one
        return not eps_ok and cfg.sources.get(key, "").startswith("default eps_max")

    if derived("delta"):
        pass
    elif not (math.isfinite(cfg.delta) and cfg.delta > 0):
        errors.append(f"delta must be > 0, got {cfg.delta} {src('delta')}")
    elif math.isfinite(cfg.eps_max) and cfg.delta > cfg.eps_max:
        errors.append(f"delta must be <= eps_max, got delta={cfg.delta} {src('delta')} > eps_max={cfg.eps_max} "
                      f"{src('eps_max')}")
    if not 0.0 < cfg.dice_threshold < 1.0:
        errors.append(f"dice_threshold must be in (0, 1), got {cfg.dice_threshold} {src('dice_threshold')}")
    if cfg.norm not in NORMS:
        errors.append(f"unknown norm {cfg.norm!r} {src('norm')}, known norms: {sorted(NORMS)}")
    if cfg.expand_rule not in EXPAND_RULES:
        errors.append(f"unknown expand_rule {cfg.expand_rule!r} {src('expand_rule')}, known: {list(EXPAND_RULES)}")
    if not derived("sat_eps") and not (math.isfinite(cfg.sat_eps) and cfg.sat_eps > 0):
        errors.append(f"sat_eps must be > 0, got {cfg.sat_eps} {src('sat_eps')}")
    if cfg.init_weights is not None and not os.path.isfile(cfg.init_weights):
        errors.append(f"init_weights: no such file {cfg.init_weights} {src('init_weights')}")
    for key in ("k", "n", "epochs", "iters", "val_iters"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            errors.append(f"{key} must be >= 1, got {value} {src(key)}")
