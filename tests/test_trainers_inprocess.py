"""Trainers built in this process on the tiny planned dataset: sample keys, the shared step, the
IMA batch, checkpoints. (The real ``nnUNetv2_train`` runs are in test_trainers_e2e.py.)"""
from __future__ import annotations

import copy
import importlib
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_ima import MarginStore
from nnunet_ima_trainers import SampleKeyDataLoader, nnUNetTrainerIMA, nnUNetTrainerSAT, nnUNetTrainerSTD, slice_key
from nnunet_ima_trainers.adversarial import margin_digest
from nnunet_ima_trainers.config import ConfigError

SHORT = {"NNUNET_IMA_EPOCHS": "1", "NNUNET_IMA_ITERS": "2", "NNUNET_IMA_VAL_ITERS": "1", "NNUNET_IMA_K": "2",
         "NNUNET_IMA_N": "2", "NNUNET_IMA_DICE_THRESHOLD": "0.01"}


def gathers_across_ranks(loss) -> bool:
    """True when some part of ``loss`` all-gathers across DDP ranks (nnU-Net's Dice with ``ddp`` and
    ``batch_dice``)."""
    modules = loss.modules() if isinstance(loss, torch.nn.Module) else []
    return any(getattr(m, "ddp", False) and getattr(m, "batch_dice", False) for m in modules)



@pytest.fixture
def tiny_env(nnunet_environ, monkeypatch, tmp_path, one_thread):
    """The tiny dataset, results in this test's own folder, a short IMA schedule, one thread."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    for k, v in SHORT.items():
        monkeypatch.setenv(k, v)
    return nnunet_environ


def make_trainer(tiny, cls, configuration="2d"):
    plans = load_json(str(tiny.preprocessed / "nnUNetPlans.json"))
    plans["continue_training"] = False
    dataset_json = load_json(str(tiny.preprocessed / "dataset.json"))
    torch.manual_seed(0)
    return cls(plans, configuration, 0, dataset_json, device=torch.device("cpu"))


def keyed_loader(trainer, case="case_000", batch_size=8):
    """A SampleKeyDataLoader over one case, without augmentation (deep-supervision targets only)."""
    trainer.dataset_class = None
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = trainer.preprocessed_dataset_folder
    dataset = infer_dataset_class(folder)(folder, [case])
    transforms = trainer.get_validation_transforms(trainer._get_deep_supervision_scales())
    patch = trainer.configuration_manager.patch_size
    loader = SampleKeyDataLoader(dataset, batch_size, patch, patch, trainer.label_manager,
                                 oversample_foreground_percent=1.0, transforms=transforms)
    return loader, dataset


def test_2d_keys_name_the_slice_that_was_drawn(tiny_env):
    trainer = make_trainer(tiny_env, nnUNetTrainerIMA)
    loader, dataset = keyed_loader(trainer)
    data, seg, _, _ = dataset.load_case("case_000")
    batch = next(loader)
    for key, x, y, lbs in zip(batch["keys"], batch["data"], batch["target"][0], loader._drawn):
        m = re.fullmatch(r"case_000/slice_(\d+)", key)
        assert m, key
        k = int(m[1])  # the sample is nnU-Net's crop of slice k (foreground patches may be shifted, zero-padded)
        assert lbs[0] == k
        bbox = [[lb, lb + p] for lb, p in zip(lbs, loader.patch_size)]
        assert torch.equal(x, torch.from_numpy(crop_and_pad_nd(data, bbox, 0)[:, 0]).float())
        assert torch.equal(y.long(), torch.from_numpy(crop_and_pad_nd(seg, bbox, -1)[:, 0]).long().clamp(min=0))
        assert torch.equal(x, torch.from_numpy(data[:, k]).float()) == (lbs[1:] == [0, 0])  # whole slice iff unshifted


def test_3d_keys_are_case_ids(tiny_env):
    trainer = make_trainer(tiny_env, nnUNetTrainerIMA, "3d_fullres")
    loader, _ = keyed_loader(trainer, batch_size=2)
    assert list(next(loader)["keys"]) == ["case_000", "case_000"]


def test_two_slices_of_one_case_get_two_margins(tiny_env):
    trainer = make_trainer(tiny_env, nnUNetTrainerIMA)
    trainer.initialize()
    loader, _ = keyed_loader(trainer)
    batch = next(loader)
    keys = list(batch["keys"])
    a = 0
    b = next(i for i, k in enumerate(keys) if k != keys[a])
    data = batch["data"][[a, b]]
    target = [t[[a, b]] for t in batch["target"]]
    gt = target[0][:, 0].long()
    clean = 10.0 * F.one_hot(gt, 3).permute(0, 3, 1, 2).float()
    clean[1] = 0
    clean[1, 0] = 10.0  # sample b: everything background -> Dice 0 -> clean wrong; sample a: perfect
    noisy, finish = trainer.make_adversarial_batch(data, target, [keys[a], keys[b]], clean)
    finish(clean)  # noisy output = clean output: a still correct
    delta = trainer.ima_config.delta
    m_a, m_b = trainer.margins.get([keys[a], keys[b]]).tolist()
    assert len(trainer.margins) == 2
    assert m_a == pytest.approx(2 * delta)  # clean and noisy correct: expand
    assert m_b == pytest.approx(delta / 2)  # clean wrong: shrink with distance 0 (segmentation rule)
    assert torch.equal(noisy[1], data[1])  # L1 = L0 for the wrongly segmented sample
    assert trainer.epoch_stats.attacked == 1 and trainer.epoch_stats.samples == 2


def test_init_weights_loads_every_weight_heads_included(tiny_env, monkeypatch, tmp_path):
    """The papers start SAT / IMA from the standard model: all of it, unlike -pretrained_weights."""
    std = make_trainer(tiny_env, nnUNetTrainerSTD)
    std.initialize()
    with torch.no_grad():
        for i, p in enumerate(std.network.parameters()):
            p.add_(0.01 * (i + 1))  # weights no fresh initialisation has
    seen = []
    std.on_checkpoint_saved = lambda f: seen.append((f, torch.load(f, weights_only=True)["trainer_name"]))
    std.save_checkpoint(str(tmp_path / "std.pth"))
    assert seen == [(str(tmp_path / "std.pth"), "nnUNetTrainerSTD")]  # the hook runs once the file is complete
    saved = {k: v.clone() for k, v in std.network.state_dict().items()}
    assert any(".seg_layers." in k for k in saved)

    monkeypatch.setenv("NNUNET_IMA_INIT_WEIGHTS", str(tmp_path / "std.pth"))
    ima = make_trainer(tiny_env, nnUNetTrainerIMA)
    ima.initialize()
    own = ima.network.state_dict()
    assert own.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(own[k], v), k

    # another network: refused with the way out, before the trainer makes its output folder (issue 24: a
    # fold folder left behind would be listed by nnunet-ima-attack as a trained model)
    with pytest.raises(ConfigError, match="not a checkpoint of this network.*holds trainer nnUNetTrainerSTD, "
                       "dataset Dataset999_Tiny, configuration 2d.*builds trainer nnUNetTrainerIMA, dataset "
                       "Dataset999_Tiny, configuration 3d_fullres.*-pretrained_weights"):
        make_trainer(tiny_env, nnUNetTrainerIMA, "3d_fullres")
    results = Path(os.environ["nnUNet_results"]) / tiny_env.dataset_name
    assert (results / "nnUNetTrainerIMA__nnUNetPlans__2d" / "fold_0").is_dir()
    assert not (results / "nnUNetTrainerIMA__nnUNetPlans__3d_fullres").exists()
    monkeypatch.setenv("NNUNET_IMA_INIT_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="init_weights: no such file"):
        make_trainer(tiny_env, nnUNetTrainerIMA)


@pytest.mark.parametrize("rule", ["prediction", "no_crossing"])
def test_margin_update_follows_the_expand_rule(tiny_env, monkeypatch, rule):
    """Algorithm 1 line 13 ("prediction"): the margin grows when the noisy forward is still correct,
    whatever BPGD reported; "no_crossing" reads BPGD's crossing flag and ignores the noisy forward."""
    from nnunet_ima.bpgd import BPGDResult

    monkeypatch.setenv("NNUNET_IMA_EXPAND_RULE", rule)
    trainer = make_trainer(tiny_env, nnUNetTrainerIMA)
    trainer.initialize()
    batch = next(keyed_loader(trainer)[0])
    keys = list(batch["keys"])
    b = next(i for i, k in enumerate(keys) if k != keys[0])
    data, target = batch["data"][[0, b]], [t[[0, b]] for t in batch["target"]]
    perfect = 10.0 * F.one_hot(target[0][:, 0].long(), 3).permute(0, 3, 1, 2).float()
    fake = BPGDResult(data + 0.1, torch.tensor([True, False]), torch.tensor([0.3, 0.4]), torch.tensor([True, True]))
    monkeypatch.setattr(importlib.import_module("nnunet_ima.ima_step"), "bpgd", lambda *a, **k: fake)
    ids = [keys[0], keys[b]]
    delta = trainer.ima_config.delta
    _, finish = trainer.make_adversarial_batch(data, target, ids, perfect)  # both clean-correct: both attacked
    assert trainer.margins.get(ids).tolist() == pytest.approx([delta, delta])  # no update before the noisy forward
    noisy_output = perfect.clone()
    noisy_output[1] = 0
    noisy_output[1, 0] = 10.0  # the noisy forward: sample 0 still correct, sample 1 all background (wrong)
    finish(noisy_output)
    grown, shrunk = 2 * delta, [(0.3 + delta) / 2, (0.4 + delta) / 2]
    expected = [grown, shrunk[1]] if rule == "prediction" else [shrunk[0], grown]
    assert trainer.margins.get(ids).tolist() == pytest.approx(expected)


def test_dice_reduction_max_and_attack_samples_all_reach_the_ima_step(tiny_env, monkeypatch):
    """Issue 13's settings in the real trainer: a slice with class 1 perfect and class 2 missed
    (Dice mean 0.5, max 1) counts as correct under "max"; with "all" a clean-wrong slice is attacked
    too and its margin moves by its noisy prediction: wrong -> (||x - x~|| + E) / 2."""
    for key, value in {"DICE_THRESHOLD": "0.6", "DICE_REDUCTION": "max", "ATTACK_SAMPLES": "all"}.items():
        monkeypatch.setenv(f"NNUNET_IMA_{key}", value)
    trainer = make_trainer(tiny_env, nnUNetTrainerIMA)
    trainer.initialize()
    batch = next(keyed_loader(trainer)[0])
    keys, gt = list(batch["keys"]), batch["target"][0][:, 0].long()
    a = next(i for i in range(len(keys)) if {1, 2} <= set(gt[i].unique().tolist()))
    b = next(i for i, k in enumerate(keys) if k != keys[a])
    data, target = batch["data"][[a, b]], [t[[a, b]] for t in batch["target"]]
    clean = 10.0 * F.one_hot(torch.where(gt[[a, b]] == 2, 0, gt[[a, b]]), 3).permute(0, 3, 1, 2).float()
    clean[1] = 0
    clean[1, 0] = 10.0  # a: class 2 predicted background; b: all background (Dice 0 under both reductions)
    from nnunet_ima import DicePredicate

    assert DicePredicate(0.6)(clean, target[0]).tolist() == [False, False]  # "mean" would attack nothing
    assert trainer.predicate(clean, target[0]).tolist() == [True, False]
    noisy, finish = trainer.make_adversarial_batch(data, target, [keys[a], keys[b]], clean)
    assert not torch.equal(noisy[0], data[0]) and not torch.equal(noisy[1], data[1])  # both attacked
    finish(clean)  # the noisy forward: a still correct (max), b wrong
    delta = trainer.ima_config.delta
    d_b = float((noisy[1] - data[1]).flatten().norm())
    assert trainer.margins.get([keys[a], keys[b]]).tolist() == pytest.approx([2 * delta, (d_b + delta) / 2])
    assert (trainer.epoch_stats.attacked, trainer.epoch_stats.clean_correct) == (2, 1)


@pytest.mark.parametrize("cls", [nnUNetTrainerSTD, nnUNetTrainerIMA])
def test_shared_step_equals_nnunet_step(tiny_env, cls):
    """STD's step is nnU-Net's; so is IMA's when no sample is segmented correctly (L1 = L0 for all)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = make_trainer(tiny_env, cls)
    trainer.on_train_start()
    if cls is nnUNetTrainerIMA:
        trainer.predicate = lambda output, y: torch.zeros(output.shape[0], dtype=torch.bool)
    batch = next(trainer.dataloader_train)
    net, opt = copy.deepcopy(trainer.network.state_dict()), copy.deepcopy(trainer.optimizer.state_dict())
    ours = trainer.train_step(batch)
    ours_w = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.network.load_state_dict(net)
    trainer.optimizer.load_state_dict(opt)
    ref = nnUNetTrainer.train_step(trainer, batch)
    assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    for p, q in zip(ours_w, trainer.network.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert trainer.num_epochs == 1 and trainer.num_iterations_per_epoch == 2  # NNUNET_IMA_* schedule honoured


@pytest.mark.parametrize("cls", [nnUNetTrainerIMA, nnUNetTrainerSAT])
def test_adversarial_step_and_exact_checkpoint_roundtrip(tiny_env, cls, tmp_path):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = make_trainer(tiny_env, cls)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    losses = [float(trainer.train_step(next(trainer.dataloader_train))["loss"]) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    path = str(tmp_path / "ckpt.pth")
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # plain tensors / strings only
    ref_path = str(tmp_path / "nnunet.pth")
    nnUNetTrainer.save_checkpoint(trainer, ref_path)  # nnU-Net's own writer: we add keys, drop none
    extra = {"nnunet_ima_settings"} | ({"ima_margins"} if cls is nnUNetTrainerIMA else set())
    assert set(ckpt) == set(torch.load(ref_path, weights_only=False)) | extra
    assert ckpt["nnunet_ima_settings"]["k"] == 2 and ckpt["nnunet_ima_settings"]["seed"] is None

    restored = make_trainer(tiny_env, cls)
    restored.load_checkpoint(path)
    for p, q in zip(trainer.network.parameters(), restored.network.parameters()):
        assert torch.equal(p, q)
    assert restored.current_epoch == trainer.current_epoch + 1
    saved_line = re.findall(r"saved ckpt\.pth: ima_margins digest (\w+)", open(trainer.log_file).read())
    restored_line = re.findall(r"restored ckpt\.pth: ima_margins digest (\w+) *$", open(restored.log_file).read(), re.M)
    assert len(saved_line) == (0 if cls is nnUNetTrainerSAT else 1) and restored_line == saved_line  # issue 12.5
    if cls is nnUNetTrainerIMA:
        assert len(trainer.margins) > 0 and all("/slice_" in k for k in trainer.margins.keys())
        assert restored.margins.keys() == trainer.margins.keys()
        assert torch.equal(restored.margins.margins, trainer.margins.margins)
        assert margin_digest(restored.margins) == margin_digest(MarginStore.from_state_dict(ckpt["ima_margins"]))
        # IMA's own restore line names the same digest as the save and restore lines (one digest in the log)
        ima_line = re.findall(r"IMA: restored \d+ margins, digest (\w+)", open(restored.log_file).read())
        assert ima_line == saved_line


def test_margin_keys_helper():
    assert slice_key("case_007", 3) == "case_007/slice_3"


def test_margins_merged_across_ranks_at_epoch_end(tiny_env, tmp_path):
    """Under DDP every rank merges its margins at the end of each training epoch (gloo, 1 rank here:
    nnU-Net's own DDP is CUDA-only)."""
    import numpy as np
    import torch.distributed as dist

    trainer = make_trainer(tiny_env, nnUNetTrainerIMA)
    trainer.initialize()
    trainer.margins.update(["case_000/slice_1", "case_000/slice_2"], [True, False], [True, True], [0.0, 0.0])
    before = trainer.margins.margins
    assert trainer.margins.state_dict()["dirty"].all()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        trainer.is_ddp = True
        trainer.on_train_epoch_end([{"loss": np.array(0.5)}])
    finally:
        trainer.is_ddp = False
        dist.destroy_process_group()
    assert not trainer.margins.state_dict()["dirty"].any()  # merged
    assert torch.equal(trainer.margins.margins, before)


def test_attacks_use_the_plain_module_and_a_loss_without_ddp_gathering(tiny_env, tmp_path):
    """Under DDP (gloo, 1 rank here) the training loss all-gathers its Dice terms (batch_dice);
    attack_loss is the same Dice+CE with the same deep-supervision weights, gathering nothing, and
    attack_module is the network without the DDP and torch.compile wrappers."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP


    trainer = make_trainer(tiny_env, nnUNetTrainerSTD)  # base.py's methods; IMA under DDP: test_trainers_ddp.py
    trainer.initialize()
    plain_net = trainer.network
    batch = next(keyed_loader(trainer, batch_size=3)[0])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        trainer.is_ddp = True
        trainer.network = DDP(torch.compile(plain_net))  # nnU-Net's order: compile, then DDP
        trainer.loss = trainer._build_loss()
        assert gathers_across_ranks(trainer.loss)
        assert trainer.attack_module() is plain_net
        trainer.attack_compiled = True
        assert trainer.attack_module() is trainer.network.module  # the compiled module, still no DDP
        output = plain_net(batch["data"])
        local = trainer.attack_loss(output, batch["target"])
        built_from, local_fn = trainer._rank_local_loss
        assert built_from is trainer.loss and local_fn is not trainer.loss and not gathers_across_ranks(local_fn)
        assert local_fn.weight_factors == trainer.loss.weight_factors
        assert local.item() == pytest.approx(trainer.loss(output, batch["target"]).item(), rel=1e-6)  # 1 rank
    finally:
        trainer.is_ddp = False
        dist.destroy_process_group()


def test_initial_lr_setting_starts_the_poly_schedule(tiny_env, monkeypatch):
    """NNUNET_IMA_INITIAL_LR: the fine-tuning's start of nnU-Net's poly schedule (default nnU-Net's 0.01)."""
    assert make_trainer(tiny_env, nnUNetTrainerSTD).initial_lr == 1e-2
    monkeypatch.setenv("NNUNET_IMA_INITIAL_LR", "0.002")
    trainer = make_trainer(tiny_env, nnUNetTrainerSAT)
    trainer.initialize()
    trainer.on_train_epoch_start()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.002)
