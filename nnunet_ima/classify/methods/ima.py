"""IMA, later paper Algorithm 1 in mini-batches (Algorithm 2 BPGD; Algorithm 3 when data
augmentation is on), with the earlier paper's beta loss and margin rules as options (``ima_rule="earlier"``: re-initialise
to Delta on a clean error, shrink to ||x - x~|| exactly when BPGD found the boundary, clip at Delta).

Per batch: one clean forward (its graph is kept for the loss, not recomputed); the kernel's IMA step
(:func:`nnunet_ima.ima_step`, the same one nnU-Net's trainer runs): BPGD only for the correctly
classified samples, inside their margins E(i); one forward of their noisy samples; loss
(L0 + L1) / 2 with L1 <- L0 for the wrong ones; margin update with g(z~) read off that same noisy
forward. Sample ids are dataset indices. In multi-process runs every rank updates the margins of
its own samples and :meth:`end_epoch` merges them (each sample is seen once per epoch, so merging
once per epoch gives the single-process result).

``ima_rule`` is a rule SET: "later" = expand_rule "prediction" with the later paper's store rules;
"earlier" = expand_rule "no_crossing" with the earlier paper's (reinit / replace / clip at Delta).

One mode for every decision of a step. The clean check g(z) = y (which samples are attacked, and
L1 <- L0 for the others), BPGD's checks and binary search, and the noisy check g(z~) = y (expand or
shrink) all read eval-mode forwards: running statistics, no dropout, so a sample's correctness does
not depend on which other samples share its forward (BPGD attacks a subset, shrinks its active set
and searches on the crossed rows only), and it is the prediction the evaluation measures. The
training forwards (L0 on the clean batch, L1 on the noisy rows) stay in train mode. For a model that
predicts the same in both modes (no BatchNorm, no dropout: InstanceNorm/LayerNorm models, nnU-Net)
the train-mode outputs are reused, so the decisions cost no forward; otherwise two no-grad forwards
(the clean batch, the noisy rows). Mixing modes made a sample correct in train mode but wrong in
eval mode "cross" at once with x~ = x, and the train-mode noisy check then expanded its margin
although it was never attacked. The authors' classification code (SarielMa/Increasing-Margin-
Adversarial-Training, ``classification/core/RobustDNN_IMA_bn.py``, ``IMA_loss``) has flags for this:
with their defaults (``model_eval_attack=0``, ``model_eval_Xn=0`` in every ``*_IMA.py`` app) the clean
check, PGD and the noisy forward all run in train mode on the full batch (one mode, train); with
``model_eval_attack=1`` the clean check is re-run in eval mode for the attack. We take eval mode for
all decisions because our BPGD forwards subsets of the batch, whose batch statistics would change
a sample's train-mode prediction from one forward to the next.
"""
from __future__ import annotations

from nnunet_ima import MarginStore, argmax_correct, cross_entropy, ima_beta_loss, ima_loss
from nnunet_ima.ima_step import IMAStepSettings, ima_step

from .base import Method, MethodConfig, StepOutput, eval_forward, mode_dependent

# ima_rule -> (expand rule of the IMA step, MarginStore rules)
RULES = {"later": ("prediction", {}),
         "earlier": ("no_crossing", {"on_clean_wrong": "reinit", "shrink": "replace", "clip_min": "delta"})}


class Ima(Method):
    name = "ima"
    uses_margins = True

    def __init__(self, cfg: MethodConfig, predicate=argmax_correct):
        """``predicate(output, y) -> bool (B,)``: g(z) = y (argmax; e.g. a DicePredicate for dense outputs)."""
        super().__init__(cfg)  # MethodConfig has validated ima_rule, ima_loss, delta > 0
        self.predicate = predicate
        expand_rule, store_rules = RULES[cfg.ima_rule]
        self.store = MarginStore(cfg.delta, cfg.eps, **store_rules)
        self.settings = IMAStepSettings(steps=cfg.steps, search_steps=cfg.search_steps, norm=cfg.norm,
                                        variant="augment" if cfg.augment else "boundary", expand_rule=expand_rule,
                                        clip=cfg.clip)

    def loss(self, model, x, y, ids):
        c = self.cfg
        two_modes = mode_dependent(model)  # else the train-mode outputs are the eval-mode ones
        logits = model(x)  # train mode: the clean loss L0
        l0 = cross_entropy(logits, y)  # per sample (B,), averaged over pixels for dense outputs
        # every decision below (clean check, BPGD, noisy check) in eval mode, between the two training
        # forwards, so with the same running statistics
        decide = eval_forward(model, x) if two_modes else logits.detach()
        noisy, update = ima_step(model, x, y, ids, decide, self.predicate, self.store, self.settings)
        correct = update.clean_correct.to(logits.device)  # the step's own clean check, not a second one
        l1, noisy_check = l0, None
        if update.rows.numel():
            x_rows = noisy[update.rows]
            noisy_check = eval_forward(model, x_rows) if two_modes else None
            noisy_logits = model(x_rows)  # train mode, only the attacked rows: L1 <- L0 for the others
            l1 = l0.index_put((update.rows,), cross_entropy(noisy_logits, update.y_rows))
            noisy_check = noisy_logits.detach() if noisy_check is None else noisy_check
        if c.ima_loss == "mean":
            loss = ima_loss(l0, l1, correct)
        else:
            loss = ima_beta_loss(l0, l1, correct, c.ima_beta)
        stats = update.finish(noisy_check)
        x_adv = noisy if noisy is not None else x.detach().clone()
        return StepOutput(loss, logits, x_adv, {"attacked": stats.attacked, "fell_back": stats.fell_back})

    def start_epoch(self, epoch, epochs):
        self.store.reset_counters()

    def end_epoch(self):
        self.store.merge()

    def state_dict(self):
        return {"margins": self.store.state_dict()}

    def load_state_dict(self, state):
        self.store.load_state_dict(state["margins"])

    def summary(self):
        return self.store.format_summary()
