"""The adversarial trainers: each fills the one seam, ``make_adversarial_batch``.

* :class:`nnUNetTrainerSAT` - standard adversarial training: PGD with a fixed eps (NNUNET_IMA_SAT_EPS,
  K steps of 4 * eps / K, random start) on every sample.
* :class:`nnUNetTrainerIMA` - Increasing-Margin Adversarial training (Algorithm 1 with BPGD's
  Algorithm 3, segmentation as Dice-thresholded pseudo-classification, section 3.5).

Both attack nnU-Net's augmented batch with the trainer's own loss (Dice + CE with deep supervision)
under the training autocast; the shared step then trains on (L_clean + L_noisy) / 2.
"""
from __future__ import annotations

import torch
from batchgenerators.utilities.file_and_folder_operations import join

from nnunet_ima import DicePredicate, MarginStore, bpgd, pgd

from .base import nnUNetTrainerSTD
from .config import ConfigError


class _AdversarialTrainer(nnUNetTrainerSTD):
    adversarial = True

    def initialize(self):
        super().initialize()
        if self.label_manager.has_regions:
            raise ConfigError(f"{type(self).__name__} needs softmax (label) training; region-based datasets are "
                              "not supported (the Dice predicate reads the argmax)")

    def attack_loss(self, output, target) -> torch.Tensor:
        """The trainer's loss, times the GradScaler's scale on CUDA so that fp16 input gradients do
        not underflow (the attack step normalises the gradient, so the factor changes nothing else)."""
        loss = self.loss(output, target)
        return loss * self.grad_scaler.get_scale() if self.grad_scaler is not None else loss


class nnUNetTrainerSAT(_AdversarialTrainer):
    """Standard adversarial training with a fixed eps: ``NNUNET_IMA_SAT_EPS`` (default eps_max)."""

    def make_adversarial_batch(self, data, target, keys, clean_output):
        cfg = self.ima_config
        with self.autocast():
            return pgd(self.bare_network(), data, target, cfg.sat_eps, norm=cfg.norm, steps=cfg.k,
                       loss=self.attack_loss)


class nnUNetTrainerIMA(_AdversarialTrainer):
    """IMA: per-sample margins E(i), grown by delta while the noisy sample stays correct, shrunk
    towards the boundary distance when it crosses (Algorithm 1, the paper's segmentation rule).

    Per iteration: clean forward; Dice predicate on the full-resolution output; BPGD "augment"
    (K PGD steps inside E(i), binary search between x and the last point, N forwards) on the
    correctly segmented samples; (L_clean + L_noisy) / 2 with L_noisy = L_clean for the others;
    margin update. Margins are keyed by :mod:`nnunet_ima_trainers.data`'s sample ids, merged across
    DDP ranks every epoch, saved in every checkpoint (key ``ima_margins``), logged per epoch and
    plotted to ``margins.png`` next to ``progress.png``.

    When a margin grows (setting ``expand_rule``): ``"prediction"`` (default, Algorithm 1 line 13)
    reads g(z~) = y off the noisy forward that the step trains on, so the update happens in
    :meth:`after_noisy_forward`; ``"no_crossing"`` grows it exactly when BPGD found no crossing.
    The two differ only for crossed samples whose returned x~ (the midpoint of the last binary-search
    bracket, Algorithm 3) is still segmented correctly: the paper's rule grows those margins, the
    other shrinks them, so it tracks the boundary from below.
    """

    margins: MarginStore
    predicate: DicePredicate

    def initialize(self):
        super().initialize()
        self.margins = MarginStore(self.ima_config.delta, self.ima_config.eps_max)
        self.predicate = DicePredicate(self.ima_config.dice_threshold, ignore_label=self.label_manager.ignore_label)
        self.epoch_stats = _zero_stats()
        self._pending = None

    def make_adversarial_batch(self, data, target, keys, clean_output):
        cfg = self.ima_config
        keys = [str(k) for k in keys]
        b = data.shape[0]
        correct = self.predicate(clean_output, target[0] if isinstance(target, list) else target).cpu()
        noisy_correct = correct.clone()
        distance = torch.zeros(b, dtype=torch.float64)
        valid = torch.ones(b, dtype=torch.bool)
        noisy = None
        idx = torch.nonzero(correct).flatten()
        if idx.numel():
            eps = self.margins.get([keys[i] for i in idx.tolist()], device=data.device)
            sub_target = [t[idx.to(t.device)] for t in target] if isinstance(target, list) else target[idx]
            with self.autocast():
                res = bpgd(self.bare_network(), data[idx], sub_target, eps, norm=cfg.norm, steps=cfg.k,
                           search_steps=cfg.n, variant="augment", is_correct=self.predicate, loss=self.attack_loss)
            x_adv = res.x_adv
            ok = res.valid & torch.isfinite(x_adv.flatten(1)).all(1)  # e.g. an fp16 gradient overflow
            x_adv = torch.where(ok.view(-1, *[1] * (data.dim() - 1)), x_adv, data[idx])
            noisy = data.clone()
            noisy[idx] = x_adv.to(data.dtype)
            noisy_correct[idx] = ~res.crossed.cpu()  # replaced by g(z~) = y under the paper's rule
            distance[idx] = res.distance.detach().double().cpu()
            valid[idx] = ok.cpu()
            self.epoch_stats["crossed"] += int((res.crossed & ok).sum())
        if noisy is None:
            self.margins.update(keys, correct, noisy_correct, distance, valid)
        else:  # Algorithm 1 updates after the noisy forward (line 13): see after_noisy_forward
            self._pending = (keys, correct, noisy_correct, distance, valid, idx)
        self.epoch_stats["samples"] += b
        self.epoch_stats["attacked"] += int(idx.numel())
        return noisy

    def after_noisy_forward(self, noisy_output, target) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        keys, correct, noisy_correct, distance, valid, idx = pending
        if self.ima_config.expand_rule == "prediction" and idx.numel():
            y = target[0] if isinstance(target, list) else target
            noisy_correct[idx] = self.predicate(noisy_output[idx.to(noisy_output.device)],
                                                y[idx.to(y.device)]).cpu()
        self.margins.update(keys, correct, noisy_correct, distance, valid)

    # ------------------------------------------------------------------ reporting
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.margins.reset_counters()
        self.epoch_stats = _zero_stats()

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self.is_ddp:
            self.margins.merge()  # collective: every rank ends the epoch with the same margins
        s = self.epoch_stats
        share = f"{100 * s['crossed'] / s['attacked']:.1f}%" if s["attacked"] else "n/a"
        self.print_to_log_file(f"IMA: {s['attacked']}/{s['samples']} samples segmented correctly (Dice >= "
                               f"{self.predicate.threshold}) and attacked, {s['crossed']} crossed ({share})")
        self.print_to_log_file(f"IMA {self.margins.format_summary()}")

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.local_rank == 0 and len(self.margins):
            self.margins.plot_histogram(join(self.output_folder, "margins.png"),
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
    """Short fingerprint of keys and margins (exact float64 bytes): equal digests = equal margins."""
    import hashlib

    h = hashlib.sha1()
    for k in store.keys():
        h.update(str(k).encode() + b"\0")
    h.update(store.margins.numpy().tobytes())
    return h.hexdigest()[:16]


def _zero_stats() -> dict:
    return {"samples": 0, "attacked": 0, "crossed": 0}
