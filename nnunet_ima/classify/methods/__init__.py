"""Training methods, one small module each, looked up by name in :data:`METHODS`.

>>> method = build_method("ima", MethodConfig(eps=0.3, delta=0.01, norm="linf"))
>>> out = method.loss(model, x, y, ids); out.loss.backward()
"""
from __future__ import annotations

from .base import Method, MethodConfig, StepOutput
from .fat import Fat, early_stopped_pgd
from .ima import Ima
from .mma import Mma
from .rand_noise import RandNoise
from .sat import Sat
from .std import Std
from .trades import Trades

METHODS: dict[str, type[Method]] = {m.name: m for m in (Std, Sat, Ima, Trades, Mma, Fat, RandNoise)}


def build_method(name: str, cfg: MethodConfig) -> Method:
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](cfg)


__all__ = ["METHODS", "Method", "MethodConfig", "StepOutput", "build_method", "early_stopped_pgd", "Std", "Sat",
           "Ima", "Trades", "Mma", "Fat", "RandNoise"]
