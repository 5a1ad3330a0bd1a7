"""The adversarial trainers: each fills the one seam, ``make_adversarial_batch``.

* :class:`nnUNetTrainerSAT` - standard adversarial training: PGD with a fixed eps (NNUNET_IMA_SAT_EPS,
  K steps of 4 * eps / K, random start) on every sample.
* :class:`nnUNetTrainerIMA` - Increasing-Margin Adversarial training (Algorithm 1 with BPGD's
  Algorithm 3, segmentation as Dice-thresholded pseudo-classification, section 3.5).

Both attack nnU-Net's augmented batch with the trainer's own loss (Dice + CE with deep supervision)
under the training autocast; the shared step then trains on (L_clean + L_noisy) / 2.
"""
from __future__ import annotations

from batchgenerators.utilities.file_and_folder_operations import join

from nnunet_ima import DicePredicate, MarginStore, pgd
from nnunet_ima.ima_step import IMAStepSettings, IMAStepStats, ima_step
from nnunet_ima.ui import plot_margin_histogram
from nnunet_ima.validation import keep_finite

from .base import nnUNetTrainerSTD
from .config import ConfigError


class _AdversarialTrainer(nnUNetTrainerSTD):
    adversarial = True

    def initialize(self):
        super().initialize()
        if self.label_manager.has_regions:
            raise ConfigError(f"{type(self).__name__} needs softmax (label) training; region-based datasets are "
                              "not supported (the Dice predicate reads the argmax)")


class nnUNetTrainerSAT(_AdversarialTrainer):
    """Standard adversarial training with a fixed eps: ``NNUNET_IMA_SAT_EPS`` (default eps_max).
    Samples whose attack went non-finite (e.g. fp16 overflow) train on the clean sample and are
    counted apart ("fell back"), as IMA's are; the epoch log warns when more than a tenth fell back."""

    epoch_stats = IMAStepStats()  # replaced (never mutated) every epoch and step

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.epoch_stats = IMAStepStats()

    def make_adversarial_batch(self, data, target, keys, clean_output):
        """PGD on every sample; returns (noisy batch, None): SAT has no margins to finish."""
        cfg = self.ima_config
        with self.autocast():
            noisy = pgd(self.attack_module(), data, target, cfg.sat_eps, norm=cfg.norm, steps=cfg.k,
                        loss=self.attack_loss).detach()
        noisy, finite = keep_finite(noisy, data)
        n_ok = int(finite.sum())
        self.epoch_stats = self.epoch_stats + IMAStepStats(samples=len(finite), attacked=n_ok,
                                                           fell_back=len(finite) - n_ok)
        return noisy, None

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        s = self.epoch_stats
        self.print_to_log_file(f"SAT: {s.attacked}/{s.samples} samples attacked (PGD, eps {self.ima_config.sat_eps:g}), "
                               f"{s.fell_back} fell back to the clean sample (non-finite attack)")
        warning = fall_back_warning(s, "SAT", "")
        if warning:
            self.print_to_log_file(warning)


class nnUNetTrainerIMA(_AdversarialTrainer):
    """IMA: per-sample margins E(i), grown by delta while the noisy sample stays correct, shrunk
    towards the boundary distance when it crosses (Algorithm 1, the paper's segmentation rule).

    Per iteration: clean forward; the kernel's IMA step (:func:`nnunet_ima.ima_step`, the same one
    classify's Ima method runs): Dice predicate on the full-resolution output, BPGD "augment" (K PGD
    steps inside E(i), binary search between x and the last point, N forwards) on the correctly
    segmented samples (setting ``attack_samples``: "correct", Algorithm 1, or "all", the authors'
    code); (L_clean + L_noisy) / 2 with L_noisy = L_clean for the others; margin update from the
    noisy forward. Margins are keyed by :mod:`nnunet_ima_trainers.data`'s sample ids, merged across
    DDP ranks every epoch, saved in every checkpoint (key ``ima_margins``), logged per epoch and
    plotted to ``margins.png`` next to ``progress.png``.

    When a margin grows (setting ``expand_rule``): ``"prediction"`` (default, Algorithm 1 line 13)
    reads g(z~) = y off the noisy forward that the step trains on; ``"no_crossing"`` grows it exactly
    when BPGD found no crossing. The two differ only for crossed samples whose returned x~ (the
    midpoint of the last binary-search bracket, Algorithm 3) is still segmented correctly: the
    paper's rule grows those margins, the other shrinks them, so it tracks the boundary from below.
    Attacks that went non-finite (e.g. fp16 overflow) train on the clean sample, keep their margin
    and are counted apart ("fell back"); the epoch log warns when more than a tenth fell back.
    """

    margins: MarginStore
    predicate: DicePredicate
    step_settings: IMAStepSettings

    def initialize(self):
        super().initialize()
        cfg = self.ima_config
        self.margins = MarginStore(cfg.delta, cfg.eps_max)
        self.predicate = DicePredicate(cfg.dice_threshold, reduction=cfg.dice_reduction,
                                       ignore_label=self.label_manager.ignore_label)
        self.step_settings = IMAStepSettings(steps=cfg.k, search_steps=cfg.n, norm=cfg.norm, variant="augment",
                                             expand_rule=cfg.expand_rule,
                                             attack_samples=cfg.attack_samples)
        self.epoch_stats = IMAStepStats()

    def make_adversarial_batch(self, data, target, keys, clean_output):
        """One IMA step; returns (noisy batch or None, finish(noisy_output)) for the shared step."""
        with self.autocast():
            noisy, update = ima_step(self.attack_module(), data, target, [str(k) for k in keys], clean_output,
                                     self.predicate, self.margins, self.step_settings, loss=self.attack_loss)

        def finish(noisy_output) -> None:
            self.epoch_stats = self.epoch_stats + update.finish(noisy_output)

        return noisy, finish

    # ------------------------------------------------------------------ reporting
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.margins.reset_counters()
        self.epoch_stats = IMAStepStats()

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self.is_ddp:
            self.margins.merge()  # collective: every rank ends the epoch with the same margins
        for line in epoch_report(self.epoch_stats, self.predicate, self.step_settings.attack_samples):
            self.print_to_log_file(line)
        self.print_to_log_file(f"IMA {self.margins.format_summary()}")

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.local_rank == 0 and len(self.margins):
            plot_margin_histogram(self.margins, join(self.output_folder, "margins.png"),
                                  title=f"IMA margins after epoch {self.current_epoch - 1} "
                                        f"(n={len(self.margins)}, eps_max={self.margins.eps_max:g})")

    def on_train_end(self):
        super().on_train_end()
        if len(self.margins):
            eps = self.margins.suggest_sat_eps()
            self.print_to_log_file(f"IMA: suggested eps for nnUNetTrainerSAT (median margin): {eps:.4g} "
                                   f"-> export NNUNET_IMA_SAT_EPS={eps:.4g}")

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> dict:
        return {"ima_margins": self.margins.state_dict()}

    def load_extra_checkpoint_state(self, checkpoint: dict) -> None:
        if "ima_margins" not in checkpoint:
            self.print_to_log_file("IMA: checkpoint holds no margins; starting every margin at delta")
            return
        state, cfg = dict(checkpoint["ima_margins"]), self.ima_config
        if (state["delta"], state["eps_max"]) != (cfg.delta, cfg.eps_max):
            self.print_to_log_file(f"IMA: checkpoint margins used delta={state['delta']}, eps_max={state['eps_max']}; "
                                   f"continuing with delta={cfg.delta}, eps_max={cfg.eps_max} (margins clipped)")
            state.update(delta=cfg.delta, eps_max=cfg.eps_max, margins=state["margins"].clamp(max=cfg.eps_max))
        self.margins.load_state_dict(state)
        self.print_to_log_file(f"IMA: restored {len(self.margins)} margins, digest {margin_digest(self.margins)}")


def margin_digest(store: MarginStore) -> str:
    """Fingerprint of the margins as the checkpoint holds them (keys, margins, delta, eps_max): the same
    digest the trainer logs on every save and restore, so the three log lines can be compared by eye."""
    from nnunet_ima.plumbing import to_plain

    from .checkpoints import state_digest

    return state_digest(to_plain({"ima_margins": store.state_dict()}))


FALL_BACK_WARN_SHARE = 0.1  # warn when more than this share of an epoch's attacks fell back


def epoch_report(stats: IMAStepStats, predicate: DicePredicate, attack_samples: str) -> list[str]:
    """The epoch's IMA log lines: attacked, crossed, fell back; plus one warning line when more than
    a tenth of the attacks fell back to the clean sample (issue 11: margins then stop growing)."""
    s = stats
    share = f"{100 * s.crossed / s.attacked:.1f}%" if s.attacked else "n/a"
    correct = f"segmented correctly (Dice {predicate.reduction} >= {predicate.threshold})"
    chosen = (f"{correct} and attacked" if attack_samples == "correct"
              else f"attacked (attack_samples=all; {s.clean_correct} {correct})")
    lines = [f"IMA: {s.attacked}/{s.samples} samples {chosen}, {s.crossed} crossed ({share}), "
             f"{s.fell_back} fell back to the clean sample (non-finite attack)"]
    warning = fall_back_warning(s, "IMA", ", whose margin was not updated")
    return lines + ([warning] if warning else [])


def fall_back_warning(s: IMAStepStats, method: str, consequence: str) -> str | None:
    """One warning line when more than :data:`FALL_BACK_WARN_SHARE` of the epoch's attacks fell back."""
    if s.fell_back_share() <= FALL_BACK_WARN_SHARE:
        return None
    eps_var = "NNUNET_IMA_EPS_MAX" if method == "IMA" else "NNUNET_IMA_SAT_EPS"
    return (f"{method} WARNING: {s.fell_back} of {s.attacked + s.fell_back} attacks this epoch "
            f"({100 * s.fell_back_share():.0f}%) went non-finite and fell back to the clean sample{consequence}. "
            "Likely cause: fp16 overflow under autocast (mixed precision) or a non-finite input gradient. Try: check "
            f"the inputs for NaN/Inf; a smaller {eps_var}; training without mixed precision (a trainer subclass whose "
            "autocast() is disabled).")
