"""``python -m nnunet_ima_eval``: ``nnunet-ima-attack``, the form torchrun starts on every rank.

    torchrun --standalone --nproc_per_node 4 -m nnunet_ima_eval -d 4 -tr nnUNetTrainer --eps 2 6 -o results/
"""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
