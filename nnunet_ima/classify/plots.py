"""Figures: accuracy vs noise level, IMA's margin histogram, and for 2-D data the decision
boundaries of each model (earlier paper, Fig. 6). Headless matplotlib (``nnunet_ima.ui.pyplot``)."""
from __future__ import annotations

import numpy as np
import torch

from nnunet_ima.ui import pyplot

from .evaluate import ATTACKS

TITLES = {"pgd": "PGD (worst of CE and margin loss)", "ifgsm": "IFGSM", "aa": "AutoAttack (torchattacks)"}


def plot_accuracy_vs_eps(results: dict, path, title: str = "") -> None:
    """One panel per attack: accuracy (%) against eps, one line per method (eps 0 = clean)."""
    plt = pyplot()
    attacks = [a for a in ATTACKS if any(a in r for r in results.values())]
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.5 * len(attacks), 3.8), squeeze=False)
    for ax, a in zip(axes[0], attacks):
        for method, r in results.items():
            if a not in r:
                continue
            eps = [0.0] + sorted(r[a])
            acc = [100 * r["clean"]] + [100 * r[a][e] for e in sorted(r[a])]
            ax.plot(eps, acc, marker="o", label=method)
        ax.set_xlabel("noise level eps")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{title}: {TITLES[a]}" if title else TITLES[a], fontsize=10)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_decision_boundaries(models: dict, x: torch.Tensor, y: torch.Tensor, path, max_points: int = 1000,
                             resolution: int = 200) -> None:
    """For 2-D inputs: predicted class over a grid plus the (test) points, one panel per model."""
    plt = pyplot()
    x, y = x[:max_points].cpu().numpy(), y[:max_points].cpu().numpy()
    lo, hi = x.min(0) - 0.5, x.max(0) + 0.5
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], resolution), np.linspace(lo[1], hi[1], resolution))
    grid = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.6), squeeze=False)
    for ax, (name, model) in zip(axes[0], models.items()):
        dev = next(model.parameters()).device
        with torch.no_grad():
            pred = model.eval()(grid.to(dev)).argmax(1).cpu().numpy().reshape(gx.shape)
        ax.contourf(gx, gy, pred, alpha=0.25, cmap="coolwarm")
        ax.contour(gx, gy, pred, levels=[0.5], colors="k", linewidths=1)
        ax.scatter(x[:, 0], x[:, 1], c=y, s=3, cmap="coolwarm")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
