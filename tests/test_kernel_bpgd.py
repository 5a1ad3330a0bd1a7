"""BPGD (Algorithms 2 and 3) against closed-form margins of linear classifiers.

For a linear binary classifier f(x) = w.x + b the exact distance to the decision boundary is
|f(x)| / ||w||_2 in L2 and |f(x)| / ||w||_1 in Linf; the attack's steepest-ascent direction (unit
gradient, or its sign) points straight at the boundary, so BPGD without random start walks a
straight line from x and its binary search must land on the boundary within its resolution:
the returned midpoint is within (bracket length) / 2^(N+1) of the boundary point. The bracket is
[last correct iterate, first wrong iterate] (length <= alpha = 4 eps / K) for ``variant="boundary"``
and [x, final PGD point] (length <= eps) for ``variant="augment"``.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from nnunet_ima import BPGDResult, MarginStore, NonFiniteInputWarning, bpgd


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


NORMS = ("l2", "linf")
VARIANTS = ("boundary", "augment")
FLOAT_SLACK = 1e-9  # float64 round-off only; the real bound is computed from the bracket length


def dual(p):
    return {"l2": 2, "linf": 1}[p]


def binary_linear(d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(d, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, d, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(2, generator=g, dtype=torch.float64))
    return model


def binary_setup(norm, n=32, d=6, seed=0):
    """Linear 2-class model, points, labels = the model's own predictions, exact margins."""
    model = binary_linear(d, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    w = model.weight[1] - model.weight[0]
    f = x @ w.detach() + (model.bias[1] - model.bias[0]).detach()
    margin = f.abs() / w.detach().norm(p=dual(norm))
    return model, x, y, margin


def resolution(variant, eps, steps, search_steps):
    bracket = 4 * eps / steps if variant == "boundary" else eps
    return bracket / 2 ** (search_steps + 1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("search_steps", [6, 10])
def test_linear_binary_lands_on_true_margin(norm, variant, search_steps):
    model, x, y, margin = binary_setup(norm)
    steps = 20
    eps = margin * 1.7 + 0.05  # above every sample's margin, per-sample budgets
    res = bpgd(model, x, y, eps, norm=norm, steps=steps, search_steps=search_steps, variant=variant)
    assert isinstance(res, BPGDResult)
    assert res.crossed.all() and res.valid.all()
    tol = resolution(variant, eps, steps, search_steps) + FLOAT_SLACK
    err = (res.distance - margin).abs()
    assert (err <= tol).all(), f"max err {err.max():.3g} vs bound {tol[err.argmax()]:.3g}"
    # the distance reported is the distance of the returned point
    assert torch.allclose(res.distance, (res.x_adv - x).flatten(1).norm(p=float("inf") if norm == "linf" else 2, dim=1))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("norm", NORMS)
def test_linear_binary_below_margin_never_crosses(norm, variant):
    model, x, y, margin = binary_setup(norm)
    eps = margin * 0.9
    res = bpgd(model, x, y, eps, norm=norm, steps=20, search_steps=10, variant=variant)
    assert not res.crossed.any()
    with torch.no_grad():
        assert (model(res.x_adv).argmax(1) == y).all()
    # the PGD walk ends on the ball's surface (4 eps / K steps reach it after K / 4 steps)
    assert torch.allclose(res.distance, eps.to(res.distance.dtype), rtol=1e-6, atol=1e-9)


def test_linear_binary_resolution_bound_is_tight_enough_to_fail():
    """With N = 0 the error exceeds the N = 10 bound: the test above can fail."""
    model, x, y, margin = binary_setup("l2")
    eps = margin * 1.7 + 0.05
    res = bpgd(model, x, y, eps, norm="l2", steps=20, search_steps=0, variant="augment")
    err = (res.distance - margin).abs()
    assert (err > resolution("augment", eps, 20, 10)).any()


def multiclass_setup(norm, n=40, d=8, c=4, seed=3, scale=2.0):
    """C-class linear model whose class weights are orthonormal (times ``scale``).

    Then ||w_y - w_j|| is the same for every pair, so the nearest boundary of a sample is the one of
    its runner-up class, and moving along w_j - w_y leaves every other logit unchanged: the
    logit-margin attack walks straight onto the nearest boundary. Exact margin:
    min_j (z_y - z_j) / ||w_y - w_j||_q. For Linf the weights are scaled coordinate vectors, so
    sign(w_j - w_y) also moves along w_j - w_y only.
    """
    g = torch.Generator().manual_seed(seed)
    if norm == "l2":
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        w = scale * q[:c]
    else:
        perm = torch.randperm(d, generator=g)[:c]
        w = scale * torch.eye(d, dtype=torch.float64)[perm]
    model = torch.nn.Linear(d, c).double()
    with torch.no_grad():
        model.weight.copy_(w)
        model.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    gaps = z.gather(1, y[:, None]) - z
    pair = (w[:, None, :] - w[None, :, :]).norm(p=dual(norm), dim=2)  # (c, c)
    dist = gaps / pair[y]
    dist[torch.arange(n), y] = float("inf")
    return model, x, y, dist.min(1).values


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("norm", NORMS)
def test_linear_multiclass_lands_on_true_margin(norm, variant):
    model, x, y, margin = multiclass_setup(norm)
    eps = margin * 1.5 + 0.05
    res = bpgd(model, x, y, eps, norm=norm, steps=20, search_steps=10, variant=variant, loss="margin")
    assert res.crossed.all()
    tol = resolution(variant, eps, 20, 10) + FLOAT_SLACK
    assert ((res.distance - margin).abs() <= tol).all()
    below = bpgd(model, x, y, margin * 0.95, norm=norm, steps=20, variant=variant, loss="margin")
    assert not below.crossed.any()


@pytest.mark.parametrize("norm", NORMS)
def test_linear_multiclass_ce_is_on_a_boundary_and_never_inside_the_margin(norm):
    """With CE the path bends (softmax-weighted gradient), so the point found is on *a* boundary,
    never closer than the exact margin (up to the search resolution)."""
    model, x, y, margin = multiclass_setup(norm)
    eps = margin * 3 + 0.1
    res = bpgd(model, x, y, eps, norm=norm, steps=40, search_steps=12)
    crossed = res.crossed
    assert crossed.float().mean() > 0.9
    tol = resolution("boundary", eps, 40, 12) + FLOAT_SLACK
    assert (res.distance[crossed] >= margin[crossed] - tol[crossed]).all()
    with torch.no_grad():
        z = model(res.x_adv[crossed])
    top2 = z.topk(2, dim=1).values
    lipschitz = model.weight.norm(dim=1).max() * 2 * (x.shape[1] ** 0.5 if norm == "linf" else 1)
    assert ((top2[:, 0] - top2[:, 1]) <= lipschitz * tol[crossed] + 1e-9).all()


def test_boundary_variant_stops_each_sample_at_its_first_wrong_iterate():
    """Algorithm 2: the bracket is (last correct, first wrong) iterate, so the found point lies
    within one step of where the straight walk first crosses; samples with far boundaries keep
    walking (different samples cross at different steps)."""
    model, x, y, margin = binary_setup("l2", n=64)
    eps = torch.full_like(margin, float(margin.max()) * 1.2)
    res = bpgd(model, x, y, eps, steps=20, search_steps=10)
    alpha = 4 * eps / 20
    crossing_step = torch.ceil(margin / alpha)
    assert crossing_step.unique().numel() > 3  # the case really exercises the active set
    assert ((res.distance - margin).abs() <= alpha / 2 ** 11 + FLOAT_SLACK).all()


def test_clean_wrong_sample_gives_distance_zero():
    model, x, y, margin = binary_setup("l2")
    y_wrong = 1 - y
    res = bpgd(model, x, y_wrong, 1.0, steps=5)
    assert res.crossed.all()
    assert torch.equal(res.x_adv, x)
    assert (res.distance == 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_random_start_stays_in_ball_and_is_reproducible(variant):
    model, x, y, margin = binary_setup("l2")
    eps = margin * 2 + 0.1
    a = bpgd(model, x, y, eps, random_start=True, variant=variant, generator=torch.Generator().manual_seed(5))
    b = bpgd(model, x, y, eps, random_start=True, variant=variant, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.x_adv, b.x_adv)
    assert (a.distance <= eps + 1e-9).all()
    assert a.crossed.all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_bpgd_clip_respected(variant):
    model, x, y, margin = binary_setup("linf")
    x = x.clamp(-0.5, 0.5)
    with torch.no_grad():
        y = model(x).argmax(1)
    res = bpgd(model, x, y, 2.0, norm="linf", variant=variant, clip=(-0.5, 0.5), random_start=True,
               generator=torch.Generator().manual_seed(0))
    assert res.x_adv.min() >= -0.5 and res.x_adv.max() <= 0.5


@pytest.mark.parametrize("variant", VARIANTS)
def test_nonfinite_samples_not_attacked_and_not_stored(variant):
    model, x, y, margin = binary_setup("l2", n=6)
    x = x.clone()
    x[1, 2] = float("nan")
    x[4, 0] = float("inf")
    with pytest.warns(NonFiniteInputWarning, match="x: 2 of 6"):
        res = bpgd(model, x, y, margin * 2 + 0.1, variant=variant)
    assert res.valid.tolist() == [True, False, True, True, False, True]
    assert not res.crossed[~res.valid].any()
    assert res.crossed[res.valid].all()
    assert torch.equal(res.x_adv[1].isnan(), x[1].isnan())  # returned untouched
    assert res.x_adv[4, 0] == float("inf")
    store = MarginStore(delta=0.5, eps_max=5.0)
    ids = list(range(6))
    before = store.get(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.update(ids, torch.ones(6, dtype=torch.bool), ~res.crossed, res.distance, valid=res.valid)
    after = store.get(ids)
    assert after[1] == before[1] and after[4] == before[4]
    assert torch.isfinite(store.margins).all()
    assert store.counters["invalid"] == 2


def test_bpgd_parameter_grads_and_mode():
    model, x, y, margin = binary_setup("l2")
    model.train()
    seen = []
    model.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    bpgd(model, x, y, margin * 2 + 0.1, search_steps=4)
    assert seen and not any(seen), "every attack forward (binary search included) runs in eval mode"
    assert model.training
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kwargs, name", [
    (dict(eps=-0.1), "eps"),
    (dict(eps=torch.ones(3)), "eps"),
    (dict(norm="l1"), "norm"),
    (dict(variant="other"), "variant"),
    (dict(steps=-1), "steps"),
])
def test_bpgd_bad_input(kwargs, name):
    model, x, y, margin = binary_setup("l2", n=4)
    kw = dict(eps=1.0)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=name):
        bpgd(model, x, y, **kw)


def test_bpgd_batch_mismatch():
    model, x, y, margin = binary_setup("l2", n=4)
    with pytest.raises(ValueError, match="y"):
        bpgd(model, x, y[:3], 1.0)
