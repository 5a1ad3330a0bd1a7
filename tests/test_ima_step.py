"""The one IMA batch step of the kernel (:func:`nnunet_ima.ima_step`): the attacked set
(``attack_samples``), the expand rule, the non-finite fallback, and the same step run through both
front ends (nnU-Net trainer and classify's Ima method) giving identical margins."""
from __future__ import annotations

import copy
import types

import pytest
import torch

from nnunet_ima import DicePredicate, IMAStepSettings, MarginStore, argmax_correct, cross_entropy, ima_step
from nnunet_ima.classify.methods import MethodConfig
from nnunet_ima.classify.methods.ima import Ima

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


# ---------------------------------------------------------------------- attacked set, by hand
def line_classifier():
    """logits = (-x1, x1): class 1 exactly when x1 > 0; L2 distance to the boundary = |x1|."""
    model = torch.nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    return model


# A: correct, 2 from the boundary (cannot cross inside eps 0.5); B: wrong by 0.3; C: wrong by 2
X = torch.tensor([[2.0, 0.0], [0.3, 0.0], [2.0, 0.0]], dtype=torch.float64)
Y = torch.tensor([1, 0, 0])
DELTA, N = 0.5, 3
D_WRONG = DELTA / 2 ** (N + 1)  # BPGD on a wrong sample: the search between x and the PGD point (both
# wrong) ends 0.5 / 2^(N+1) from x (PGD pushes it further from its label, 4 steps of 0.5 inside 0.5)


def run_line_step(attack_samples, noisy_output=None):
    """One step on X; ``noisy_output``: the noisy forward the front end reports (default: model(x~))."""
    model = line_classifier()
    store = MarginStore(DELTA, 4.0)
    settings = IMAStepSettings(steps=4, search_steps=N, variant="augment", attack_samples=attack_samples)
    noisy, update = ima_step(model, X, Y, ["a", "b", "c"], model(X), argmax_correct, store, settings)
    stats = update.finish(model(noisy) if noisy_output is None else noisy_output)
    return noisy, stats, store.get(["a", "b", "c"]).double()


B_LOOKS_CORRECT = torch.tensor([[-1.5, 1.5], [1.0, -1.0], [-2.0, 2.0]], dtype=torch.float64)  # rows: A ok, B ok, C wrong


def test_attack_samples_correct_leaves_clean_wrong_samples_and_shrinks_them():
    """Algorithm 1: only clean-correct samples are attacked; a clean-wrong one keeps x~ = x and its
    margin shrinks to (0 + E) / 2, whatever the noisy forward says."""
    noisy, stats, m = run_line_step("correct")
    assert torch.equal(noisy[1:], X[1:])
    assert noisy[0, 0] == pytest.approx(1.5)  # A pushed 0.5 towards the boundary, still correct
    assert m.tolist() == pytest.approx([2 * DELTA, DELTA / 2, DELTA / 2])
    assert (stats.samples, stats.attacked, stats.crossed, stats.fell_back) == (3, 1, 0, 0)
    assert run_line_step("correct", B_LOOKS_CORRECT)[2].tolist() == pytest.approx([2 * DELTA, DELTA / 2, DELTA / 2])


def test_attack_samples_all_moves_margins_by_the_noisy_sample_only():
    """The authors' code: every sample is attacked, and only g(z~) = y moves its margin: B and C are
    attacked (x~ != x) and, their noisy samples being wrong, shrink to (||x - x~|| + E) / 2; when the
    noisy forward calls B correct, B's margin grows although its clean sample is wrong."""
    noisy, stats, m = run_line_step("all")
    assert noisy[:, 0].tolist() == pytest.approx([1.5, 0.3 + D_WRONG, 2.0 + D_WRONG])
    shrunk = (D_WRONG + DELTA) / 2
    assert m.tolist() == pytest.approx([2 * DELTA, shrunk, shrunk])
    assert (stats.samples, stats.attacked, stats.crossed, stats.fell_back) == (3, 3, 2, 0)
    assert run_line_step("all", B_LOOKS_CORRECT)[2].tolist() == pytest.approx([2 * DELTA, 2 * DELTA, shrunk])


def test_expand_rule_prediction_reads_the_noisy_output_no_crossing_reads_bpgd():
    """A crossed sample whose returned midpoint is still correct: "prediction" (line 13) grows it,
    "no_crossing" shrinks it. x1 = 0.2, one PGD step of 0.5 crosses to -0.3; two search steps
    (-0.05 wrong, 0.075 correct) return the midpoint 0.0125, on the correct side."""
    model = line_classifier()
    x, y = torch.tensor([[0.2, 0.0]], dtype=torch.float64), torch.tensor([1])
    for rule, want in (("prediction", 2 * DELTA), ("no_crossing", (0.1875 + DELTA) / 2)):
        store = MarginStore(DELTA, 4.0)
        settings = IMAStepSettings(steps=4, search_steps=2, variant="boundary", expand_rule=rule)
        noisy, update = ima_step(model, x, y, [0], model(x), argmax_correct, store, settings)
        assert float(noisy[0, 0]) == pytest.approx(0.0125) and bool(update.crossed.all())
        assert update.finish(model(noisy)).crossed == 1
        assert float(store.get([0])) == pytest.approx(want)
        with pytest.raises(RuntimeError, match="already"):
            update.finish(model(noisy))


def test_settings_are_validated():
    with pytest.raises(ValueError, match="attack_samples"):
        IMAStepSettings(attack_samples="some")
    with pytest.raises(ValueError, match="expand_rule"):
        IMAStepSettings(expand_rule="later")


# ---------------------------------------------------------------------- a tiny segmentation net
MARK = 10.0  # rows whose first pixel exceeds this get a NaN input gradient


class _NaNGradRows(torch.autograd.Function):
    """Identity; the input gradient of marked rows is NaN (an fp16 overflow, simulated)."""

    @staticmethod
    def forward(ctx, x):
        ctx.bad = x[:, 0, 0, 0] > MARK
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.where(ctx.bad.view(-1, 1, 1, 1), torch.full_like(g, float("nan")), g)


class TinySeg(torch.nn.Module):
    """(B, 1, H, W) -> logits (B, 3, H, W); per-sample (no batch coupling)."""

    def __init__(self, nan_grad_rows: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 3, 1))
        self.nan_grad_rows = nan_grad_rows

    def forward(self, x):
        return self.net(_NaNGradRows.apply(x) if self.nan_grad_rows else x)


def seg_batch(model, b=8, wrong=(6, 7)):
    """Inputs and labels = the model's own prediction (Dice 1), except ``wrong`` rows (relabelled)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 1, 10, 10, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    for i in wrong:
        y[i] = (y[i] + 1) % 3
    return x, y


def summed_ce(output, target):
    return cross_entropy(output, target).sum()


def stub_trainer(model, settings, predicate, store):
    """An nnUNetTrainerIMA without dataset or plans: only what its train_step / IMA step / epoch log
    read (the real methods run). SGD with lr 0: the weights stay those of the other front end."""
    from nnunet_ima import IMAStepStats
    from nnunet_ima_trainers import nnUNetTrainerIMA

    t = nnUNetTrainerIMA.__new__(nnUNetTrainerIMA)
    t.device, t.network, t.is_ddp, t.grad_scaler, t.local_rank = torch.device("cpu"), model, False, None, 0
    t.loss, t._rank_local_loss = summed_ce, None  # outside DDP the attack loss is the trainer's loss
    t.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    t.margins, t.predicate, t.step_settings, t.epoch_stats = store, predicate, settings, IMAStepStats()
    t.current_epoch, t.logger, t.log = 0, types.SimpleNamespace(log=lambda *a: None), []
    t.print_to_log_file = lambda *a, **k: t.log.append(" ".join(map(str, a)))
    return t


def test_both_front_ends_run_the_same_step_and_get_identical_margins():
    """Issue 10's must-show: nnU-Net's trainer (its real train_step -> make_adversarial_batch ->
    noisy forward -> finish) and classify's Ima.loss, on the same tiny net and batch, three steps."""
    model = TinySeg().double()
    x, y = seg_batch(model)
    predicate = DicePredicate(0.6)
    cfg = MethodConfig(eps=1.0, norm="l2", steps=3, search_steps=4, delta=0.4, augment=True)
    ima = Ima(cfg, predicate=predicate)
    trainer = stub_trainer(copy.deepcopy(model), ima.settings, predicate, MarginStore(cfg.delta, cfg.eps))
    ids = [f"case_{i // 4}/slice_{i % 4}" for i in range(x.shape[0])]
    for _ in range(3):
        trainer.train_step({"data": x, "target": y[:, None], "keys": ids})
        ima.loss(model, x, y, ids)
    assert trainer.margins.keys() == ima.store.keys() == ids
    assert torch.equal(trainer.margins.margins, ima.store.margins)
    m = ima.store.margins
    assert (m > cfg.delta).any() and (m < cfg.delta).any()  # some grew, some shrank
    assert trainer.epoch_stats.samples == 24 and trainer.epoch_stats.crossed > 0


def test_non_finite_attack_falls_back_to_the_clean_sample():
    """Issue 11 item 3: rows whose attack gradient is NaN train on their clean sample, keep their
    margin, are counted as fallen back (not attacked), and past a tenth the epoch log warns."""
    model = TinySeg(nan_grad_rows=True).double()
    x, y = seg_batch(model, wrong=())
    x[[1, 4], 0, 0, 0] = 2 * MARK  # two of eight rows: 25% of the attacks fall back
    with torch.no_grad():
        y = model(x).argmax(1)  # all clean-correct
    settings = IMAStepSettings(steps=3, search_steps=2)
    store = MarginStore(0.4, 1.0)
    store.update(["s1"], [True], [False], [1.0])  # crossed at distance 1.0: (1.0 + 0.4) / 2 = 0.7
    store.reset_counters()
    trainer = stub_trainer(model, settings, DicePredicate(0.6), store)
    ids = [f"s{i}" for i in range(8)]
    noisy, finish = trainer.make_adversarial_batch(x, y[:, None], ids, model(x).detach())
    assert torch.equal(noisy[[1, 4]], x[[1, 4]]) and torch.isfinite(noisy).all()
    assert not torch.equal(noisy[0], x[0])  # the others were attacked
    finish(model(noisy).detach())
    assert store.get(["s1", "s4"]).tolist() == pytest.approx([0.7, 0.4])  # unchanged
    assert store.counters["invalid"] == 2 and store.counters["updates"] == 6
    s = trainer.epoch_stats
    assert (s.samples, s.attacked, s.fell_back) == (8, 6, 2)
    trainer.on_train_epoch_end([{"loss": 0.5}])
    assert any("6/8 samples" in line and "2 fell back" in line for line in trainer.log), trainer.log
    warnings = [line for line in trainer.log if "WARNING" in line]
    assert len(warnings) == 1 and "fp16" in warnings[0] and "NNUNET_IMA_EPS_MAX" in warnings[0]


def test_sat_non_finite_attack_falls_back_to_the_clean_sample_and_is_counted():
    """SAT as IMA: rows whose PGD went non-finite train on the clean sample (no NaN reaches the loss),
    counted apart, and the epoch log warns past a tenth."""
    from nnunet_ima_trainers import nnUNetTrainerSAT

    model = TinySeg(nan_grad_rows=True).double()
    x, y = seg_batch(model, wrong=())
    x[[2, 5], 0, 0, 0] = 2 * MARK
    t = stub_trainer(model, IMAStepSettings(), DicePredicate(0.6), MarginStore(0.4, 1.0))
    t.__class__ = nnUNetTrainerSAT
    t.ima_config = types.SimpleNamespace(sat_eps=1.0, norm="l2", k=3)
    t.on_train_epoch_start = lambda: None
    noisy, finish = t.make_adversarial_batch(x, y[:, None], [f"s{i}" for i in range(8)], model(x).detach())
    assert finish is None and torch.isfinite(noisy).all()
    assert torch.equal(noisy[[2, 5]], x[[2, 5]]) and not torch.equal(noisy[0], x[0])
    assert (t.epoch_stats.samples, t.epoch_stats.attacked, t.epoch_stats.fell_back) == (8, 6, 2)
    t.on_train_epoch_end([{"loss": 0.5}])
    assert any("SAT: 6/8 samples attacked" in line and "2 fell back" in line for line in t.log), t.log
    warnings = [line for line in t.log if "WARNING" in line]
    assert len(warnings) == 1 and warnings[0].startswith("SAT WARNING: 2 of 8") and "NNUNET_IMA_SAT_EPS" in warnings[0]


def test_fall_back_warning_threshold():
    from nnunet_ima import IMAStepStats
    from nnunet_ima_trainers.adversarial import epoch_report

    p = DicePredicate(0.6, reduction="max")
    assert len(epoch_report(IMAStepStats(100, 90, 5, 10), p, "correct")) == 1  # 10 of 100 attempts: not past a tenth
    lines = epoch_report(IMAStepStats(100, 89, 5, 11), p, "correct")
    assert len(lines) == 2 and "11 of 100 attacks" in lines[1]
    assert "Dice max >= 0.6" in lines[0] and "5 crossed" in lines[0]
