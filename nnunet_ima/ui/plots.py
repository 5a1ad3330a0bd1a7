"""Headless figures (matplotlib on the Agg backend): the one place the project imports matplotlib
for the kernel's data, e.g. IMA's margin histogram (the trainers' ``margins.png``, classify's
``margins_ima.png``)."""
from __future__ import annotations

import numpy as np


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_margin_histogram(store, path, bins: int = 20, title: str | None = None) -> None:
    """Write a PNG of the margins of a :class:`~nnunet_ima.margins.MarginStore` over [0, eps_max], with
    the median marked (the suggested SAT eps).

    >>> plot_margin_histogram(store, "margins.png", title="IMA margins after epoch 9")
    """
    plt = pyplot()
    counts, edges = store.histogram(bins)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="black")
    if len(store):
        ax.axvline(store.suggest_sat_eps(), color="red", linestyle="--", label="median (suggested SAT eps)")
        ax.legend()
    ax.set_xlabel("estimated margin")
    ax.set_ylabel("samples")
    ax.set_title(title or f"IMA margins (n={len(store)}, eps_max={store.eps_max:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
