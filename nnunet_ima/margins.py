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
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

ON_CLEAN_WRONG = ("shrink", "reinit")
SHRINK = ("average", "replace")
CLIP_MIN = ("zero", "delta")


class MarginStore:
    """Estimated margins E(i) keyed by sample id.

    >>> store = MarginStore(delta=2.0, eps_max=15.0)
    >>> eps = store.get(ids)                                  # (B,) float32, new ids -> delta
    >>> store.update(ids, clean_correct, noisy_correct, distance)
    >>> torch.save(store.state_dict(), path)                  # plain tensors/lists/strings
    """

    def __init__(self, delta: float, eps_max: float, *, on_clean_wrong: str = "shrink", shrink: str = "average",
                 clip_min: str = "zero"):
        if not (math.isfinite(eps_max) and eps_max > 0):
            raise ValueError(f"eps_max must be > 0, got {eps_max}")
        if not (math.isfinite(delta) and 0 < delta <= eps_max):
            raise ValueError(f"delta must be in (0, eps_max={eps_max}], got {delta}")
        for name, value, allowed in (("on_clean_wrong", on_clean_wrong, ON_CLEAN_WRONG), ("shrink", shrink, SHRINK),
                                     ("clip_min", clip_min, CLIP_MIN)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.delta, self.eps_max = float(delta), float(eps_max)
        self.on_clean_wrong, self.shrink, self.clip_min = on_clean_wrong, shrink, clip_min
        self._index: dict = {}
        self._keys: list = []
        self._margins = torch.empty(0, dtype=torch.float64)
        self._dirty = torch.empty(0, dtype=torch.bool)  # updated since the last merge
        self.reset_counters()

    # ------------------------------------------------------------------ lookup
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

    def set(self, ids: Sequence, values) -> None:
        """Set the margins of ``ids`` directly (clipped to [0, eps_max]); e.g. to warm-start a store."""
        rows = self._rows(ids)
        v = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1)
        if v.numel() != rows.numel():
            raise ValueError(f"values: expected {rows.numel()} values, got {v.numel()}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError("values: margins must be finite")
        self._margins[rows] = v.clamp(0.0, self.eps_max)
        self._dirty[rows] = True

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
        d = torch.where(cc & ok, d, torch.zeros_like(d))
        old = self._margins[rows]
        expand = cc & nc
        shrunk = (d + old) / 2 if self.shrink == "average" else d
        new = torch.where(expand, old + self.delta, shrunk)
        if self.on_clean_wrong == "reinit":
            new = torch.where(cc, new, torch.full_like(new, self.delta))
        lo = 0.0 if self.clip_min == "zero" else self.delta
        new = new.clamp(lo, self.eps_max)
        # last occurrence of a duplicated id wins (deterministic)
        keep = _last_occurrence(rows) & ok
        self._margins[rows[keep]] = new[keep]
        self._dirty[rows[keep]] = True
        self.counters["updates"] += int(keep.sum())
        self.counters["expanded"] += int((expand & keep).sum())
        self.counters["shrunk"] += int((~expand & keep).sum())
        self.counters["clean_wrong"] += int((~cc & keep).sum())
        self.counters["invalid"] += int((~ok).sum())
        return self._margins[rows].float()

    def reset_counters(self) -> None:
        """Zero the update counters (e.g. at the start of an epoch)."""
        self.counters = {"updates": 0, "expanded": 0, "shrunk": 0, "clean_wrong": 0, "invalid": 0}

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict:
        """Mean, median, quantiles, min/max, the share at eps_max and the shares of this period's
        updates that expanded / shrank (a shrink means the noisy sample crossed or the clean was wrong)."""
        m = self._margins
        out = {"count": len(self)}
        if len(self):
            q = torch.quantile(m, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)).tolist()
            out.update(mean=float(m.mean()), min=float(m.min()), max=float(m.max()), q05=q[0], q25=q[1], median=q[2],
                       q75=q[3], q95=q[4], frac_at_eps_max=float((m >= self.eps_max - 1e-9).double().mean()))
        n = self.counters["updates"]
        out["updates"] = n
        out["frac_shrunk"] = self.counters["shrunk"] / n if n else float("nan")
        out["frac_expanded"] = self.counters["expanded"] / n if n else float("nan")
        out["invalid"] = self.counters["invalid"]
        return out

    def format_summary(self) -> str:
        s = self.summary()
        if not s["count"]:
            return "margins: none yet"
        return (f"margins (n={s['count']}): mean {s['mean']:.4g}, median {s['median']:.4g}, q05 {s['q05']:.4g}, "
                f"q95 {s['q95']:.4g}, max {s['max']:.4g}, at eps_max {100 * s['frac_at_eps_max']:.1f}%; "
                f"updates {s['updates']}: shrunk {100 * s['frac_shrunk']:.1f}% (crossed or clean wrong)")

    def histogram(self, bins: int = 20) -> tuple[np.ndarray, np.ndarray]:
        """(counts, edges) of the margins over [0, eps_max]."""
        return np.histogram(self._margins.numpy(), bins=bins, range=(0.0, self.eps_max))

    def suggest_sat_eps(self, quantile: float = 0.5) -> float:
        """An eps for SAT read off the margin distribution (the papers pick SAT's eps near the bulk of
        IMA's margins, COVID-19 section): by default the median margin."""
        if not len(self):
            raise ValueError("no margins stored yet")
        return float(torch.quantile(self._margins, quantile))

    def plot_histogram(self, path, bins: int = 20, title: str | None = None) -> None:
        """Write a PNG of the margin distribution (matplotlib, Agg backend)."""
        from .plumbing import pyplot

        plt = pyplot()
        counts, edges = self.histogram(bins)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="black")
        if len(self):
            ax.axvline(self.suggest_sat_eps(), color="red", linestyle="--", label="median (suggested SAT eps)")
            ax.legend()
        ax.set_xlabel("estimated margin")
        ax.set_ylabel("samples")
        ax.set_title(title or f"IMA margins (n={len(self)}, eps_max={self.eps_max:g})")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain types only (loads with ``torch.load(..., weights_only=True)``)."""
        is_int = [isinstance(k, int) for k in self._keys]
        return {
            "keys": [str(k) for k in self._keys],
            "key_is_int": torch.tensor(is_int, dtype=torch.bool),
            "margins": self._margins.clone(),
            "dirty": self._dirty.clone(),
            "delta": self.delta,
            "eps_max": self.eps_max,
            "on_clean_wrong": self.on_clean_wrong,
            "shrink": self.shrink,
            "clip_min": self.clip_min,
        }

    def load_state_dict(self, state: dict) -> None:
        keys = [int(k) if i else k for k, i in zip(state["keys"], state["key_is_int"].tolist())]
        if len(keys) != state["margins"].numel():
            raise ValueError("margin state: number of keys and margins differ")
        self.delta, self.eps_max = float(state["delta"]), float(state["eps_max"])
        self.on_clean_wrong, self.shrink, self.clip_min = state["on_clean_wrong"], state["shrink"], state["clip_min"]
        self._keys = keys
        self._index = {k: i for i, k in enumerate(keys)}
        self._margins = state["margins"].to(torch.float64).clone()
        self._dirty = state.get("dirty", torch.zeros(len(keys), dtype=torch.bool)).clone()

    @classmethod
    def from_state_dict(cls, state: dict) -> "MarginStore":
        store = cls(delta=state["delta"], eps_max=state["eps_max"])
        store.load_state_dict(state)
        return store

    # ------------------------------------------------------------------ distributed
    def merge(self, group=None) -> None:
        """Make the margins identical on every torch.distributed rank.

        Each rank contributes the entries it updated since the last merge; an id updated on several
        ranks gets the mean of their values, ids updated nowhere keep their (shared) value, ids
        first seen on any rank are added everywhere. No-op when torch.distributed is not initialised.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        mine = torch.nonzero(self._dirty).flatten()
        payload = ([self._keys[i] for i in mine.tolist()], self._margins[mine].tolist(), list(self._keys))
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, payload, group=group)
        sums: dict = {}
        for keys, values, _ in gathered:
            for k, v in zip(keys, values):
                s = sums.setdefault(k, [0.0, 0])
                s[0] += v
                s[1] += 1
        # one key order on every rank (rank 0's keys, then new keys of rank 1, ...), so that the raw
        # arrays and state_dict() are identical too, not only the margin of every id
        order = list(dict.fromkeys(k for _, _, ks in gathered for k in ks))
        self._rows(order)
        if sums:
            rows = torch.tensor([self._index[k] for k in sums], dtype=torch.long)
            self._margins[rows] = torch.tensor([s / n for s, n in sums.values()], dtype=torch.float64)
        perm = torch.tensor([self._index[k] for k in order], dtype=torch.long)
        self._keys = order
        self._index = {k: i for i, k in enumerate(order)}
        self._margins = self._margins[perm]
        self._dirty = torch.zeros(len(order), dtype=torch.bool)


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
