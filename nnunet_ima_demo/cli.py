"""``nnunet-ima``: the project's umbrella command. It lives in the app layer (the demo package):
the kernel imports none of this, and ``env`` borrows the trainers' own helper.

Argument errors are one line on stderr and exit code 2, before anything is built.
"""
from __future__ import annotations

import argparse
import sys

from nnunet_ima.ui import OneLineParser, UsageError, report_error

USAGE = """
    nnunet-ima demo      # the main job on built-in data (MNI152 anatomy): nnunet-ima demo -h
    nnunet-ima env       # print the `export nnUNet_extTrainer=...` line for nnUNetv2_train/_predict
"""


def build_parser() -> argparse.ArgumentParser:
    from . import runner

    parser = OneLineParser(prog="nnunet-ima", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train STD/SAT/IMA nnU-Net models on MNI152 anatomy and attack them",
                       description=runner.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_arguments(p)
    sub.add_parser("env", help="print the export line that lets nnUNetv2_train/_predict find our trainers")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "env":
        from nnunet_ima_trainers.cli import print_env  # the app layer may use the trainers' helper

        print_env()
        return 0
    from .runner import run

    try:
        return run(args)  # checks every argument, path and the device first
    except UsageError as e:
        return report_error("nnunet-ima demo", e)


if __name__ == "__main__":
    sys.exit(main())
