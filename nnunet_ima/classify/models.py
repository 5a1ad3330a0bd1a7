"""Models of the papers, built by name from :data:`MODELS`.

Notation of the papers: COV(in, out, kernel, stride, padding), IN instance norm, LN layer norm,
LR leaky ReLU.
"""
from __future__ import annotations

import torch
from torch import nn


def _lr():
    return nn.LeakyReLU(0.01)


def moons_mlp(num_classes: int = 2, in_shape=(2,)) -> nn.Module:
    """Earlier paper: Linear(2,32)-LR-Linear(32,64)-LN-LR-Linear(64,128)-LN-LR-Linear(128,2)."""
    return nn.Sequential(nn.Linear(in_shape[0], 32), _lr(), nn.Linear(32, 64), nn.LayerNorm(64), _lr(),
                         nn.Linear(64, 128), nn.LayerNorm(128), _lr(), nn.Linear(128, num_classes))


def digits_mlp(num_classes: int = 10, in_shape=(1, 8, 8)) -> nn.Module:
    """Our choice for the built-in 8x8 digits: the Moons MLP widened, on flattened pixels."""
    n = int(torch.tensor(in_shape).prod())
    return nn.Sequential(nn.Flatten(), nn.Linear(n, 128), _lr(), nn.Linear(128, 128), nn.LayerNorm(128), _lr(),
                         nn.Linear(128, num_classes))


def _conv(cin, cout, k, s, p, norm=True):
    layers = [nn.Conv2d(cin, cout, k, s, p)]
    if norm:
        layers.append(nn.InstanceNorm2d(cout))
    layers.append(_lr())
    return layers


def fashion_cnn(num_classes: int = 10, in_shape=(1, 28, 28)) -> nn.Module:
    """COV(1,64,5,2,2)-LR-COV(64,128,5,2,2)-IN-LR-COV(128,256,5,2,2)-IN-LR-COV(256,512,4,1,0)-Flatten-LN-LR-
    Linear(512,10)."""
    return nn.Sequential(*_conv(in_shape[0], 64, 5, 2, 2, norm=False), *_conv(64, 128, 5, 2, 2),
                         *_conv(128, 256, 5, 2, 2), nn.Conv2d(256, 512, 4, 1, 0), nn.Flatten(), nn.LayerNorm(512),
                         _lr(), nn.Linear(512, num_classes))


def svhn_cnn(num_classes: int = 10, in_shape=(3, 32, 32)) -> nn.Module:
    """COV(3,32,3,1,1)-LR-COV(32,32,3,2,1)-IN-LR-COV(32,64,3,1,1)-IN-LR-COV(64,64,3,2,1)-IN-LR-COV(64,128,3,1,1)-
    IN-LR-COV(128,128,3,2,1)-IN-LR-COV(128,256,4,1,0)-Flatten-LN-LR-Linear(256,10)."""
    return nn.Sequential(*_conv(in_shape[0], 32, 3, 1, 1, norm=False), *_conv(32, 32, 3, 2, 1),
                         *_conv(32, 64, 3, 1, 1), *_conv(64, 64, 3, 2, 1), *_conv(64, 128, 3, 1, 1),
                         *_conv(128, 128, 3, 2, 1), nn.Conv2d(128, 256, 4, 1, 0), nn.Flatten(), nn.LayerNorm(256),
                         _lr(), nn.Linear(256, num_classes))


def resnet18_in(num_classes: int = 2, in_shape=(1, 224, 224)) -> nn.Module:
    """Later paper 3.4: torchvision ResNet-18, batch norm replaced by instance norm, 1 input channel."""
    from torchvision.models import resnet18

    m = resnet18(num_classes=num_classes, norm_layer=lambda c: nn.InstanceNorm2d(c, affine=True))
    m.conv1 = nn.Conv2d(in_shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)
    return m


class _WideBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.short = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        o = self.relu(self.bn1(x))
        y = self.conv2(self.relu(self.bn2(self.conv1(o))))
        return y + (x if self.short is None else self.short(o))


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis), the CIFAR-10 model of the later paper (WRN-28-4, as MMA)."""

    def __init__(self, depth: int = 28, widen: int = 4, num_classes: int = 10, in_ch: int = 3):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers = [nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)]
        for g, stride in zip(range(3), (1, 2, 2)):
            for i in range(n):
                layers.append(_WideBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1], stride if i == 0 else 1))
        self.features = nn.Sequential(*layers, nn.BatchNorm2d(widths[3]), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def wrn28_4(num_classes: int = 10, in_shape=(3, 32, 32)) -> nn.Module:
    return WideResNet(28, 4, num_classes, in_shape[0])


MODELS = {"moons_mlp": moons_mlp, "digits_mlp": digits_mlp, "fashion_cnn": fashion_cnn, "svhn_cnn": svhn_cnn,
          "resnet18_in": resnet18_in, "wrn28_4": wrn28_4}


#: Image sides (min, max; None = no limit) each model accepts. The papers' CNNs end in a 4x4 conv
#: that must meet a 4x4 map (sides 25..32); ResNet-18's five stride-2 stages need at least 33 px
#: (instance norm needs more than one value per map). The MLPs and WRN take any size.
IMAGE_SIDES = {"fashion_cnn": (25, 32), "svhn_cnn": (25, 32), "resnet18_in": (33, None)}
VECTOR_MODELS = ("moons_mlp",)   # take (features,) vectors, not images
SMALL_IMAGE_MODEL = "digits_mlp"  # any image size


def _sides_text(lo, hi) -> str:
    return f"at least {lo}x{lo} px" if hi is None else f"between {lo}x{lo} and {hi}x{hi} px"


def input_problem(name: str, in_shape) -> str | None:
    """Why model ``name`` cannot take inputs of ``in_shape`` (C, H, W) or (F,); None when it can.

    The message names ``--image-size`` and ``--model``, the two ways out.
    """
    in_shape = tuple(in_shape)
    if name in VECTOR_MODELS:
        return None if len(in_shape) == 1 else (f"--model {name} takes vectors of features (like Moons), not "
                                                f"images of shape {in_shape}; choose an image model with --model")
    if name not in IMAGE_SIDES:
        return None
    if len(in_shape) != 3:
        return (f"--model {name} takes images (C, H, W), not inputs of shape {in_shape}; choose "
                f"--model {SMALL_IMAGE_MODEL}")
    lo, hi = IMAGE_SIDES[name]
    h, w = in_shape[1:]
    if min(h, w) >= lo and (hi is None or max(h, w) <= hi):
        return None
    size = lo if hi is None else 28
    return (f"--model {name} needs images {_sides_text(lo, hi)}, these are {h}x{w}: pass --image-size {size} "
            f"(resize on load) or a model for any size (--model {SMALL_IMAGE_MODEL} or --model wrn28_4)")


def model_for_shape(in_shape) -> str:
    """Default model for inputs of ``in_shape``: the papers' model where the size fits it.

    (F,) -> moons_mlp; sides >= 33 -> resnet18_in (later paper, COVID-19 CT); sides 25..32 ->
    fashion_cnn (1 channel) / svhn_cnn (3 channels); smaller -> digits_mlp (our choice: an MLP).
    """
    in_shape = tuple(in_shape)
    if len(in_shape) == 1:
        return "moons_mlp"
    for name in ("resnet18_in", "fashion_cnn" if in_shape[0] == 1 else "svhn_cnn"):
        if input_problem(name, in_shape) is None:
            return name
    return SMALL_IMAGE_MODEL


def build_model(name: str, num_classes: int, in_shape) -> nn.Module:
    """>>> model = build_model("fashion_cnn", 10, (1, 28, 28))"""
    if name not in MODELS:
        raise ValueError(f"model: unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, in_shape=tuple(in_shape))
