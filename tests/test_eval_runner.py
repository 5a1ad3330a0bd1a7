"""The evaluation machinery on tiny synthetic models: padding and 3d tiles, the per-sample attack loss
against nnU-Net's DC_and_CE_loss, batched == one sample at a time, sanity checks, table, skip store."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nnunet_ima.losses import scored_labels, valid_pixels
from nnunet_ima_eval import metrics as M
from nnunet_ima_eval.data import Case, make_batches, sample_refs
from nnunet_ima_eval.model import PerSampleLoss
from nnunet_ima_eval.report import ResultStore, make_rows, table
from nnunet_ima_eval.runner import AttackSettings, Evaluator
from nnunet_ima_eval.sanity import check_eps0, check_gradient_free, check_more_steps, check_noise, monotonicity_checks

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def reference_loss(self: PerSampleLoss, output, y, pad: torch.Tensor | None = None):
    """PerSampleLoss by its literal definition: nnU-Net's DC_and_CE_loss on each sample's real region
    (``pad`` (B, *S) True on padding, cut away), one sample at a time, with the raw labels (``ignore_label``
    as is)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": self.batch_dice, "smooth": self.smooth, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=self.ignore_label,
                          dice_class=MemoryEfficientSoftDiceLoss)
    out = []
    for i in range(output.shape[0]):
        m = torch.ones_like(y[i, 0], dtype=torch.bool) if pad is None else ~pad[i]
        crop = tuple(slice(0, int(v.max()) + 1) for v in torch.nonzero(m, as_tuple=True))
        o, t = output[(slice(i, i + 1), slice(None)) + crop], y[(slice(i, i + 1), slice(None)) + crop]
        if self.kind == "ce":
            t0 = t[:, 0].long()
            keep = torch.ones_like(t0, dtype=torch.bool) if self.ignore_label is None else t0 != self.ignore_label
            ce = torch.nn.functional.cross_entropy(o, torch.where(keep, t0, 0), reduction="none")
            out.append((ce * keep).sum() / keep.sum().clamp_min(1))
        else:
            out.append(loss(o, t))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["dicece", "ce"])
@pytest.mark.parametrize("ignore_label", [None, 3])
def test_per_sample_loss_is_nnunets_dc_and_ce_per_sample(kind, ignore_label):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3 if ignore_label is None else 4, (4, 1, 16, 16), generator=g)
    y[1] = 0                                                  # a blank sample
    pad = torch.zeros(4, 16, 16, dtype=torch.bool)
    pad[2, 12:] = True                                        # padded samples
    pad[3, :, 9:] = True
    y = y * (~pad[:, None]).long()                            # padding is labelled 0, as make_batches does
    loss = PerSampleLoss(kind, batch_dice=True, ignore_label=ignore_label)
    # the evaluation's labels (padding and the ignore label NOT_SCORED) against nnU-Net's loss on the cut-out region
    scored = scored_labels(y, ignore_label=ignore_label, pad=pad)
    torch.testing.assert_close(loss(logits, scored), reference_loss(loss, logits, y, pad))


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
    assert check_eps0(many, "pgd", clean)["status"] == "ok"
    # the perturbation never touches padding (the attacked function zeroes it: no gradient there)
    ev = many.run("ifgsm", 3.0, keep=set(many.refs))
    for ex in ev.examples:
        assert ex.adversarial.shape == (1, 27, 30)


@pytest.mark.parametrize("attack", ["pgd", "apgd-mce"])
def test_random_starts_do_not_depend_on_the_batch_and_packs_are_whole_cases(attack):
    """Issue 23: each sample's random start has its own seed (seed, attack, eps, case, slice), so PGD and
    APGD give every sample the same result at batch 1 and batch 4; batches never cross a pack of whole
    cases (the atom several processes share), and packs depend on the test set and batch size alone."""
    from nnunet_ima_eval.runner import PACK_BATCHES, pack_cases, sample_seed

    rng = np.random.default_rng(4)
    cases = []
    for name, z, size in (("a", 3, 24), ("b", 3, 24), ("c", 2, 20), ("d", 2, 24)):
        lab = np.zeros((z, size, 24), np.int16)
        lab[:, 5:18, 6:20] = 1
        lab[:, 9:13, 10:15] = 2
        cases.append(Case(name, (lab * 1.5 + rng.normal(scale=0.5, size=lab.shape)).astype(np.float32)[None], lab))
    model = stub_model(TinyNet(), pool=(8, 8))
    settings = dict(pgd_steps=3, apgd_steps=3, seed=5)
    one = Evaluator(model, cases, AttackSettings(batch_size=1, **settings), progress=False)
    four = Evaluator(model, cases, AttackSettings(batch_size=4, **settings), progress=False)
    # by hand, PACK_BATCHES = 4, every case pads to 24 x 24 (c: H 20 -> 24): batch 1 closes a pack at 4
    # samples: [a b] (6), [c d] (4); batch 4 (16 samples a pack): one pack [a b c d], batches 4, 4, 2
    assert PACK_BATCHES == 4
    assert list(one.pack_cases.values()) == [["a", "b"], ["c", "d"]]
    assert list(four.pack_cases.values()) == [["a", "b", "c", "d"]] and [len(b.refs) for b in four.batches] == [4, 4, 2]
    # shapes in order of appearance, cases in order within a shape: e (H 17 -> 24) joins the 24 x 24 packs
    # after d, f (24 x 40) comes after every 24 x 24 case although it is listed before e
    odd = Case("e", cases[0].image[:, :, :17], cases[0].label[:, :17])
    wide = Case("f", np.zeros((1, 2, 24, 40), np.float32), np.zeros((2, 24, 40), np.int16))
    refs = sample_refs(cases + [wide, odd], 2, (32, 32))
    got = [[r.case for r in p] for p in pack_cases(refs, 2, (8, 8), (32, 32), 1)]
    assert got == [[0, 0, 0, 1, 1, 1], [2, 2, 3, 3], [5, 5, 5], [4, 4]]
    a1, a4 = one.run(attack, 3.0, keep=set(one.refs)), four.run(attack, 3.0, keep=set(four.refs))
    assert a1.counts.cases == a4.counts.cases
    np.testing.assert_array_equal(a1.counts.tp, a4.counts.tp)
    np.testing.assert_array_equal(a1.counts.fp, a4.counts.fp)
    np.testing.assert_array_equal(a1.counts.fn, a4.counts.fn)
    for e1, e4 in zip(a1.examples, a4.examples):
        np.testing.assert_allclose(e1.adversarial, e4.adversarial, atol=1e-5)
    # another seed gives other starts; the seed of a sample names attack, eps, case and position
    other = Evaluator(model, cases, AttackSettings(batch_size=4, **{**settings, "seed": 6}), progress=False)
    far = other.run(attack, 3.0, keep=set(other.refs))
    assert any(not np.allclose(e.adversarial, f.adversarial, atol=1e-3) for e, f in zip(a4.examples, far.examples))
    base = sample_seed(5, attack, 3.0, "a", (1, 0, 0))
    assert base == sample_seed(5, attack, 3.0, "a", (1, 0, 0))
    assert len({base, sample_seed(5, attack, 3.0, "b", (1, 0, 0)), sample_seed(5, attack, 2.0, "a", (1, 0, 0)),
                sample_seed(5, "pgd" if attack != "pgd" else "segpgd", 3.0, "a", (1, 0, 0)),
                sample_seed(5, attack, 3.0, "a", (2, 0, 0)), sample_seed(6, attack, 3.0, "a", (1, 0, 0))}) == 6


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
    ev = Evaluator(model, [Case("v", img, lab)], AttackSettings(batch_size=5, ifgsm_steps=2, segpgd_steps=2, cospgd_steps=2, apgd_steps=2),
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
    noise = check_noise(ev, eps, white.counts)
    blind = check_gradient_free(ev, eps, white.counts, queries=20)
    assert noise["status"] == "warning" and "gradient is masked" in noise["message"]
    assert blind["status"] == "warning" and "gradient masking" in blind["message"]
    more = check_more_steps(ev, "ifgsm", eps, white.counts)
    assert more["status"] == "ok" and "with 25" in more["message"]


# --------------------------------------------------------------------------- ignore label, padding (issue 19)
class Garbage(torch.nn.Module):
    """``net`` plus input-dependent logits at the pixels that do not count (``where`` (B, 1, *S), 1 there):
    any objective, Dice or count that read those pixels would see other values and other gradients."""

    def __init__(self, net, where):
        super().__init__()
        self.net, self.where = net, where
        torch.manual_seed(1)
        self.mix = torch.nn.Conv2d(1, 3, 5, padding=2)

    def forward(self, x):
        return self.net(x) + self.where * 40 * torch.tanh(self.mix(x))


def ignore_label_cases():
    rng = np.random.default_rng(4)
    lab = np.zeros((4, 27, 30), np.int16)
    lab[:, 5:20, 6:22] = 1
    lab[:, 9:14, 10:16] = 2
    lab[:, 2:9, 18:27] = 3                                     # nnU-Net's ignore label (no head: 3 classes)
    img = (np.minimum(lab, 2) * 1.5 + rng.normal(scale=0.5, size=lab.shape)).astype(np.float32)[None]
    return [Case("c", img, lab)]


@pytest.mark.parametrize("kind", ["dicece", "ce"])
def test_per_sample_loss_ignores_not_scored_pixels_in_value_and_gradient(kind):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 3, 12, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (3, 1, 12, 12), generator=g)
    pad = torch.zeros(3, 12, 12, dtype=torch.bool)
    pad[1, 8:] = True
    scored = scored_labels(y, ignore_label=3, pad=pad)
    keep = valid_pixels(scored)
    loss = PerSampleLoss(kind, batch_dice=True, ignore_label=3)

    def value_and_grad(z):
        z = z.clone().requires_grad_(True)
        v = loss(z, scored)
        return v.detach(), torch.autograd.grad(v.sum(), z)[0]

    other = torch.where(keep, logits, 30 * torch.randn(logits.shape, generator=g, dtype=torch.float64))
    (v, gr), (v2, gr2) = value_and_grad(logits), value_and_grad(other)
    torch.testing.assert_close(v, v2)
    torch.testing.assert_close(gr, gr2)
    assert float(gr.abs().amax(1, keepdim=True)[~keep].max()) == 0.0


def test_ignore_label_dataset_runs_every_strong_attack_and_not_scored_pixels_have_no_effect():
    """A dataset with an nnU-Net ignore label (3) and padded slices (27 x 30 -> 32 x 32): every attack of
    --suite strong runs (before: SegPGD, CosPGD and APGD crashed, "Target 3 is out of bounds"), and
    input-dependent garbage logits at the ignore-label and padding pixels change no attack's point and no count."""
    from nnunet_ima_eval.runner import SUITES

    cases = ignore_label_cases()
    model = SimpleNamespace(**{**vars(stub_model(TinyNet())), "label_manager": SimpleNamespace(ignore_label=3)})
    settings = AttackSettings(batch_size=4, pgd_steps=3, segpgd_steps=3, cospgd_steps=3, apgd_steps=3, iterate="best")
    ev = Evaluator(model, cases, settings, progress=False)
    b = ev.batches[0]
    not_scored = (~valid_pixels(ev.labels(b))).to(b.x.dtype)
    assert 0 < float(not_scored.mean()) < 0.5 and bool(b.pad.any())
    model2 = SimpleNamespace(**{**vars(model), "network": Garbage(model.network, not_scored).eval()})
    ev2 = Evaluator(model2, cases, settings, progress=False)
    clean, clean2 = ev.run("clean", 0.0), ev2.run("clean", 0.0)
    np.testing.assert_array_equal(clean.counts.tp, clean2.counts.tp)
    np.testing.assert_array_equal(clean.counts.fp, clean2.counts.fp)
    attacks = [a for a in SUITES["strong"] if a != "worst"]
    for attack in attacks:
        runs = []
        for e in (ev, ev2):
            e.attacked.mask = b.mask
            runs.append(e.attack(attack, b, e.labels(b), 2.0, 3, torch.Generator().manual_seed(0)))
        torch.testing.assert_close(runs[0], runs[1], msg=attack)
        assert float((runs[0] - b.x).abs().sum()) > 0, attack
        r = ev.run(attack, 2.0)
        assert r.counts.n == 4 and np.isfinite(M.sample_dice(r.counts)).all(), attack
        # the counts leave the ignore label out: at most the 27 x 30 real pixels minus the ignore patch
        assert ((r.counts.tp + r.counts.fp + r.counts.fn).sum(1) <= 27 * 30 - 7 * 9).all(), attack


class Background(torch.nn.Module):
    """Predicts background everywhere, whatever the input (no gradient reaches the input)."""

    def forward(self, x):
        z = torch.zeros(x.shape[0], 3, *x.shape[2:], dtype=x.dtype) + 0 * x
        z[:, 0] = 10.0
        return z


def test_large_eps_check_reports_the_adi_of_the_convention_given():
    """Two blank slices (predicted blank) and two with foreground (missed): ADI 0.5 by the project's rule,
    0 by the paper's (blank slices skipped). The check prints and judges the convention's figure."""
    from nnunet_ima_eval.sanity import check_large_eps

    lab = np.zeros((4, 16, 16), np.int16)
    lab[2:, 4:12, 4:12] = 1
    cases = [Case("c", lab.astype(np.float32)[None], lab)]
    model = stub_model(Background(), patch=(16, 16), pool=(4, 4))
    got = {}
    for conv in ("project", "paper"):
        ev = Evaluator(model, cases, AttackSettings(ifgsm_steps=1, batch_size=4, convention=conv), progress=False)
        clean = ev.run("clean", 0.0)
        assert clean.summary["adi_convention"] == conv
        got[conv] = check_large_eps(ev, clean)
    assert "ADI 0.500 (clean 0.500, ADI convention project)" in got["project"]["message"]
    assert got["project"]["status"] == "warning"
    assert "ADI 0.000 (clean 0.000, ADI convention paper)" in got["paper"]["message"]
    assert got["paper"]["status"] == "ok"


def test_budget_check_passes_the_attacks_and_names_the_defects_it_catches():
    """Every registry attack's points lie in the eps-ball and off padding; an attack whose random start
    ignores the padding (the old random start: part of the L2 budget on pixels the network sees as 0)
    and one that leaves the ball are reported, each with its defect."""
    from nnunet_ima import pgd
    from nnunet_ima_eval.sanity import check_budget

    rng = np.random.default_rng(2)
    lab = np.zeros((4, 27, 30), np.int16)
    lab[:, 5:20, 6:22] = 1
    img = (lab * 1.5 + rng.normal(scale=0.5, size=lab.shape)).astype(np.float32)[None]
    ev = Evaluator(stub_model(TinyNet()), [Case("c", img, lab)],
                   AttackSettings(batch_size=4, pgd_steps=2, segpgd_steps=2, cospgd_steps=2, apgd_steps=2, ifgsm_steps=2), progress=False)
    for attack in ("pgd", "ifgsm", "segpgd", "cospgd", "apgd-mce", "apgd-bmce", "apgd-js"):
        runs = [ev.run(attack, e) for e in (1.0, 3.0)]
        assert check_budget(ev, runs)["status"] == "ok", attack
    no_region = ev.run("pgd", 3.0, custom=lambda b, y, e, gen: pgd(ev.attacked, b.x, y, e, steps=2, generator=gen))
    res = check_budget(ev, [no_region])
    assert res["status"] == "warning" and "perturbation on padding" in res["message"]
    assert "overstate robustness" in res["message"]
    too_far = ev.run("pgd", 1.0, custom=lambda b, y, e, gen: b.x + 1.5 * (ev.attack("pgd", b, y, e, 2, gen) - b.x))
    res = check_budget(ev, [too_far])
    assert res["status"] == "warning" and "beyond eps" in res["message"] and "larger eps" in res["message"]


def test_iterate_follows_the_suite_and_is_part_of_the_run_key():
    """--suite strong keeps each sample's lowest-Dice iterate, the papers' attacks keep their final point; the
    stored run says which (and in which convention), so a rerun with another choice recomputes it."""
    from nnunet_ima_eval.cli import _check_attacks, build_parser

    def resolved(*extra):
        args = build_parser().parse_args(["-d", "4", "-o", "out", "--eps", "2", *extra])
        _check_attacks(args)
        return args

    strong, paper = resolved("--suite", "strong"), resolved("--attacks", "pgd", "apgd-mce", "worst")
    assert (strong.iterate, strong.apgd_steps, paper.iterate) == ("best", 300, "final")
    assert resolved("--suite", "strong", "--iterate", "final").iterate == "final"
    s = AttackSettings(iterate=paper.iterate)
    assert (s.iterate_of("pgd"), s.iterate_of("apgd-mce"), s.iterate_of("worst")) == ("final", "best-project", "final")
    b = AttackSettings(iterate="best", convention="paper")
    assert b.iterate_of("pgd") == "best-paper" and b.keeps_best("ifgsm") and not b.keeps_best("clean")
    from nnunet_ima_eval.report import KEY_FIELDS

    assert "iterate" in KEY_FIELDS
