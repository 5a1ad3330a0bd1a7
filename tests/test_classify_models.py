"""Models of the papers: output shapes, input channels, and the normalisation layers they name."""
from __future__ import annotations

import pytest
import torch

from nnunet_ima.classify.models import MODELS, build_model
from nnunet_ima.classify.presets import PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread
SHAPES = {"moons_mlp": ((2,), 2), "digits_mlp": ((1, 8, 8), 10), "fashion_cnn": ((1, 28, 28), 10),
          "svhn_cnn": ((3, 32, 32), 10), "resnet18_in": ((1, 224, 224), 2), "wrn28_4": ((3, 32, 32), 10)}


def test_every_model_and_preset_is_covered():
    assert set(MODELS) == set(SHAPES)
    assert {p.model for p in PRESETS.values()} <= set(MODELS)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_output_shape(name):
    shape, classes = SHAPES[name]
    model = build_model(name, classes, shape).eval()
    with torch.no_grad():
        assert model(torch.rand(2, *shape)).shape == (2, classes)


def test_resnet18_uses_instance_norm_and_one_channel():
    m = build_model("resnet18_in", 2, (1, 224, 224))
    assert m.conv1.in_channels == 1
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    assert any(isinstance(x, torch.nn.InstanceNorm2d) for x in m.modules())


def test_wrn28_4_size():
    n = sum(p.numel() for p in build_model("wrn28_4", 10, (3, 32, 32)).parameters())
    assert 5.8e6 < n < 6.0e6  # WRN-28-4 has about 5.9M parameters


def test_classify_imports_nothing_from_nnunet():
    import subprocess
    import sys

    code = ("import sys, nnunet_ima.classify.cli, nnunet_ima.classify.experiment; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('nnunetv2', 'batchgenerators', 'nnunet_ima_trainers')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
