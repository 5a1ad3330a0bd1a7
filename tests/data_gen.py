"""Test-only data generators (not part of the installed package).

Imported by the tests (``from data_gen import synthetic_shapes``: pytest puts tests/ on sys.path)
and by ``benchmarks/bench_trainers.py`` (which adds tests/ to sys.path itself).
"""
from __future__ import annotations

import numpy as np


def synthetic_shapes(n_cases: int, shape=(8, 32, 32), seed: int = 0, noise: float = 0.3) -> dict:
    """Cases with a bright ellipsoid (label 1) holding a darker core (label 2) at random positions.

    Returns ``{case_id: (image, label)}`` with ``image`` float32 and ``label`` uint8, both of
    ``shape`` (z, y, x). Small, quick to learn, and with a known ground truth: meant for tests and
    smoke runs.
    """
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    cases = {}
    for i in range(n_cases):
        c = [rng.uniform(0.35 * s, 0.65 * s) for s in shape]
        r = [rng.uniform(0.22 * s, 0.32 * s) for s in shape]
        d = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2
        label = np.zeros(shape, np.uint8)
        label[d <= 1.0] = 1
        label[d <= 0.35] = 2
        image = np.select([label == 2, label == 1], [0.5, 1.0], 0.0).astype(np.float32)
        image += noise * rng.standard_normal(shape).astype(np.float32)
        cases[f"case_{i:03d}"] = (image * 100.0 + 50.0, label)
    return cases
