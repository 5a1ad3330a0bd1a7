"""Per-sample margin bookkeeping of IMA: the array E(i) of estimated sample margins.

Rules (later paper, Algorithm 1, the default):
  * clean and noisy sample both correct  -> E(i) <- E(i) + delta                 (expand)
  * otherwise                            -> E(i) <- (||x - x~|| + E(i)) / 2      (shrink)
  * clip every E(i) into [0, eps_max]
Options for the earlier paper's Algorithm 2: ``on_clean_wrong="reinit"`` (E(i) <- delta when the
clean sample is wrong) and ``shrink="replace"`` (E(i) <- ||x - x~||), with ``clip_min="delta"``.
The segmentation rule of the papers ("re-initialise" replaced by "shrink") is the default.

Keys are integers or strings (e.g. "case_017/slice_42"); unseen keys start at delta. Updates are
batched; when one key occurs several times in a batch, its last occurrence wins.

This module holds the storage and the rules; the summary and histogram are in
:mod:`nnunet_ima.margin_report`, the merge across torch.distributed ranks in
:mod:`nnunet_ima.margin_merge` (``MarginStore`` keeps one-line methods for both), and the PNG in
:func:`nnunet_ima.ui.plot_margin_histogram`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from . import margin_merge, margin_report

ON_CLEAN_WRONG = ("shrink", "reinit")
SHRINK = ("average", "replace")
CLIP_MIN = ("zero", "delta")
RULES = {"on_clean_wrong": ON_CLEAN_WRONG, "shrink": SHRINK, "clip_min": CLIP_MIN}


class MarginTable:
    """The storage of :class:`MarginStore`: one float64 margin per sample id (int or str), in the
    order the ids were first seen; new ids start at ``delta``. Tracks which entries were updated
    since the last merge across ranks (:mod:`nnunet_ima.margin_merge`)."""

    def __init__(self, delta: float):
        self.delta = float(delta)
        self._set_table([], torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.bool))

    def _set_table(self, keys: list, margins: torch.Tensor, dirty: torch.Tensor) -> None:
        """Replace every entry: ``keys`` in order, their float64 margins, and which were updated since
        the last merge."""
        self._keys = list(keys)
        self._index = {k: i for i, k in enumerate(self._keys)}
        self._margins, self._dirty = margins, dirty

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return _norm_key(key) in self._index

    def keys(self) -> list:
        return list(self._keys)

    @property
    def margins(self) -> torch.Tensor:
        """All stored margins, in the order of :meth:`keys` (a copy)."""
        return self._margins.clone()

    def _rows(self, ids: Sequence) -> torch.Tensor:
        keys = [_norm_key(k) for k in _as_list(ids)]
        new = [k for k in dict.fromkeys(keys) if k not in self._index]
        if new:
            start = len(self._keys)
            for j, k in enumerate(new):
                self._index[k] = start + j
            self._keys.extend(new)
            self._margins = torch.cat([self._margins, torch.full((len(new),), self.delta, dtype=torch.float64)])
            self._dirty = torch.cat([self._dirty, torch.zeros(len(new), dtype=torch.bool)])
        return torch.tensor([self._index[k] for k in keys], dtype=torch.long)

    def get(self, ids: Sequence, device=None) -> torch.Tensor:
        """Margins of ``ids`` as a (B,) float32 tensor (unseen ids are registered at delta)."""
        rows = self._rows(ids)  # first: registering new ids replaces self._margins
        return self._margins[rows].to(device=device, dtype=torch.float32)

    def updated_entries(self) -> tuple[list, list]:
        """(keys, margins) of the entries updated since the last merge."""
        mine = torch.nonzero(self._dirty).flatten()
        return [self._keys[i] for i in mine.tolist()], self._margins[mine].tolist()

    def adopt(self, order: list, values: dict) -> None:
        """Set ``values`` ({key: margin}), register the keys of ``order`` not seen yet (at delta) and
        put every entry in the order of ``order`` (all keys of this store and the new ones); nothing
        counts as updated afterwards. The last step of a merge."""
        self._rows(order)
        if values:
            rows = torch.tensor([self._index[k] for k in values], dtype=torch.long)
            self._margins[rows] = torch.tensor(list(values.values()), dtype=torch.float64)
        perm = torch.tensor([self._index[k] for k in order], dtype=torch.long)
        self._set_table(order, self._margins[perm], torch.zeros(len(order), dtype=torch.bool))


class MarginStore(MarginTable):
    """Estimated margins E(i) keyed by sample id, with Algorithm 1's update rules.

    >>> store = MarginStore(delta=2.0, eps_max=15.0)
    >>> eps = store.get(ids)                                  # (B,) float32, new ids -> delta
    >>> store.update(ids, clean_correct, noisy_correct, distance)
    >>> torch.save(store.state_dict(), path)                  # plain tensors/lists/strings
    """

    def __init__(self, delta: float, eps_max: float, *, on_clean_wrong: str = "shrink", shrink: str = "average",
                 clip_min: str = "zero"):
        check_rules(delta, eps_max, on_clean_wrong=on_clean_wrong, shrink=shrink, clip_min=clip_min)
        super().__init__(delta)
        self.eps_max = float(eps_max)
        self.on_clean_wrong, self.shrink, self.clip_min = on_clean_wrong, shrink, clip_min
        self.reset_counters()

    # ------------------------------------------------------------------ update
    def update(self, ids: Sequence, clean_correct, noisy_correct, distance, valid=None) -> torch.Tensor:
        """Apply one batch of margin updates; returns the new margins of ``ids`` (B,).

        ``clean_correct``/``noisy_correct``: bool (B,) (g(z) = y and g(z~) = y of Algorithm 1);
        ``distance``: (B,) ||x - x~|| (treated as 0 where the clean sample is wrong, since no noisy
        sample was made); ``valid``: samples marked False (e.g. NaN/Inf input) are left untouched.
        """
        rows = self._rows(ids)
        b = rows.numel()
        cc = _bool(clean_correct, b, "clean_correct")
        nc = _bool(noisy_correct, b, "noisy_correct")
        d = torch.as_tensor(distance).detach().to("cpu", torch.float64).reshape(-1)
        if d.numel() != b:
            raise ValueError(f"distance: expected {b} values, got {d.numel()}")
        ok = torch.isfinite(d) if valid is None else _bool(valid, b, "valid") & torch.isfinite(d)
        new, expand = self._next(self._margins[rows], cc, nc, torch.where(cc & ok, d, torch.zeros_like(d)))
        keep = _last_occurrence(rows) & ok  # last occurrence of a duplicated id wins (deterministic)
        self._margins[rows[keep]] = new[keep]
        self._dirty[rows[keep]] = True
        for name, hit in (("updates", keep), ("expanded", expand & keep), ("shrunk", ~expand & keep),
                          ("clean_wrong", ~cc & keep), ("invalid", ~ok)):
            self.counters[name] += int(hit.sum())
        return self._margins[rows].float()

    def _next(self, old, clean_correct, noisy_correct, distance) -> tuple[torch.Tensor, torch.Tensor]:
        """(new margins, which expanded): the rules of the module docstring, before the last-wins step."""
        expand = clean_correct & noisy_correct
        shrunk = (distance + old) / 2 if self.shrink == "average" else distance
        new = torch.where(expand, old + self.delta, shrunk)
        if self.on_clean_wrong == "reinit":
            new = torch.where(clean_correct, new, torch.full_like(new, self.delta))
        lo = 0.0 if self.clip_min == "zero" else self.delta
        return new.clamp(lo, self.eps_max), expand

    def reset_counters(self) -> None:
        """Zero the update counters (e.g. at the start of an epoch)."""
        self.counters = {"updates": 0, "expanded": 0, "shrunk": 0, "clean_wrong": 0, "invalid": 0}

    # ------------------------------------------------------------------ reporting (margin_report)
    def summary(self) -> dict:
        """:func:`nnunet_ima.margin_report.summarize` of this store and its counters."""
        return margin_report.summarize(self._margins, self.eps_max, self.counters)

    def format_summary(self) -> str:
        return margin_report.format_summary(self.summary())

    def histogram(self, bins: int = 20) -> tuple[np.ndarray, np.ndarray]:
        """(counts, edges) of the margins over [0, eps_max]."""
        return margin_report.histogram(self._margins, self.eps_max, bins)

    def suggest_sat_eps(self, quantile: float = 0.5) -> float:
        """The median margin by default (:func:`nnunet_ima.margin_report.suggest_sat_eps`)."""
        return margin_report.suggest_sat_eps(self._margins, quantile)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain types only (loads with ``torch.load(..., weights_only=True)``)."""
        return {"keys": [str(k) for k in self._keys],
                "key_is_int": torch.tensor([isinstance(k, int) for k in self._keys], dtype=torch.bool),
                "margins": self._margins.clone(), "dirty": self._dirty.clone(), "delta": self.delta,
                "eps_max": self.eps_max, "on_clean_wrong": self.on_clean_wrong, "shrink": self.shrink,
                "clip_min": self.clip_min}

    def load_state_dict(self, state: dict) -> None:
        keys = [int(k) if i else k for k, i in zip(state["keys"], state["key_is_int"].tolist())]
        if len(keys) != state["margins"].numel():
            raise ValueError("margin state: number of keys and margins differ")
        self.delta, self.eps_max = float(state["delta"]), float(state["eps_max"])
        self.on_clean_wrong, self.shrink, self.clip_min = state["on_clean_wrong"], state["shrink"], state["clip_min"]
        self._set_table(keys, state["margins"].to(torch.float64).clone(),
                        state.get("dirty", torch.zeros(len(keys), dtype=torch.bool)).clone())

    @classmethod
    def from_state_dict(cls, state: dict) -> "MarginStore":
        store = cls(delta=state["delta"], eps_max=state["eps_max"])
        store.load_state_dict(state)
        return store

    # ------------------------------------------------------------------ distributed (margin_merge)
    def merge(self, group=None) -> None:
        """Make the margins identical on every torch.distributed rank (:func:`nnunet_ima.margin_merge.merge`:
        an id updated on several ranks gets their mean); a no-op when torch.distributed is not initialised."""
        margin_merge.merge(self, group)


def check_rules(delta: float, eps_max: float, **rules: str) -> None:
    """ValueError naming the setting unless eps_max > 0, 0 < delta <= eps_max and every rule is known."""
    if not (math.isfinite(eps_max) and eps_max > 0):
        raise ValueError(f"eps_max must be > 0, got {eps_max}")
    if not (math.isfinite(delta) and 0 < delta <= eps_max):
        raise ValueError(f"delta must be in (0, eps_max={eps_max}], got {delta}")
    for name, value in rules.items():
        if value not in RULES[name]:
            raise ValueError(f"{name} must be one of {RULES[name]}, got {value!r}")


def _norm_key(key):
    if isinstance(key, torch.Tensor):
        key = key.item()
    if isinstance(key, (np.integer,)):
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"ids: sample ids must be int or str, got {type(key).__name__}")
    return key


def _as_list(ids) -> list:
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).tolist()
    if isinstance(ids, np.ndarray):
        return ids.reshape(-1).tolist()
    if isinstance(ids, (str, int)):
        raise TypeError("ids: expected a sequence of sample ids, got a single id")
    return list(ids)


def _bool(v, b: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(v).detach().to("cpu").reshape(-1)
    if t.numel() != b:
        raise ValueError(f"{name}: expected {b} values, got {t.numel()}")
    return t.bool()


def _last_occurrence(rows: torch.Tensor) -> torch.Tensor:
    r = rows.numpy()
    _, first_in_reversed = np.unique(r[::-1], return_index=True)
    keep = np.zeros(len(r), dtype=bool)
    keep[len(r) - 1 - first_in_reversed] = True
    return torch.from_numpy(keep)
