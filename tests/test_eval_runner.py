"""The evaluation machinery on tiny synthetic models: padding and 3d tiles, the per-sample attack loss
against nnU-Net's DC_and_CE_loss, batched == one sample at a time, sanity checks, table, skip store."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nnunet_ima_eval import metrics as M
from nnunet_ima_eval.data import Case, make_batches, sample_refs
from nnunet_ima_eval.model import PerSampleLoss
from nnunet_ima_eval.report import ResultStore, make_rows, table
from nnunet_ima_eval.runner import AttackSettings, Evaluator, monotonicity_checks


@pytest.mark.parametrize("kind", ["dicece", "ce"])
@pytest.mark.parametrize("ignore_label", [None, 3])
def test_per_sample_loss_is_nnunets_dc_and_ce_per_sample(kind, ignore_label):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3 if ignore_label is None else 4, (4, 1, 16, 16), generator=g)
    y[1] = 0                                                  # a blank sample
    mask = torch.ones(4, 1, 16, 16, dtype=torch.float64)
    mask[2, :, 12:] = 0                                       # padded samples
    mask[3, :, :, 9:] = 0
    y = y * mask.long()                                       # padding is labelled 0, as make_batches does
    loss = PerSampleLoss(kind, batch_dice=True, ignore_label=ignore_label)
    loss.mask = mask
    torch.testing.assert_close(loss(logits, y), loss.reference(logits, y))


# --------------------------------------------------------------------------------- samples and batches
def test_2d_padding_to_pool_factor_and_3d_tiles():
    rng = np.random.default_rng(0)
    cases = [Case("a", rng.normal(size=(1, 3, 30, 29)).astype(np.float32), rng.integers(0, 3, (3, 30, 29)).astype(np.int16)),
             Case("b", rng.normal(size=(1, 2, 32, 32)).astype(np.float32), np.zeros((2, 32, 32), np.int16))]
    refs = sample_refs(cases, 2, (32, 32))
    assert len(refs) == 5
    batches = make_batches(cases, refs, 2, (8, 8), (32, 32), 4)
    # both cases pad to 32 x 32 (pooling factor 8), so they share batches: [a0 a1 a2 b0] [b1]
    assert [tuple(b.x.shape) for b in batches] == [(4, 1, 32, 32), (1, 1, 32, 32)]
    b = batches[0]
    assert b.valid.tolist() == [[30, 29]] * 3 + [[32, 32]]
    assert bool(b.pad[:3, 30:].all()) and bool(b.pad[:3, :, 29:].all()) and not bool(b.pad[3].any())
    assert not bool(b.pad[:3, :30, :29].any()) and float(b.x[:3, :, 30:].abs().sum()) == 0
    np.testing.assert_array_equal(b.x[1, 0, :30, :29].numpy(), cases[0].image[0, 1])
    # 3d: non-overlapping patch tiles covering the volume exactly once
    vol = Case("v", rng.normal(size=(1, 5, 20, 12)).astype(np.float32), rng.integers(0, 2, (5, 20, 12)).astype(np.int16))
    refs3 = sample_refs([vol], 3, (4, 8, 8))
    cover = np.zeros((5, 20, 12), int)
    for r in refs3:
        cover[tuple(slice(a, a + s) for a, s in zip(r.start, r.size))] += 1
    assert (cover == 1).all() and len(refs3) == 2 * 3 * 2
    b3 = make_batches([vol], refs3, 3, (2, 4, 4), (4, 8, 8), 5)
    assert all(tuple(b.x.shape[2:]) == (4, 8, 8) for b in b3)
    assert sum(int((~b.pad).sum()) for b in b3) == 5 * 20 * 12


class TinyNet(torch.nn.Module):
    """Fully convolutional, instance-normalised (each sample independent, like nnU-Net's networks)."""

    def __init__(self, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.InstanceNorm2d(8, affine=True),
                                        torch.nn.LeakyReLU(), torch.nn.Conv2d(8, classes, 3, padding=1))

    def forward(self, x):
        return self.body(x)


def stub_model(net, patch=(32, 32), pool=(8, 8)):
    return SimpleNamespace(label="tiny", network=net.eval(), patch_size=patch, pool_factor=pool, num_classes=3,
                           device=torch.device("cpu"), label_manager=SimpleNamespace(ignore_label=None),
                           configuration_manager=SimpleNamespace(batch_dice=True))


@pytest.mark.parametrize("loss", ["dicece", "ce"])
def test_batched_equals_one_at_a_time_and_padding_is_inert(loss):
    rng = np.random.default_rng(2)
    lab = np.zeros((4, 27, 30), np.int16)
    lab[:, 5:20, 6:22] = 1
    lab[:, 9:14, 10:16] = 2
    img = (lab * 1.5 + rng.normal(scale=0.5, size=lab.shape)).astype(np.float32)[None]
    cases = [Case("c", img, lab)]
    model = stub_model(TinyNet())
    one = Evaluator(model, cases, AttackSettings(loss=loss, batch_size=1, ifgsm_steps=3), progress=False)
    many = Evaluator(model, cases, AttackSettings(loss=loss, batch_size=4, ifgsm_steps=3), progress=False)
    assert len(one.batches) == 4 and len(many.batches) == 1
    clean = many.run("clean", 0.0)
    assert clean.counts.tp.sum() + clean.counts.fp.sum() + clean.counts.fn.sum() > 0
    # padded pixels are excluded from the counts: totals are over 27 x 30 real pixels per slice
    tot = clean.counts.tp + clean.counts.fp + clean.counts.fn
    assert (tot <= 27 * 30).all()
    a1, a4 = one.run("ifgsm", 3.0), many.run("ifgsm", 3.0)
    np.testing.assert_array_equal(a1.counts.tp, a4.counts.tp)
    np.testing.assert_array_equal(a1.counts.fp, a4.counts.fp)
    assert M.adi(a4.counts)["mean"] < M.adi(clean.counts)["mean"]
    # eps 0 through the attack path reproduces the clean prediction exactly
    assert many.check_eps0("pgd", clean)["status"] == "ok"
    # the perturbation never touches padding (the attacked function zeroes it: no gradient there)
    ev = many.run("ifgsm", 3.0, keep=set(many.refs))
    for ex in ev.examples:
        assert ex.adversarial.shape == (1, 27, 30)


def test_monotonicity_check_and_table_layout(tmp_path):
    base = dict(model="STD", dataset="D", configuration="2d", plans="p", fold="0", checkpoint="c", source="fold",
                max_samples=None, norm="l2", loss="dicece")
    rows = []
    for attack, eps, v in [("clean", 0.0, 0.8), ("pgd", 2.0, 0.5), ("pgd", 6.0, 0.6), ("ifgsm", 2.0, 0.7)]:
        summary = {"adi": {1: v, "mean": v}, "tvdi": {1: v, "mean": v}, "dice3d": {1: v, "mean": v},
                   "n_samples": 4, "n_empty": {1: 0, "mean": 0}}
        rows += make_rows({**base, "attack": attack, "eps": eps, "steps": 1}, summary, {1: "fg"}, 0.1)
    checks = {c["check"]: c for c in monotonicity_checks(rows)}
    assert checks["non_increasing[pgd]"]["status"] == "warning" and "eps=6" in checks["non_increasing[pgd]"]["message"]
    assert checks["non_increasing[ifgsm]"]["status"] == "ok"
    t = table(rows, "adi").splitlines()
    assert t[1].split() == ["Methods", "S.", "Dice", "P.", "2", "P.", "6", "IF.", "2"]
    assert t[2].split() == ["STD", "80.00", "50.00", "60.00", "70.00"]
    # the store: a run is reused only with the same settings AND the same inputs; nothing created before a result
    out = tmp_path / "out"
    inputs = {"checkpoint": "c1", "images": "i1", "labels": "l1", "code": "2"}
    key = {**base, "attack": "pgd", "eps": 2.0, "steps": 1, "seed": 0, "batch_size": 4}
    c = M.Counts(np.array([[1], [2]]), np.array([[0], [1]]), np.array([[1], [0]]), ["a", "b"])
    store = ResultStore(out)
    assert not out.exists()
    store.put(key, inputs, c, 0.1, {1: "fg"}, {})
    again = ResultStore(out)
    got, why = again.lookup(key, inputs)
    assert why == "reused" and got.tp.tolist() == [[1], [2]] and got.cases == ["a", "b"]
    assert again.lookup({**key, "steps": 100}, inputs) == (None, "new")
    assert again.lookup(key, {**inputs, "checkpoint": "c2"}) == (None, "the checkpoint changed")
    assert again.lookup(key, {**inputs, "labels": "l2"}) == (None, "the labels changed")
    assert ResultStore(out, overwrite=True).lookup(key, inputs) == (None, "new")
    again.rows = rows
    again.save()
    assert (out / "results.csv").read_text().splitlines()[0].startswith("model,attack,eps,class")


class TinyNet3d(torch.nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4, affine=True),
                                        torch.nn.LeakyReLU(), torch.nn.Conv3d(4, classes, 1))

    def forward(self, x):
        return self.body(x)


def test_3d_tiles_per_case_dice_is_the_stitched_volume_dice():
    rng = np.random.default_rng(3)
    lab = np.zeros((6, 20, 18), np.int16)
    lab[1:5, 4:15, 3:14] = 1
    lab[2:4, 7:11, 6:10] = 2
    img = (lab + rng.normal(scale=0.7, size=lab.shape)).astype(np.float32)[None]
    model = stub_model(TinyNet3d(), patch=(4, 8, 8), pool=(2, 4, 4))
    ev = Evaluator(model, [Case("v", img, lab)], AttackSettings(batch_size=5, ifgsm_steps=2, steps_other=2, apgd_steps=2),
                   progress=False)
    assert len(ev.refs) == 2 * 3 * 3
    # the kernel's segmentation attacks run on 3d patch tiles through the same path (issue 14)
    for attack, eps in (("clean", 0.0), ("ifgsm", 2.0), ("segpgd", 2.0), ("apgd-js", 2.0)):
        run = ev.run(attack, eps, keep=set(ev.refs))
        volume = np.full(lab.shape, -1)
        for ex in run.examples:
            volume[tuple(slice(a, a + s) for a, s in zip(ex.ref.start, ex.ref.size))] = ex.pred
        assert (volume >= 0).all()  # every voxel predicted exactly once
        dice = [2 * ((volume == k) & (lab == k)).sum() / ((volume == k).sum() + (lab == k).sum()) for k in (1, 2)]
        assert M.dice3d(run.counts)[1]["v"] == pytest.approx(np.mean(dice))


class MaskedGradientNet(torch.nn.Module):
    """Segments by rounding the input, with no gradient through the rounding: a white-box attack sees
    a zero gradient (the textbook case of gradient masking) although noise breaks the model easily."""

    def forward(self, x):
        xq = x * 0 + x.detach().round()
        return torch.cat([torch.zeros_like(xq), 20 * (xq - 0.5)], 1)


def test_strength_checks_flag_gradient_masking():
    lab = np.zeros((2, 16, 16), np.int16)
    lab[:, 4:12, 4:12] = 1
    cases = [Case("c", lab.astype(np.float32)[None], lab)]
    model = SimpleNamespace(**{**vars(stub_model(MaskedGradientNet(), patch=(16, 16), pool=(4, 4))), "num_classes": 2})
    ev = Evaluator(model, cases, AttackSettings(ifgsm_steps=5, batch_size=2), progress=False)
    eps = 24.0  # per-pixel RMS 1.5: random noise flips most roundings
    clean, white = ev.run("clean", 0.0), ev.run("ifgsm", eps)
    assert M.adi(clean.counts)["mean"] == 1.0 and M.adi(white.counts)["mean"] == 1.0  # the attack sees nothing
    noise = ev.check_noise(eps, white.counts)
    blind = ev.check_gradient_free(eps, white.counts, queries=20)
    assert noise["status"] == "warning" and "gradient is masked" in noise["message"]
    assert blind["status"] == "warning" and "gradient masking" in blind["message"]
    more = ev.check_more_steps("ifgsm", eps, white.counts)
    assert more["status"] == "ok" and "with 25" in more["message"]
