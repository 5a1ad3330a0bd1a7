"""``python -m nnunet_ima.classify``: see :mod:`nnunet_ima.classify.cli`."""
import sys

from .cli import main

sys.exit(main())
