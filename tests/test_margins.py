"""MarginStore: Algorithm 1's update rules by hand, options, keys, state round-trip, gloo merge."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_ima import MarginStore


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


T, F_ = True, False


def values(store, ids):
    return store.get(ids).double().tolist()


def test_new_ids_start_at_delta():
    store = MarginStore(delta=0.5, eps_max=3.0)
    assert store.get([0, 1, "a"]).tolist() == [0.5, 0.5, 0.5]
    assert store.get([0]).dtype == torch.float32
    assert len(store) == 3 and "a" in store and 2 not in store


def test_algorithm_1_rules_by_hand():
    """expand: E + delta; shrink: (||x - x~|| + E) / 2; clean wrong: x~ = x, so E / 2."""
    store = MarginStore(delta=0.5, eps_max=3.0)
    ids = [0, 1, 2, 3]
    out = store.update(ids, clean_correct=[T, T, F_, T], noisy_correct=[T, F_, F_, T], distance=[9.0, 0.3, 7.0, 0.1])
    expected = [1.0, (0.3 + 0.5) / 2, 0.5 / 2, 1.0]
    assert values(store, ids) == pytest.approx(expected, abs=1e-7)
    assert out.tolist() == pytest.approx(expected, abs=1e-7)
    # second round starts from the new values
    store.update(ids, [T, T, T, T], [F_, T, T, F_], [0.2, 0, 0, 0.6])
    assert values(store, ids) == pytest.approx([(0.2 + 1.0) / 2, 0.4 + 0.5, 0.25 + 0.5, (0.6 + 1.0) / 2], abs=1e-7)
    assert store.counters == {"updates": 8, "expanded": 4, "shrunk": 4, "clean_wrong": 1, "invalid": 0}


def test_clip_to_eps_max_and_zero():
    store = MarginStore(delta=1.0, eps_max=2.5)
    for _ in range(5):
        store.update([7], [T], [T], [0.0])
    assert values(store, [7]) == [2.5]
    store.update([7], [T], [F_], [-10.0])  # nonsense negative distance: still clipped at 0
    assert values(store, [7]) == [0.0]


def test_earlier_paper_options_reinit_replace_clip_delta():
    store = MarginStore(delta=0.5, eps_max=3.0, on_clean_wrong="reinit", shrink="replace", clip_min="delta")
    store.update([0, 1, 2], [T, T, T], [T, T, T], [0, 0, 0])  # all at 1.0
    store.update([0, 1, 2], [F_, T, T], [F_, F_, F_], [0.9, 0.7, 0.2])
    # 0: clean wrong -> delta; 1: replaced by 0.7; 2: replaced by 0.2, clipped up to delta
    assert values(store, [0, 1, 2]) == pytest.approx([0.5, 0.7, 0.5], abs=1e-7)
    avg = MarginStore(delta=0.5, eps_max=3.0, on_clean_wrong="reinit")
    avg.update([0, 1], [T, T], [T, T], [0, 0])
    avg.update([0, 1], [F_, T], [T, F_], [0.0, 0.2])
    assert values(avg, [0, 1]) == pytest.approx([0.5, 0.6], abs=1e-7)


def test_duplicates_last_occurrence_wins():
    store = MarginStore(delta=0.5, eps_max=3.0)
    store.update([5, 6, 5], [T, T, T], [T, T, F_], [0.0, 0.0, 0.1])
    assert values(store, [5, 6]) == pytest.approx([(0.1 + 0.5) / 2, 1.0], abs=1e-7)
    store.update([6, 6], [T, T], [F_, T], [0.2, 0.0])
    assert values(store, [6]) == pytest.approx([1.5], abs=1e-7)


def test_invalid_and_nonfinite_untouched():
    store = MarginStore(delta=0.5, eps_max=3.0)
    store.update([0, 1, 2, 3], [T] * 4, [T] * 4, [0.0] * 4)  # all 1.0
    store.update([0, 1, 2, 3], [T] * 4, [F_] * 4, [0.2, float("nan"), float("inf"), 0.4],
                 valid=torch.tensor([F_, T, T, T]))
    assert values(store, [0, 1, 2, 3]) == pytest.approx([1.0, 1.0, 1.0, 0.7], abs=1e-7)
    assert torch.isfinite(store.margins).all()
    assert store.counters["invalid"] == 3


@pytest.mark.parametrize("ids", [
    [17, "17", "case_017/slice_42"],
    torch.tensor([3, 4, 5]),
    np.array([3, 4, 5], dtype=np.int64),
])
def test_int_and_str_keys(ids):
    store = MarginStore(delta=0.5, eps_max=3.0)
    store.update(ids, [T, T, T], [T, F_, T], [0, 0.1, 0])
    assert values(store, ids) == pytest.approx([1.0, 0.3, 1.0], abs=1e-7)
    assert len(store) == 3
    assert all(isinstance(k, (int, str)) and not isinstance(k, bool) for k in store.keys())


def test_int_and_str_of_same_number_are_different_keys():
    store = MarginStore(delta=0.5, eps_max=3.0)
    store.update([17], [T], [T], [0])
    assert values(store, [17, "17"]) == [1.0, 0.5]


@pytest.mark.parametrize("bad", [[1.5], [True], [None]])
def test_bad_ids(bad):
    with pytest.raises(TypeError, match="ids"):
        MarginStore(delta=0.5, eps_max=3.0).get(bad)


def test_single_id_rejected():
    with pytest.raises(TypeError, match="ids"):
        MarginStore(delta=0.5, eps_max=3.0).get("case_1")


@pytest.mark.parametrize("field, kwargs", [
    ("distance", dict(distance=[0.1, 0.2])),
    ("clean_correct", dict(clean_correct=[T, T])),
    ("noisy_correct", dict(noisy_correct=[T])),
    ("valid", dict(valid=[T, T])),
])
def test_update_length_mismatch_names_argument(field, kwargs):
    args = dict(clean_correct=[T, T, T], noisy_correct=[T, T, T], distance=[0, 0, 0])
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        MarginStore(delta=0.5, eps_max=3.0).update([0, 1, 2], **args)


@pytest.mark.parametrize("kwargs, name", [
    (dict(delta=0.0, eps_max=1.0), "delta"),
    (dict(delta=2.0, eps_max=1.0), "delta"),
    (dict(delta=0.5, eps_max=-1.0), "eps_max"),
    (dict(delta=0.5, eps_max=1.0, shrink="min"), "shrink"),
    (dict(delta=0.5, eps_max=1.0, on_clean_wrong="x"), "on_clean_wrong"),
    (dict(delta=0.5, eps_max=1.0, clip_min="one"), "clip_min"),
])
def test_bad_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MarginStore(**kwargs)


def populated():
    store = MarginStore(delta=0.25, eps_max=2.0, on_clean_wrong="reinit", shrink="replace", clip_min="delta")
    g = torch.Generator().manual_seed(0)
    ids = [0, 1, 2, "case_003/slice_07", "case_003/slice_08", 10**12]
    for _ in range(6):
        store.update(ids, torch.rand(6, generator=g) > 0.2, torch.rand(6, generator=g) > 0.5,
                     torch.rand(6, generator=g, dtype=torch.float64) * 2)
    return store, ids


def test_state_dict_round_trip_exact(tmp_path):
    store, ids = populated()
    path = tmp_path / "margins.pt"
    torch.save(store.state_dict(), path)
    state = torch.load(path, weights_only=True)
    restored = MarginStore.from_state_dict(state)
    assert restored.keys() == store.keys()
    assert [type(k) for k in restored.keys()] == [type(k) for k in store.keys()]
    assert torch.equal(restored.margins, store.margins) and restored.margins.dtype == torch.float64
    for attr in ("delta", "eps_max", "on_clean_wrong", "shrink", "clip_min"):
        assert getattr(restored, attr) == getattr(store, attr)
    # same future: identical updates give identical stores
    for s in (store, restored):
        s.update(ids, [T, F_, T, T, F_, T], [T, T, F_, T, T, F_], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert torch.equal(restored.margins, store.margins)
    # loading into an existing store replaces its contents
    other = MarginStore(delta=1.0, eps_max=5.0)
    other.get(["junk"])
    other.load_state_dict(state)
    assert "junk" not in other and other.delta == 0.25


def test_summary_and_histogram():
    store = MarginStore(delta=0.5, eps_max=2.0)
    store.update([0, 1, 2, 3], [T, T, T, F_], [T, T, F_, F_], [0, 0, 0.3, 0])
    store.update([0], [T], [T], [0])
    for _ in range(3):
        store.update([1], [T], [T], [0])
    s = store.summary()  # margins 1.5, 2.0 (clipped), 0.4, 0.25
    assert s["count"] == 4 and s["max"] == 2.0 and s["min"] == 0.25
    assert s["mean"] == pytest.approx((1.5 + 2.0 + 0.4 + 0.25) / 4)
    assert s["frac_at_eps_max"] == 0.25
    assert s["updates"] == 8 and s["frac_shrunk"] == pytest.approx(2 / 8)
    counts, edges = store.histogram(bins=4)
    assert counts.tolist() == [2, 0, 0, 2] and edges[0] == 0 and edges[-1] == 2.0
    assert "median" in store.format_summary()
    store.reset_counters()
    assert store.summary()["updates"] == 0


def test_merge_is_noop_without_distributed():
    store, _ = populated()
    before = store.margins
    store.merge()
    assert torch.equal(store.margins, before)


# ---------------------------------------------------------------- two-process gloo merge
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merge_worker(rank, world, port, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        store = MarginStore(delta=0.5, eps_max=3.0)
        if rank == 0:
            store.get([0, 1, 2, "a"])
            store.update([0, 1, 2], [T, T, T], [T, F_, T], [0.0, 0.2, 0.0])   # 1.0, 0.35, 1.0
        else:
            store.get(["b"])
            store.update([2, 3], [T, T], [F_, T], [0.1, 0.0])                 # 0.3, 1.0
        store.merge()
        first = dict(zip(store.keys(), store.margins.tolist()))
        # round 2: only rank 0 touches id 3; rank 1's stale copy must follow it
        if rank == 0:
            store.update([3], [T], [T], [0.0])                                  # 1.5
        store.merge()
        second = dict(zip(store.keys(), store.margins.tolist()))
        state = store.state_dict()
        torch.save({"first": first, "second": second, "keys": state["keys"], "raw": state["margins"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_merge_two_process_gloo(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    mp.spawn(_merge_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # documented rule: updated on several ranks -> mean; on one -> that value; new ids everywhere
    expected = {0: 1.0, 1: 0.35, 2: (1.0 + 0.3) / 2, 3: 1.0, "a": 0.5, "b": 0.5}
    for r in (r0, r1):
        assert set(r["first"]) == set(expected)
        assert r["first"] == pytest.approx(expected)
    assert r0["first"] == r1["first"]
    expected[3] = 1.5
    assert r0["second"] == r1["second"] == pytest.approx(expected)
    # one key order on both ranks: the raw arrays (and so the checkpoints) are identical too
    assert r0["keys"] == r1["keys"]
    assert torch.equal(r0["raw"], r1["raw"])

