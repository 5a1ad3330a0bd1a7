"""IMA end to end on separable 2-D data (store + bpgd + ima_loss, Algorithm 1 in mini-batches).

Class 0 fills x1 in [-3, -1], class 1 fills x1 in [1, 3] (x2 in [-2, 2] for both), ten samples of
each class sit exactly on x1 = -1 / +1. The gap between the classes is 2, the max-margin boundary is
x1 = 0, so the boundary samples' margins can grow to half the gap, 1, and no further: there their
noisy samples meet. Samples with |x1| > eps_max can only be capped by eps_max.
"""
from __future__ import annotations

import pytest
import torch

from nnunet_ima import IMAStepSettings, MarginStore, argmax_correct, ima_beta_loss, ima_loss, ima_step
from nnunet_ima.losses import cross_entropy

N = 100
GAP = 2.0
EPS_MAX = 1.6
DELTA = 0.05


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def separable_data():
    g = torch.Generator().manual_seed(0)
    x1 = 1 + 2 * torch.rand(N, generator=g)
    x1[:10] = 1.0
    x2 = 4 * torch.rand(N, generator=g) - 2
    x = torch.stack([torch.cat([-x1, x1]), torch.cat([x2, x2])], 1)  # mirror images across x1 = 0
    y = torch.cat([torch.zeros(N), torch.ones(N)]).long()
    boundary = torch.zeros(2 * N, dtype=torch.bool)
    boundary[:10] = boundary[N:N + 10] = True
    return x, y, boundary


def run_ima(model, x, y, iters, *, store, variant="boundary", batch=None, lr=0.5, beta=None, noisy_rule="argmax"):
    """Algorithm 1 through the kernel's IMA step (:func:`nnunet_ima.ima_step`). ``noisy_rule``:
    "argmax" is line 13 literally (g(z~) = y, expand_rule "prediction"); "crossed" reads the noisy
    sample as wrong whenever BPGD found the boundary (its midpoint lies on either side; "no_crossing")."""
    ids = [f"s{i:03d}" for i in range(x.shape[0])]  # string ids, as the segmentation trainers use
    settings = IMAStepSettings(steps=20, search_steps=10, variant=variant,
                               expand_rule="prediction" if noisy_rule == "argmax" else "no_crossing")
    history = []
    g = torch.Generator().manual_seed(1)
    for _ in range(iters):
        order = torch.randperm(x.shape[0], generator=g) if batch else torch.arange(x.shape[0])
        for start in range(0, x.shape[0], batch or x.shape[0]):
            sel = order[start:start + (batch or x.shape[0])]
            xb, yb, idb = x[sel], y[sel], [ids[i] for i in sel.tolist()]
            z = model(xb)
            l0 = cross_entropy(z, yb)
            clean_ok = z.argmax(1) == yb
            noisy, update = ima_step(model, xb, yb, idb, z.detach(), argmax_correct, store, settings)
            l1, z_noisy = l0, None
            if noisy is not None:
                z_noisy = model(noisy)
                l1 = cross_entropy(z_noisy, yb)
            loss = ima_loss(l0, l1, clean_ok) if beta is None else ima_beta_loss(l0, l1, clean_ok, beta)
            model.zero_grad()
            loss.backward()
            with torch.no_grad():  # plain SGD (torch.optim's first step costs seconds of imports)
                for p in model.parameters():
                    p -= lr * p.grad
            update.finish(z_noisy)  # lines 13-19 (z_noisy came from the weights before this update)
            assert float(store.margins.max()) <= EPS_MAX  # never above eps_max, at any step
        history.append(store.get(ids).double())
    return torch.stack(history)


@pytest.mark.parametrize("variant, noisy_rule, bias, tol", [
    ("boundary", "crossed", 0.0, DELTA / 2),
    ("augment", "crossed", 0.0, DELTA / 2),
    # line 13 literally: a crossed sample's midpoint is correct about half the time and then expands
    # (excess e -> e + delta or e / 2 with equal odds), so margins settle 2 delta above the geometry
    # on average, with a geometric tail per sample
    ("boundary", "argmax", 2 * DELTA, 8 * DELTA),
])
def test_margins_grow_until_boundary_samples_meet(variant, noisy_rule, bias, tol):
    torch.manual_seed(0)
    x, y, boundary = separable_data()
    model = torch.nn.Linear(2, 2)
    store = MarginStore(delta=DELTA, eps_max=EPS_MAX)
    hist = run_ima(model, x, y, 80, store=store, variant=variant, noisy_rule=noisy_rule)
    final = hist[-10:].mean(0)  # average over the last iterations: margins oscillate by ~delta

    # the boundary moved to the max-margin separator x1 = 0
    w = (model.weight[1] - model.weight[0]).detach()
    b = float((model.bias[1] - model.bias[0]).detach())
    assert abs(float(w[1] / w[0])) < 0.02 and abs(b / float(w[0])) < 0.02

    # margins rose from delta: the bulk reached eps_max (their true margin |x1| exceeds it)
    far = x[:, 0].abs() > EPS_MAX + 0.1
    assert (final[far] > EPS_MAX - 2 * DELTA).all()
    assert hist[0].mean() < 0.2 and final.mean() > 1.0
    # the boundary samples' margins rose to half the gap and stopped there: the two classes meet
    assert ((final[boundary] - GAP / 2).abs() < tol).all(), final[boundary]
    for cls in (0, 1):
        assert float(final[boundary & (y == cls)].mean()) == pytest.approx(GAP / 2 + bias, abs=DELTA / 2)
    # and no sample's margin exceeds its distance to the separator by more than the tolerance
    assert (final <= x[:, 0].abs() + tol).all()


def test_minibatches_and_beta_loss_reach_the_same_equilibrium():
    torch.manual_seed(1)
    x, y, boundary = separable_data()
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    store = MarginStore(delta=DELTA, eps_max=EPS_MAX)
    hist = run_ima(model, x, y, 40, store=store, batch=50, lr=0.2, beta=0.5, noisy_rule="crossed")
    final = hist[-5:].mean(0)
    m = final[boundary]
    # a small MLP need not find the exact max-margin line, but its boundary samples meet near the middle
    assert (m > 0.6).all() and (m < GAP / 2 + 3 * DELTA).all(), m
    assert final[boundary & (y == 0)].mean() + final[boundary & (y == 1)].mean() <= GAP + 4 * DELTA
    assert store.summary()["frac_at_eps_max"] > 0.3


def test_clean_wrong_samples_shrink_and_are_not_attacked_into_large_margins():
    """A sample whose label is flipped (never correct) never grows: its margin halves each time."""
    torch.manual_seed(2)
    x, y, _ = separable_data()
    y = y.clone()
    y[50] = 1 - y[50]  # a deep-inside class-0 point labelled class 1
    model = torch.nn.Linear(2, 2)
    store = MarginStore(delta=DELTA, eps_max=EPS_MAX)
    hist = run_ima(model, x, y, 30, store=store)
    assert hist[-1, 50] < DELTA / 2 ** 10


def test_ima_loss_by_hand():
    l0 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    l1 = torch.tensor([5.0, 6.0, 7.0, 8.0])
    assert float(ima_loss(l0, l1)) == pytest.approx(((1 + 5) + (2 + 6) + (3 + 7) + (4 + 8)) / 2 / 4)
    ok = torch.tensor([True, False, True, False])  # line 9: L1 <- L0 where the clean sample is wrong
    assert float(ima_loss(l0, l1, ok)) == pytest.approx(((1 + 5) + (2 + 2) + (3 + 7) + (4 + 4)) / 2 / 4)
    # earlier paper: ((1 - beta) * (L0 + L1) + beta * L2) / B, L2 over the correct samples only
    assert float(ima_beta_loss(l0, l1, ok, beta=0.25)) == pytest.approx((0.75 * 10 + 0.25 * (5 + 7)) / 4)
    with pytest.raises(ValueError, match="beta"):
        ima_beta_loss(l0, l1, ok, beta=1.5)
