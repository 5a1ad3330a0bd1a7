"""Each training method's loss on a tiny batch against a direct computation from its definition.

References are written from the papers' formulas with explicit log-softmax arithmetic; the
adversarial points are regenerated with the same seed from the kernel attacks the definitions name
(or checked against the definition directly, for FAT's early stop).
"""
from __future__ import annotations

import pytest
import torch

from nnunet_ima import bpgd, get_norm, perturb_iterative, pgd
from nnunet_ima.classify.methods import METHODS, MethodConfig, build_method, early_stopped_pgd
from nnunet_ima.classify.methods.trades import kl_per_sample

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread
B, D, C = 12, 4, 3


def logp(z):
    return z - z.exp().sum(1, keepdim=True).log()


def ce(z, y):  # -log softmax(z)_y, per sample
    return -logp(z).gather(1, y[:, None]).squeeze(1)


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, C))
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g)
    x = torch.randn(B, D, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % C  # three wrongly classified samples
    cfg = MethodConfig(eps=0.4, norm="l2", steps=6, search_steps=5, delta=0.2)  # some samples cross at 0.2
    return model, x, y, cfg


def run(name, setup, seed=0, **changes):
    model, x, y, cfg = setup
    for k, v in changes.items():
        setattr(cfg, k, v)
    m = build_method(name, cfg)
    torch.manual_seed(seed)
    return m, m.loss(model, x, y, list(range(B)))


def test_registry_covers_all_methods():
    assert set(METHODS) == {"std", "sat", "ima", "trades", "mma", "fat", "rand"}
    assert set(METHODS) == set(REFERENCES), "add a reference test for every registered method"


def ref_std(setup, out, m):
    model, x, y, cfg = setup
    return ce(model(x), y).mean()


def ref_sat(setup, out, m):
    model, x, y, cfg = setup
    torch.manual_seed(0)
    x_adv = pgd(model, x, y, cfg.eps, norm="l2", steps=cfg.steps, step_size=4 * cfg.eps / cfg.steps,
                random_start=True, clip=cfg.clip)
    assert torch.equal(out.x_adv, x_adv)
    assert bool(((x_adv - x).flatten(1).norm(dim=1) <= cfg.eps + 1e-5).all())
    return (ce(model(x), y).mean() + ce(model(x_adv), y).mean()) / 2


def ref_rand(setup, out, m):
    model, x, y, cfg = setup
    d = out.x_adv - x
    assert bool((d.flatten(1).norm(dim=1) <= cfg.eps + 1e-5).all()) and bool((d != 0).any())
    torch.manual_seed(0)
    assert torch.equal(out.x_adv, x + get_norm("l2").random(x, torch.full((B,), cfg.eps)))
    return (ce(model(x), y).mean() + ce(model(out.x_adv), y).mean()) / 2


def ref_trades(setup, out, m):
    model, x, y, cfg = setup
    z = model(x)
    p = logp(z).exp()
    torch.manual_seed(0)
    x_adv = pgd(model, x, torch.softmax(z.detach(), 1), cfg.eps, norm="l2", steps=cfg.steps, loss=kl_per_sample,
                clip=cfg.clip, delta_init=0.001 * torch.randn_like(x))  # TRADES' start: x + 0.001 N(0, I)
    assert torch.allclose(out.x_adv, x_adv, atol=1e-5)  # the attack's target is softmax(f(x)), as in TRADES
    kl = (p * (logp(z) - logp(model(x_adv)))).sum(1)  # KL(f(x) || f(x_adv))
    return ce(z, y).mean() + 6.0 * kl.mean()


def ref_ima(setup, out, m):
    model, x, y, cfg = setup
    inside = (out.x_adv - x).flatten(1).norm(dim=1).lt(cfg.delta - 1e-4)[model(x).argmax(1) == y]
    assert bool(inside.any()) and not bool(inside.all())  # some correct samples crossed, some did not
    z = model(x)
    correct = z.argmax(1) == y
    res = bpgd(model, x[correct], y[correct], torch.full((int(correct.sum()),), cfg.delta), norm="l2",
               steps=cfg.steps, search_steps=cfg.search_steps, clip=cfg.clip)
    assert torch.equal(out.x_adv[correct], res.x_adv) and torch.equal(out.x_adv[~correct], x[~correct])
    l0 = ce(z, y)
    l1 = l0.clone()
    l1[correct] = ce(model(res.x_adv), y[correct])
    # margins after one batch (Algorithm 1 lines 13-19): expand by delta, else average with ||x - x~||
    zn = model(res.x_adv)
    noisy_ok = zn.argmax(1) == y[correct]
    expect = torch.full((B,), cfg.delta / 2, dtype=torch.float64)  # clean wrong: (0 + E) / 2
    expect[correct] = torch.where(noisy_ok, torch.tensor(2 * cfg.delta, dtype=torch.float64),
                                  (res.distance.double() + cfg.delta) / 2)
    assert torch.allclose(m.store.get(range(B)).double(), expect, atol=1e-6)
    return ((l0 + l1) / 2).mean()


def ref_mma(setup, out, m):
    model, x, y, cfg = setup
    z = model(x)
    correct = z.argmax(1) == y
    res = bpgd(model, x[correct], y[correct], cfg.eps, norm="l2", steps=cfg.steps, search_steps=cfg.search_steps,
               variant="augment", clip=cfg.clip)
    l_clean = ce(z, y)
    margin_term = l_clean[~correct].sum() + ce(model(res.x_adv[res.crossed]), y[correct][res.crossed]).sum()
    return l_clean.mean() / 3 + (2 / 3) * margin_term / B


def ref_fat(setup, out, m):
    model, x, y, cfg = setup
    return ce(model(out.x_adv), y).mean()


REFERENCES = {"std": ref_std, "sat": ref_sat, "rand": ref_rand, "trades": ref_trades, "ima": ref_ima, "mma": ref_mma,
              "fat": ref_fat}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_loss_matches_definition(setup, name):
    m, out = run(name, setup)
    ref = REFERENCES[name](setup, out, m)
    assert torch.allclose(out.loss, ref, rtol=1e-5, atol=1e-6), (float(out.loss), float(ref))
    out.loss.backward()  # differentiable w.r.t. the weights
    assert all(p.grad is not None for p in setup[0].parameters())


def test_ima_beta_loss_matches_earlier_paper(setup):
    model, x, y, cfg = setup
    m, out = run("ima", setup, ima_loss="beta", ima_beta=0.5)
    z = model(x)
    correct = z.argmax(1) == y
    l0, l1 = ce(z, y)[~correct].sum(), ce(z, y)[correct].sum()
    l2 = ce(model(out.x_adv[correct]), y[correct]).sum()
    assert torch.allclose(out.loss, ((1 - 0.5) * (l0 + l1) + 0.5 * l2) / B, rtol=1e-5)


def test_ima_earlier_paper_margin_rules(setup):
    """--ima-rule earlier: clean wrong -> Delta (re-initialise); BPGD found the boundary -> ||x - x~||
    (clipped at Delta); otherwise expand by Delta."""
    model, x, y, cfg = setup
    m, out = run("ima", setup, ima_rule="earlier", delta=0.2, eps=0.8)
    correct = model(x).argmax(1) == y
    res = bpgd(model, x[correct], y[correct], 0.2, norm="l2", steps=cfg.steps, search_steps=cfg.search_steps,
               clip=cfg.clip)
    expect = torch.full((B,), 0.2, dtype=torch.float64)
    expect[correct] = torch.where(res.crossed, res.distance.double().clamp(min=0.2), torch.tensor(0.4).double())
    assert torch.allclose(m.store.get(range(B)).double(), expect, atol=1e-6)
    assert bool(res.crossed.any()) and not bool(res.crossed.all())  # both cases occur


def test_ima_attacks_only_correct_samples(setup):
    m, out = run("ima", setup)
    assert out.info["attacked"] == B - 3


def test_fat_early_stop_matches_definition(setup):
    """tau = 0: the first misclassified PGD iterate; tau = 1: one step later; never wrong: the K-th."""
    model, x, y, cfg = setup
    y = model(x).argmax(1)  # all correct at the start
    eps, K = 1.5, 8
    traj = [perturb_iterative(model, x, y, eps, norm="l2", steps=k, step_size=4 * eps / K) for k in range(K + 1)]
    wrong = torch.stack([model(t).argmax(1) != y for t in traj])  # (K+1, B)
    for tau in (0, 1):
        got = early_stopped_pgd(model, x, y, eps, tau=tau, norm="l2", steps=K, start_std=0.0)
        for i in range(B):
            hits = torch.nonzero(wrong[:, i]).flatten().tolist()
            k = min(hits[0] + tau, K) if hits else K
            assert torch.allclose(got[i], traj[k][i], atol=1e-6), (tau, i, k)
    assert bool(wrong[-1].any()) and not bool(wrong[-1].all())  # both cases occur


def test_fat_dynamic_tau_schedule():
    from nnunet_ima.classify.methods.fat import dynamic_tau

    assert [dynamic_tau(e, 120) for e in (0, 49, 50, 89, 90, 119)] == [0, 0, 1, 1, 2, 2]


def naive_ima(model, x, y, eps, K, N):
    """Algorithm 1 + 2 written plainly: every sample attacked for all K steps, an extra forward per
    iterate, the search on the whole batch. Returns (loss, noisy_correct, distance, correct)."""
    norm = get_norm("l2")
    shape = (-1,) + (1,) * (x.dim() - 1)
    correct = model(x).argmax(1) == y
    cur, lo, hi = x.clone(), x.clone(), x.clone()
    crossed = model(x).argmax(1) != y
    for _ in range(K):
        cur.requires_grad_(True)
        (g,) = torch.autograd.grad(ce(model(cur), y).sum(), cur)
        with torch.no_grad():
            nxt = x + norm.project(cur + (4 * eps / K).view(shape) * norm.direction(g) - x, eps)
            new = (model(nxt).argmax(1) != y) & ~crossed
        lo[new], hi[new] = cur.detach()[new], nxt[new]
        crossed |= new
        cur = nxt.detach()
    with torch.no_grad():
        for _ in range(N):
            mid = (lo + hi) / 2
            ok = (model(mid).argmax(1) == y).view(shape)
            lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    x_n = torch.where(correct.view(shape), torch.where(crossed.view(shape), (lo + hi) / 2, cur), x)
    l0, l1 = ce(model(x), y), ce(model(x_n), y)
    loss = ((l0 + torch.where(correct, l1, l0)) / 2).mean()
    return loss, (model(x_n).argmax(1) == y) & correct, norm.measure(x_n - x), correct


def test_ima_step_equals_naive_implementation():
    """The efficient step (active set, reused forwards, search on crossed samples only) computes the
    same loss and margins as the plain version, in float64 over several steps of training."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).double()
    x = torch.randn(64, 2, dtype=torch.float64)
    y = (x[:, 0] * x[:, 1] > 0).long()
    cfg = MethodConfig(eps=1.0, norm="l2", steps=10, search_steps=8, delta=0.2)
    m = build_method("ima", cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    from nnunet_ima import MarginStore

    ref = MarginStore(cfg.delta, cfg.eps)
    for _ in range(6):
        ids = list(range(64))
        out = m.loss(model, x, y, ids)
        loss, noisy_ok, dist, correct = naive_ima(model, x, y, ref.get(ids).double(), cfg.steps, cfg.search_steps)
        ref.update(ids, correct, noisy_ok, dist)
        assert torch.allclose(out.loss, loss, rtol=1e-10, atol=1e-12)
        assert torch.allclose(m.store.margins, ref.margins, atol=1e-9)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert 0 < int((m.store.margins < 5 * cfg.delta).sum()) < 64  # some margins shrank, some grew


@pytest.mark.parametrize("bad", [{"eps": 0}, {"norm": "l1"}, {"delta": 0}, {"ima_rule": "x"}, {"ima_beta": 2},
                                 {"fat_tau": -1}])
def test_method_config_is_validated(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        MethodConfig(**bad)
    with pytest.raises(ValueError, match="delta"):
        build_method("ima", MethodConfig(eps=0.3, delta=0.5))  # IMA needs delta <= eps_max


def test_ima_decides_in_one_mode_with_batchnorm(monkeypatch):
    """A BatchNorm MLP whose train-mode (batch statistics) and eval-mode (running statistics) predictions
    disagree on some samples. Every decision of the step (clean check, BPGD, noisy check) is the eval-mode
    one, so a sample right in train mode but wrong in eval mode is not attacked and its margin does not
    expand (before: it "crossed" at once with x~ = x and the train-mode noisy check expanded it: 16 such
    samples of 64 here, 15 of them expanded). The training forwards stay in train mode."""
    from nnunet_ima.classify.methods import ima as ima_mod

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.BatchNorm1d(32, momentum=0.0), torch.nn.ReLU(),
                                torch.nn.Linear(32, 2))  # momentum 0: running statistics fixed through the step
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) * 2 + 1
    with torch.no_grad():
        y = model.train()(x).argmax(1)                   # every sample right in train mode ...
        eval_ok = model.eval()(x).argmax(1) == y         # ... some wrong in eval mode
    model.train()
    assert 0 < int((~eval_ok).sum()) < 64
    seen = {}
    real_step = ima_mod.ima_step

    def spy(*a, **k):
        noisy, update = real_step(*a, **k)
        seen["update"] = update
        return noisy, update

    monkeypatch.setattr(ima_mod, "ima_step", spy)
    m = build_method("ima", MethodConfig(eps=1.0, delta=0.1, steps=5, search_steps=5))
    ids = list(range(64))
    before = m.store.get(ids).clone()
    out = m.loss(model, x, y, ids)
    expanded = m.store.get(ids) > before + 1e-9
    update = seen["update"]
    assert torch.equal(update.clean_correct, eval_ok)               # the clean check is the eval-mode one
    attacked = torch.zeros(64, dtype=torch.bool)
    attacked[update.rows.cpu()] = True
    assert torch.equal(attacked, eval_ok)                           # BPGD attacks exactly those
    with torch.no_grad():
        noisy_ok = model.eval()(out.x_adv).argmax(1) == y
    model.train()
    assert torch.equal(expanded, attacked & noisy_ok)               # the noisy check is the eval-mode one
    assert not bool((expanded & ~attacked).any()) and bool(expanded.any())
    assert model.training and torch.allclose(out.logits, model(x))  # the training forward: train mode
    with torch.no_grad():
        assert not torch.allclose(out.logits, model.eval()(x))
