"""What every front end shares with the user, above the kernel and below the front ends: argument
parsing (:mod:`.args`: one-line errors, lists, noise levels, old spellings, the device rule), the one
vocabulary of the command lines (:mod:`.vocabulary`), the one error line (:mod:`.errors`), the one
output-folder check (:mod:`.paths`) and headless figures (:mod:`.plots`).

Layers (ARCHITECTURE.md): kernel (``nnunet_ima`` top-level modules) < ``nnunet_ima.ui`` < front ends
(``nnunet_ima.classify``, ``nnunet_ima_trainers``, ``nnunet_ima_eval``) < app (the demo). This package
imports nothing of the project but (at most) the kernel; besides the standard library, numpy and,
lazily, torch and matplotlib.
"""
from .args import DEVICES, DeprecatedAlias, OneLineParser, SpaceList, check_device, default_device, eps_value, \
    resolve_device
from .errors import USAGE_EXIT, UsageError, report_error, usage_error, warn
from .paths import check_writable
from .plots import plot_margin_histogram, pyplot
from .vocabulary import VOCABULARY, Term, add_option, spelling

__all__ = ["OneLineParser", "SpaceList", "DeprecatedAlias", "eps_value", "default_device", "check_device", "DEVICES",
           "UsageError", "usage_error", "report_error", "warn", "USAGE_EXIT", "VOCABULARY", "Term", "add_option",
           "spelling", "pyplot", "plot_margin_histogram", "resolve_device", "check_writable"]
