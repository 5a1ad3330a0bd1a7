"""The demo: the app layer of nnunet-ima (``nnunet-ima demo`` / ``nnunet-ima env``).

It drives the trainers (``nnunet-ima-train``) and the evaluation (``nnunet-ima-attack``) through
their console scripts, as a user would; the kernel (:mod:`nnunet_ima`) imports nothing from here.

* :mod:`~nnunet_ima_demo.cli` - the umbrella ``nnunet-ima`` command;
* :mod:`~nnunet_ima_demo.checks` - every argument, path and device checked before the first step;
* :mod:`~nnunet_ima_demo.runner` - the steps: dataset, planning, training, attacks;
* :mod:`~nnunet_ima_demo.records` - what each dataset / model was built from (a rerun rebuilds what changed);
* :mod:`~nnunet_ima_demo.verdict` - the plain-words verdict on the table (through eval's report module);
* :mod:`~nnunet_ima_demo.mni` - the MNI152 dataset builder (real anatomy shipped with nilearn);
* :mod:`~nnunet_ima_demo.nnunet_data` - nnU-Net raw-dataset helpers (write a dataset, plan it, env).
"""
from .runner import DATASET_ID, DEMO_PLANS, add_arguments, run
from .verdict import TRAINERS, verdict

__all__ = ["DATASET_ID", "DEMO_PLANS", "TRAINERS", "add_arguments", "run", "verdict"]
