"""PGD / IFGSM: budgets, loss ascent, batch properties (advertorch style), clip, model hygiene, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnunet_ima import IFGSM, PGD, NonFiniteInputWarning, ifgsm, pgd
from nnunet_ima.attacks import resolve_step_size
from nnunet_ima.losses import cross_entropy


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


NORMS = ("l2", "linf")
ORD = {"l2": 2, "linf": float("inf")}


def measure(d, norm):
    return d.flatten(1).norm(p=ORD[norm], dim=1)


def mlp(d_in=2, c=3, hidden=32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, c))


class TinyCNN(torch.nn.Module):
    def __init__(self, c=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 8 * 8, c)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained on three 2-D Gaussian blobs (a fixed model for the budget sweep)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 2.0], [-1.8, -1.0], [1.8, -1.0]])
    y = torch.arange(3).repeat_interleave(100)
    x = centres[y] + 0.6 * torch.randn(300, 2, generator=g)
    model = mlp()
    for _ in range(300):  # plain gradient descent: torch.optim's first step costs seconds of imports
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.3 * p.grad
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, x, y


def image_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


# ---------------------------------------------------------------- budgets and loss ascent
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("attack", ["pgd", "ifgsm"])
def test_never_leaves_per_sample_ball(trained, norm, attack):
    model, x, y = trained
    eps = torch.linspace(0, 1.5, x.shape[0])  # includes eps = 0
    kw = dict(generator=torch.Generator().manual_seed(1)) if attack == "pgd" else {}
    fn = pgd if attack == "pgd" else ifgsm
    x_adv = fn(model, x, y, eps, norm=norm, steps=10, step_size=2.0 * eps, **kw)  # big steps: projection must act
    d = measure(x_adv - x, norm)
    assert (d <= eps * (1 + 1e-5) + 1e-7).all()
    assert torch.equal(x_adv[0], x[0])  # eps = 0: untouched
    assert (d[eps > 0] > 0).all()


@pytest.mark.parametrize("norm", NORMS)
def test_random_start_is_in_the_ball(norm):
    model = mlp(d_in=50)
    x = torch.randn(64, 50)
    y = torch.randint(0, 3, (64,))
    eps = torch.rand(64) + 0.1
    x0 = pgd(model, x, y, eps, norm=norm, steps=0, generator=torch.Generator().manual_seed(0))
    d = measure(x0 - x, norm)
    assert (d <= eps * (1 + 1e-5)).all()
    assert (d > 0).all()


@pytest.mark.parametrize("norm", NORMS)
def test_ifgsm_raises_every_samples_loss_on_linear_model(norm):
    """CE of a linear model is convex in x: a normalised-gradient step never lowers it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    x = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    x_adv = ifgsm(model, x, y, 0.3, norm=norm, steps=5)
    with torch.no_grad():
        before, after = cross_entropy(model(x), y), cross_entropy(model(x_adv), y)
    assert (after >= before - 1e-12).all()
    assert (after > before).float().mean() > 0.95


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_raises_loss_on_trained_model(trained, norm):
    model, x, y = trained
    eps = 0.5 if norm == "l2" else 0.35
    x_adv = pgd(model, x, y, eps, norm=norm, steps=20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = cross_entropy(model(x), y), cross_entropy(model(x_adv), y)
    assert after.mean() > 2 * before.mean()
    assert (after >= before - 1e-4).float().mean() > 0.95


@pytest.mark.parametrize("norm", NORMS)
def test_stronger_budget_never_gives_higher_accuracy(trained, norm):
    model, x, y = trained
    n = x.shape[0]
    budgets = [0.0, 0.1, 0.2, 0.4, 0.8, 1.6]
    acc = []
    for eps in budgets:
        x_adv = pgd(model, x, y, eps, norm=norm, steps=20, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            acc.append(float((model(x_adv).argmax(1) == y).float().mean()))
    noise = 2 / n  # a couple of samples: random starts differ per budget
    assert all(b <= a + noise for a, b in zip(acc, acc[1:])), acc
    assert acc[0] > 0.9 and acc[-1] < acc[0] - 0.3, acc


# ---------------------------------------------------------------- advertorch-style batch properties
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("attack", ["pgd", "ifgsm"])
def test_row_of_batch_equals_single_sample_attack(trained, norm, attack):
    model, x, y = trained
    model = model.double()
    x = x[:10].double()
    y = y[:10]
    eps = torch.linspace(0.1, 1.0, 10)
    kw = dict(random_start=False) if attack == "pgd" else {}
    fn = pgd if attack == "pgd" else ifgsm
    batched = fn(model, x, y, eps, norm=norm, steps=7, **kw)
    for i in (0, 3, 9):
        single = fn(model, x[i:i + 1], y[i:i + 1], eps[i:i + 1], norm=norm, steps=7, **kw)
        torch.testing.assert_close(single[0], batched[i], rtol=0, atol=1e-10)
    model.float()


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("attack", ["pgd", "apgd"])
def test_per_sample_generators_make_a_random_start_independent_of_the_batch(trained, norm, attack):
    """One generator per sample (nnunet_ima.rng.SampleGenerators): row i of the batched attack, random
    start included, is sample i attacked alone with generator i; one shared generator does not give that."""
    from nnunet_ima.apgd import apgd
    from nnunet_ima.rng import SampleGenerators

    model, x, y = trained
    model, x, y = model.double(), x[:6].double(), y[:6]
    seeds = [101, 7, 55, 3, 900, 12]

    def fn(xx, yy, gen, steps=3):
        if attack == "pgd":
            return pgd(model, xx, yy, 0.5, norm=norm, steps=steps, step_size=0.05, generator=gen)
        return apgd(model, xx, yy, 0.5, norm=norm, steps=steps, generator=gen)

    for steps in (0, 3):  # 0: the random start itself
        batched = fn(x, y, SampleGenerators.seeded(seeds), steps)
        shared = fn(x, y, torch.Generator().manual_seed(1), steps)
        for i in (0, 2, 5):
            alone = fn(x[i:i + 1], y[i:i + 1], SampleGenerators.seeded(seeds[i:i + 1]), steps)
            torch.testing.assert_close(alone[0], batched[i], rtol=0, atol=1e-10)
            if steps == 0 and i > 0:  # one generator for the batch: a row's start depends on the rows before it
                assert not torch.allclose(fn(x[i:i + 1], y[i:i + 1], torch.Generator().manual_seed(1), 0)[0], shared[i])
    with pytest.raises(ValueError, match="one generator per sample"):
        fn(x, y, SampleGenerators.seeded(seeds[:2]))
    model.float()


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("random_start", [False, True])
def test_scalar_eps_equals_filled_vector(trained, norm, random_start):
    model, x, y = trained
    runs = [pgd(model, x, y, e, norm=norm, steps=5, random_start=random_start,
                generator=torch.Generator().manual_seed(3))
            for e in (0.4, torch.tensor(0.4), torch.full((x.shape[0],), 0.4))]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_default_step_size_is_four_eps_over_k():
    eps = torch.tensor([0.5, 2.0])
    assert torch.equal(resolve_step_size(None, eps, 20), 4 * eps / 20)
    # one step of a linear model with step_size s moves exactly s (L2), inside the ball
    model = torch.nn.Linear(4, 2).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    x_adv = ifgsm(model, x, y, 1.0, steps=1, step_size=0.3)
    torch.testing.assert_close(measure(x_adv - x, "l2"), torch.full((3,), 0.3, dtype=torch.float64))


# ---------------------------------------------------------------- clip and losses
@pytest.mark.parametrize("norm", NORMS)
def test_clip_respected(norm):
    model = TinyCNN().eval()
    x, y = image_batch()
    x_adv = pgd(model, x, y, 3.0, norm=norm, steps=5, clip=(0.0, 1.0), generator=torch.Generator().manual_seed(0))
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)


def test_no_hidden_clip_by_default():
    """nnU-Net inputs are z-scored: without ``clip`` nothing is clamped to [0, 1]."""
    model = TinyCNN().eval()
    x, y = image_batch()
    x_adv = pgd(model, x, y, 3.0, norm="linf", steps=3, generator=torch.Generator().manual_seed(0))
    assert x_adv.min() < 0 and x_adv.max() > 1


@pytest.mark.parametrize("bad", [(1.0, 0.0), (0.5, 0.5)])
def test_bad_clip(bad):
    model = TinyCNN()
    x, y = image_batch()
    with pytest.raises(ValueError, match="clip"):
        pgd(model, x, y, 1.0, clip=bad)


@pytest.mark.parametrize("loss", ["margin", lambda out, y: F.cross_entropy(out, y, reduction="none")])
def test_other_losses_attack(trained, loss):
    model, x, y = trained
    x_adv = pgd(model, x, y, 1.6, steps=20, loss=loss, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).float().mean() < (model(x).argmax(1) == y).float().mean() - 0.3


def test_segmentation_output_with_deep_supervision_and_channel_targets():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 3, 3, padding=1)

    class DS(torch.nn.Module):
        def forward(self, x):
            out = conv(x)
            return [out, F.avg_pool2d(out, 2)]

    x = torch.randn(4, 1, 8, 8)
    y = torch.randint(0, 3, (4, 1, 8, 8))
    x_adv = pgd(DS(), x, y, 0.5, steps=3, generator=torch.Generator().manual_seed(0))
    assert (measure(x_adv - x, "l2") <= 0.5 + 1e-5).all()
    with torch.no_grad():
        assert (cross_entropy(conv(x_adv), y) > cross_entropy(conv(x), y)).all()


def test_attack_classes_bind_model_and_settings(trained):
    model, x, y = trained
    a = IFGSM(model, norm="linf", steps=4)
    assert torch.equal(a(x, y, 0.2), ifgsm(model, x, y, 0.2, norm="linf", steps=4))
    assert "linf" in repr(a)
    p = PGD(model, steps=3, random_start=False)
    assert torch.equal(p(x, y, 0.2), pgd(model, x, y, 0.2, steps=3, random_start=False))


# ---------------------------------------------------------------- model hygiene
class Recorder(torch.nn.Module):
    def __init__(self, fail_after=None):
        super().__init__()
        self.net = TinyCNN()
        self.modes = []
        self.calls = 0
        self.fail_after = fail_after

    def forward(self, x):
        self.modes.append(self.training)
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("boom")
        return self.net(x)


@pytest.mark.parametrize("start_training", [True, False])
@pytest.mark.parametrize("attack", ["pgd", "ifgsm"])
def test_mode_restored_and_params_untouched(start_training, attack):
    model = Recorder().train(start_training)
    model.net.fc.bias.requires_grad_(False)  # a frozen parameter stays frozen
    model.net.conv.weight.grad = torch.ones_like(model.net.conv.weight)  # an existing grad is left alone
    bn_stats = model.net.bn.running_mean.clone()
    x, y = image_batch()
    (pgd if attack == "pgd" else ifgsm)(model, x, y, 1.0, steps=3)
    assert model.training is start_training
    assert model.modes and not any(model.modes)  # attack forwards run in eval mode
    assert torch.equal(model.net.bn.running_mean, bn_stats)
    assert torch.equal(model.net.conv.weight.grad, torch.ones_like(model.net.conv.weight))
    for name, p in model.named_parameters():
        assert p.requires_grad is (name != "net.fc.bias")
        if name != "net.conv.weight":
            assert p.grad is None, name


def test_model_mode_train_and_keep():
    x, y = image_batch()
    model = Recorder().eval()
    pgd(model, x, y, 1.0, steps=2, model_mode="train")
    assert all(model.modes) and not model.training
    model = Recorder().train()
    pgd(model, x, y, 1.0, steps=2, model_mode="keep")
    assert all(model.modes) and model.training
    with pytest.raises(ValueError, match="model_mode"):
        pgd(model, x, y, 1.0, steps=2, model_mode="test")


def test_state_restored_when_model_raises():
    model = Recorder(fail_after=2).train()
    x, y = image_batch()
    with pytest.raises(RuntimeError, match="boom"):
        pgd(model, x, y, 1.0, steps=5)
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_attack_inside_no_grad_and_input_untouched():
    model = TinyCNN().eval()
    x, y = image_batch()
    x_copy = x.clone()
    with torch.no_grad():
        x_adv = pgd(model, x, y, 1.0, steps=3)
    assert torch.equal(x, x_copy) and not x.requires_grad
    assert not x_adv.requires_grad and not torch.equal(x_adv, x)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("attack", [pgd, ifgsm])
@pytest.mark.parametrize("kwargs, name", [
    (dict(eps=-0.5), "eps"),
    (dict(eps=torch.tensor([0.5, -0.1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])), "eps"),
    (dict(eps=torch.ones(5)), "eps"),
    (dict(eps=torch.ones(8, 1)), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(eps="big"), "eps"),
    (dict(norm="l1"), "norm"),
    (dict(loss="dice"), "loss"),
    (dict(steps=-1), "steps"),
    (dict(step_size=-1.0), "step_size"),
    (dict(step_size=torch.full((8,), -0.1)), "step_size"),
    (dict(step_size=torch.ones(3)), "step_size"),
])
def test_bad_input_names_the_argument(attack, kwargs, name):
    x, y = image_batch()
    kw = dict(eps=1.0)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=name):
        attack(TinyCNN(), x, y, **kw)


def test_batch_mismatch_names_y():
    x, y = image_batch()
    with pytest.raises(ValueError, match="y: batch size 7 does not match"):
        pgd(TinyCNN(), x, y[:7], 1.0)


@pytest.mark.parametrize("norm", NORMS)
def test_nonfinite_samples_untouched_others_attacked_as_alone(trained, norm):
    model, x, y = trained
    x = x[:12].clone()
    y = y[:12]
    x[2, 0] = float("nan")
    x[7, 1] = float("-inf")
    good = torch.ones(12, dtype=torch.bool)
    good[[2, 7]] = False
    with pytest.warns(NonFiniteInputWarning, match=r"x: 2 of 12 .*\[2, 7\]"):
        x_adv = ifgsm(model, x, y, 0.5, norm=norm, steps=5)
    assert torch.equal(x_adv[~good].isnan(), x[~good].isnan())
    assert x_adv[7, 1] == float("-inf") and torch.equal(x_adv[2, 1], x[2, 1])
    alone = ifgsm(model, x[good], y[good], 0.5, norm=norm, steps=5)
    torch.testing.assert_close(x_adv[good], alone)


# ---------------------------------------------------------------- explicit start point (delta_init)
@pytest.mark.parametrize("norm", NORMS)
def test_delta_init_is_the_start_projected_into_each_ball(trained, norm):
    model, x, y = trained
    x, y = x[:6], y[:6]
    eps = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0, 5.0])
    delta = 0.8 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    x0 = pgd(model, x, y, eps, norm=norm, steps=0, delta_init=delta)  # random_start (True) is ignored
    inside = measure(delta, norm) <= eps
    assert torch.allclose(x0[inside], x[inside] + delta[inside])  # small enough: kept as is
    d = measure(x0 - x, norm)
    assert torch.allclose(d[~inside], eps[~inside], atol=1e-5)  # too big: projected onto the boundary
    clipped = pgd(model, x, y, 5.0, norm=norm, steps=0, delta_init=delta, clip=(-0.5, 0.5))
    assert bool((clipped.abs() <= 0.5).all())


@pytest.mark.parametrize("norm", NORMS)
def test_random_start_equals_delta_init_of_the_same_draw(trained, norm):
    """PGD's random start is delta_init = norm.random(...): the same draw gives the same attack."""
    from nnunet_ima import get_norm

    model, x, y = trained
    eps = torch.rand(x.shape[0]) + 0.2
    a = pgd(model, x, y, eps, norm=norm, steps=5, generator=torch.Generator().manual_seed(3))
    start = get_norm(norm).random(x, eps, torch.Generator().manual_seed(3))
    b = pgd(model, x, y, eps, norm=norm, steps=5, delta_init=start)
    assert torch.equal(a, b)
    c = pgd(model, x, y, eps, norm=norm, steps=5, delta_init=torch.zeros_like(x))
    assert torch.equal(c, ifgsm(model, x, y, eps, norm=norm, steps=5))  # zero start = IFGSM


def test_delta_init_rows_follow_their_samples_past_nonfinite_ones(trained):
    model, x, y = trained
    x, y = x[:5].clone(), y[:5]
    x[1, 0] = float("nan")
    delta = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with pytest.warns(NonFiniteInputWarning):
        x_adv = pgd(model, x, y, 0.7, steps=3, delta_init=delta)
    keep = torch.tensor([True, False, True, True, True])
    torch.testing.assert_close(x_adv[keep], pgd(model, x[keep], y[keep], 0.7, steps=3, delta_init=delta[keep]))


@pytest.mark.parametrize("bad", [torch.zeros(3, 1, 8, 8), torch.zeros(8, 64), [0.0] * 8,
                                 torch.full((8, 1, 8, 8), float("nan"))])
def test_bad_delta_init_names_the_argument(bad):
    x, y = image_batch()
    with pytest.raises(ValueError, match="delta_init"):
        pgd(TinyCNN(), x, y, 1.0, steps=1, delta_init=bad)
