"""What IMA's margins look like: the summary printed after each epoch, the histogram and the SAT eps
read off the margins (numbers only; the PNG is :func:`nnunet_ima.ui.plot_margin_histogram`).

Functions of a (N,) float64 tensor of margins, so :class:`~nnunet_ima.margins.MarginStore` keeps
one-line methods for them (``store.summary()``, ``store.format_summary()``, ...).
"""
from __future__ import annotations

import numpy as np
import torch

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def summarize(margins: torch.Tensor, eps_max: float, counters: dict) -> dict:
    """Count, mean, median, quantiles, min/max, the share at eps_max, and the shares of this period's
    updates (``counters``) that expanded / shrank (a shrink: the noisy sample crossed or the clean was wrong)."""
    m = margins
    out = {"count": int(m.numel())}
    if m.numel():
        q = torch.quantile(m, torch.tensor(QUANTILES, dtype=m.dtype)).tolist()
        out.update(mean=float(m.mean()), min=float(m.min()), max=float(m.max()), q05=q[0], q25=q[1], median=q[2],
                   q75=q[3], q95=q[4], frac_at_eps_max=float((m >= eps_max - 1e-9).double().mean()))
    n = counters["updates"]
    out["updates"] = n
    out["frac_shrunk"] = counters["shrunk"] / n if n else float("nan")
    out["frac_expanded"] = counters["expanded"] / n if n else float("nan")
    out["invalid"] = counters["invalid"]
    return out


def format_summary(s: dict) -> str:
    """One log line from :func:`summarize`'s dict."""
    if not s["count"]:
        return "margins: none yet"
    return (f"margins (n={s['count']}): mean {s['mean']:.4g}, median {s['median']:.4g}, q05 {s['q05']:.4g}, "
            f"q95 {s['q95']:.4g}, max {s['max']:.4g}, at eps_max {100 * s['frac_at_eps_max']:.1f}%; "
            f"updates {s['updates']}: shrunk {100 * s['frac_shrunk']:.1f}% (crossed or clean wrong)")


def histogram(margins: torch.Tensor, eps_max: float, bins: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of the margins over [0, eps_max]."""
    return np.histogram(margins.numpy(), bins=bins, range=(0.0, eps_max))


def suggest_sat_eps(margins: torch.Tensor, quantile: float = 0.5) -> float:
    """An eps for SAT read off the margin distribution (the papers pick SAT's eps near the bulk of
    IMA's margins, COVID-19 section): by default the median margin."""
    if not margins.numel():
        raise ValueError("no margins stored yet")
    return float(torch.quantile(margins, quantile))
