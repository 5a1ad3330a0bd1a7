"""Cost of one IMA training step relative to one clean (STD) step, measured side by side.

Setting of issue 5: Fashion-MNIST, the papers' CNN, batch 128, L2, K = 20 PGD steps, N = 10
binary-search steps, eps_max = 3.0. Three step implementations run interleaved on the same batches
(round-robin, so machine load hits all three alike), each on its own copy of the same weights:

* ``std``   - forward, backward, optimiser step;
* ``ima``   - nnunet_ima.classify's IMA step (kernel BPGD: only correctly classified samples are
  attacked, a sample leaves the active set once it crosses, the correctness check reuses the
  forward of the next gradient step, the search runs under no_grad on crossed samples only, the
  clean forward of the loss is the one that decided correctness);
* ``naive`` - the straightforward version: every sample is attacked for all K steps, an extra
  forward checks each iterate, the binary search runs on the whole batch with autograd on, and the
  clean batch is forwarded again for the loss.

Cost depends on how many samples cross early, i.e. on the margins, so two states are measured:
``start`` (every margin at Delta = eps_max / 60: nothing crosses, the worst case for IMA) and
``steady`` (each margin set to the sample's boundary distance found by BPGD at eps_max: IMA's
equilibrium, where margins sit at the decision boundary). Both start from the same STD-pretrained
weights (IMA is meant to start from a pretrained model). After the timed steps the margins of
``ima`` and ``naive`` are compared (same algorithm, so they must agree up to float round-off).

    .venv/bin/python benchmarks/bench_classify.py            # ~5 minutes on this 2-core CPU
    .venv/bin/python benchmarks/bench_classify.py --rounds 3 --pretrain-steps 50   # quicker
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from nnunet_ima import MarginStore, bpgd, get_norm, ima_loss
from nnunet_ima.classify.datasets import load_dataset
from nnunet_ima.classify.methods import MethodConfig, build_method
from nnunet_ima.classify.models import build_model

EPS_MAX, K, N, BATCH = 3.0, 20, 10, 128
DELTA = EPS_MAX / 60  # earlier paper's rule Delta = eps_max / epochs, 60 epochs


def std_step(model, opt, x, y, ids, _store):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def make_ima_step(store):
    method = build_method("ima", MethodConfig(eps=EPS_MAX, norm="l2", steps=K, search_steps=N, delta=DELTA))
    method.store = store

    def step(model, opt, x, y, ids, _store):
        out = method.loss(model, x, y, ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return out.info["attacked"]
    return step


def naive_ima_step(model, opt, x, y, ids, store):
    """Same algorithm (Algorithm 1 + 2), written without regard to cost."""
    norm = get_norm("l2")
    b = x.shape[0]
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    eps = store.get(ids)
    alpha = 4 * eps / K
    cur = x.clone()
    lo, hi = x.clone(), x.clone()
    crossed = torch.zeros(b, dtype=torch.bool)
    with torch.no_grad():
        crossed |= model(cur).argmax(1) != y  # iterate 0 (the clean sample itself) already wrong
    for _ in range(K):  # every sample, all K steps
        cur.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(cur), y, reduction="sum"), cur)
        with torch.no_grad():
            nxt = x + norm.project(cur + alpha.view(-1, 1, 1, 1) * norm.direction(g) - x, eps)
            wrong = model(nxt).argmax(1) != y  # an extra forward per step
        new = wrong & ~crossed
        lo[new], hi[new] = cur.detach()[new], nxt[new]
        crossed |= new
        cur = nxt.detach()
    for _ in range(N):  # search on the whole batch, autograd on
        mid = (lo + hi) / 2
        ok = (model(mid).argmax(1) == y).view(-1, 1, 1, 1)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    x_noisy = torch.where(crossed.view(-1, 1, 1, 1), (lo + hi) / 2, cur)
    x_noisy = torch.where(correct.view(-1, 1, 1, 1), x_noisy, x)
    z, zn = model(x), model(x_noisy)  # clean forward again
    l0, l1 = F.cross_entropy(z, y, reduction="none"), F.cross_entropy(zn, y, reduction="none")
    loss = ima_loss(l0, torch.where(correct, l1, l0), correct)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    noisy_ok = (zn.detach().argmax(1) == y) & correct
    store.update(ids, correct, noisy_ok, norm.measure(x_noisy - x))
    return b


def store_with(margins: dict) -> MarginStore:
    """A MarginStore holding exactly these {id: margin} values (through its public state dict)."""
    store = MarginStore(DELTA, EPS_MAX)
    state = store.state_dict()
    keys = list(margins)
    state.update(keys=[str(k) for k in keys], key_is_int=torch.ones(len(keys), dtype=torch.bool),
                 margins=torch.tensor([margins[k] for k in keys], dtype=torch.float64),
                 dirty=torch.zeros(len(keys), dtype=torch.bool))
    store.load_state_dict(state)
    return store


def timed(fn, *args):
    """(wall seconds, CPU seconds of this process, result). With one thread the CPU time is the
    step's own compute time, much less disturbed by other processes than the wall time."""
    w0, c0 = time.perf_counter(), time.process_time()
    r = fn(*args)
    return time.perf_counter() - w0, time.process_time() - c0, r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="Fashion-MNIST idx folder (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--rounds", type=int, default=3, help="timed steps per implementation and state")
    p.add_argument("--pretrain-steps", type=int, default=60, help="STD steps before measuring")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least disturbed by other load)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    splits = load_dataset("fashion", a.data_root)
    xs, ys = splits.train.tensors()
    n_pre = a.pretrain_steps * BATCH
    model = build_model("fashion_cnn", 10, (1, 28, 28))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for s in range(a.pretrain_steps):
        sl = slice((s * BATCH) % len(ys), (s * BATCH) % len(ys) + BATCH)
        std_step(model, opt, xs[sl], ys[sl], None, None)
    print(f"Fashion-MNIST, fashion_cnn, batch {BATCH}, L2, K={K}, N={N}, eps_max={EPS_MAX}, threads={a.threads}; "
          f"STD pretraining {a.pretrain_steps} steps ({time.perf_counter() - t0:.0f}s)")
    batches = [(xs[n_pre + r * BATCH: n_pre + (r + 1) * BATCH], ys[n_pre + r * BATCH: n_pre + (r + 1) * BATCH],
                list(range(n_pre + r * BATCH, n_pre + (r + 1) * BATCH))) for r in range(a.rounds + 1)]
    with torch.no_grad():
        acc = float(torch.cat([model(x).argmax(1) == y for x, y, _ in batches]).float().mean())
    print(f"accuracy of the pretrained model on the measured batches: {acc:.3f}")

    rows = []
    for state in ("start", "steady"):
        store = MarginStore(DELTA, EPS_MAX)
        if state == "steady":
            margins = {}
            for x, y, ids in batches:
                res = bpgd(model, x, y, EPS_MAX, norm="l2", steps=K, search_steps=N, variant="augment")
                margins.update(zip(ids, torch.where(res.crossed, res.distance, torch.tensor(EPS_MAX)).tolist()))
            store = store_with(margins)
        stores = {"ima": copy.deepcopy(store), "naive": copy.deepcopy(store), "std": None}
        copies = {}
        for name in ("std", "ima", "naive"):
            m = copy.deepcopy(model).train()
            o = torch.optim.Adam(m.parameters(), lr=1e-3)
            o.load_state_dict(opt.state_dict())
            copies[name] = (m, o)
        fns = {"std": std_step, "ima": make_ima_step(stores["ima"]), "naive": naive_ima_step}
        wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
        first_ids = batches[0][2]
        for r, (x, y, ids) in enumerate(batches):
            for name, fn in fns.items():
                m, o = copies[name]
                for _ in range(3 if name == "std" else 1):  # STD is cheap and noisy: three samples a round
                    w, c, _ = timed(fn, m, o, x, y, ids, stores[name])
                    if r > 0:  # round 0 warms up
                        wall[name].append(w)
                        cpu[name].append(c)
            if r == 0:  # one step from identical weights: the two IMA implementations must agree
                d0 = (stores["ima"].get(first_ids) - stores["naive"].get(first_ids)).abs()
        med = {k: statistics.median(v) for k, v in wall.items()}
        medc = {k: statistics.median(v) for k, v in cpu.items()}
        s = stores["ima"].summary()
        rows.append((state, med, medc))
        before = store.summary().get("mean", DELTA)
        print(f"\n[{state}] margins before: mean {before:.3f} | after {a.rounds + 1} IMA steps: "
              f"shrunk {100 * s['frac_shrunk']:.0f}% (crossed or clean wrong)")
        for label, md in (("wall", med), ("CPU ", medc)):
            print(f"  {label} seconds per step (median): STD {md['std']:.3f}  IMA {md['ima']:.3f}  naive "
                  f"{md['naive']:.3f}  | IMA/STD {md['ima'] / md['std']:.1f}x  naive/STD "
                  f"{md['naive'] / md['std']:.1f}x  naive/IMA {md['naive'] / md['ima']:.2f}x")
        print(f"  same margins? after one step from identical weights: {100 * float((d0 < 1e-4).float().mean()):.1f}% "
              f"of the batch within 1e-4 (max |diff| {float(d0.max()):.2e}; a difference means a sample sat so close "
              f"to the boundary that float round-off flipped its crossing)")
    print("\nsummary (target: IMA <= 12x STD)")
    for state, med, medc in rows:
        print(f"  {state:6s}: STD {med['std']:.3f}s  IMA {med['ima']:.3f}s  naive {med['naive']:.3f}s wall -> "
              f"IMA {med['ima'] / med['std']:.1f}x, naive {med['naive'] / med['std']:.1f}x; CPU time -> IMA "
              f"{medc['ima'] / medc['std']:.1f}x, naive {medc['naive'] / medc['std']:.1f}x")


if __name__ == "__main__":
    main()
