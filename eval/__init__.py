"""nnunet_ima_eval: robustness evaluation of trained nnU-Net models (the ``nnunet-ima-attack`` command).

Loads each model through nnU-Net's ``nnUNetPredictor``, takes the fold's validation cases from
nnUNet_preprocessed (or raw images + labels, preprocessed with the model's own preprocessor), attacks
every 2d slice / 3d patch tile in the network's input space with the kernel's attacks (L2 PGD-100 with a
random start and IFGSM-10 as in the papers; SegPGD, CosPGD, APGD; the per-sample worst case), and
reports ADI, TVDI and per-case 3D Dice per noise level::

    nnunet-ima-attack -d 4 -c 2d -f 0 -tr nnUNetTrainer nnUNetTrainerIMA --eps 2 6 10 -o results/

Modules: :mod:`.cli` (options), :mod:`.pipeline` (the steps of a run), :mod:`.model` (loading, the
model's Dice+CE attack loss), :mod:`.data` (cases, samples, padding, batches, label check),
:mod:`.runner` (attacks, counts, sanity checks), :mod:`.metrics` (ADI conventions / TVDI / 3D Dice,
worst case), :mod:`.provenance` (what produced a result), :mod:`.report` (store, CSV, JSON,
``read_table``, table, plot, examples). ``--scope case`` (whole cases through nnU-Net's sliding-window
predictor, scored as deployed): :mod:`.case_predictor`, :mod:`.case_scope`, :mod:`.case_metrics`,
:mod:`.case_checks`, :mod:`.case_examples`. Several processes (``torchrun ... -m nnunet_ima_eval``,
``--num-gpus``): :mod:`.distributed` (the job, the failure line, the launcher), :mod:`.units` (the unit
of work, the share-out, the merge, the progress bar), :mod:`.shards` (finished units on disk).
"""
