"""nnunet_ima.ui's rules on their own: the one device rule, noise levels, the margin histogram PNG."""
from __future__ import annotations

import argparse

import pytest
import torch

from nnunet_ima import MarginStore
from nnunet_ima.ui import UsageError, check_device, eps_value, plot_margin_histogram, resolve_device


@pytest.mark.parametrize("gpus, value, ok", [
    (0, "cpu", True), (0, "cuda", False), (0, "cuda:0", False),
    (2, "cuda", True), (2, "cuda:1", True), (2, "cuda:2", False),
    (2, "mps", False), (2, "cuda:", False), (2, "CPU", False), (2, "gpu", False),
])
def test_one_device_rule(gpus, value, ok, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if ok:
        assert check_device(value) == value
    else:
        with pytest.raises(UsageError, match=rf"^--device {value}: expected "):
            check_device(value)


@pytest.mark.parametrize("gpus, default", [(0, "cpu"), (1, "cuda")])
def test_default_device_is_cuda_when_available(gpus, default, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert resolve_device(None) == default and resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("text, value", [("0", 0.0), ("2.5", 2.5), ("1e-3", 1e-3)])
def test_eps_value_accepts_finite_levels_from_zero(text, value):
    assert eps_value(text) == value


@pytest.mark.parametrize("text", ["-0.1", "nan", "inf", "abc", ""])
def test_eps_value_refuses_the_rest(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected"):
        eps_value(text)


def test_margin_histogram_png(tmp_path):
    store = MarginStore(delta=0.5, eps_max=2.0)
    store.update([0, 1, 2], [True, True, False], [True, False, False], [0.0, 0.2, 0.0])
    plot_margin_histogram(store, tmp_path / "m.png")
    plot_margin_histogram(MarginStore(delta=0.5, eps_max=2.0), tmp_path / "empty.png")  # no median to mark
    for name in ("m.png", "empty.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
