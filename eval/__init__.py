"""nnunet_ima_eval: robustness evaluation of trained nnU-Net models (the ``nnunet-ima-attack`` command).

Loads each model through nnU-Net's ``nnUNetPredictor``, takes the fold's validation cases from
nnUNet_preprocessed (or raw images + labels, preprocessed with the model's own preprocessor), attacks
every 2d slice / 3d patch tile in the network's input space with the kernel's L2 PGD (100 steps, random
start) and IFGSM (10 steps), and reports ADI, TVDI and per-case 3D Dice per noise level::

    nnunet-ima-attack -d 4 -c 2d -f 0 -tr nnUNetTrainer nnUNetTrainerIMA --eps 2 6 10 -o results/

Modules: :mod:`.cli` (options), :mod:`.model` (loading, the model's Dice+CE attack loss), :mod:`.data`
(cases, samples, padding, batches), :mod:`.runner` (attacks, counts, sanity checks), :mod:`.metrics`
(ADI / TVDI / 3D Dice, empty-foreground rule), :mod:`.report` (CSV, JSON, table, plot, examples).
"""
