"""``nnunet-ima``: the project's umbrella command.

    nnunet-ima demo      # the main job on built-in data (MNI152 anatomy), see nnunet_ima.demo
    nnunet-ima env       # print the `export nnUNet_extTrainer=...` line for nnUNetv2_train/_predict
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nnunet-ima", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import demo

    p = sub.add_parser("demo", help="train STD/SAT/IMA nnU-Net models on MNI152 anatomy and attack them",
                       description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(p)
    sub.add_parser("env", help="print the export line that lets nnUNetv2_train/_predict find our trainers")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo.run(args)
    from nnunet_ima_trainers.cli import print_env

    return print_env() or 0


if __name__ == "__main__":
    sys.exit(main())
