"""One vocabulary across the commands (issue 21): every command's flags for the shared concepts are
spelled as :data:`nnunet_ima.ui.VOCABULARY` says and parsed by its one rule; every old spelling still
works, hidden from --help, with one deprecation line naming the new one; a usage error is one line
``<program>: error: ...`` with exit code 2, printed by the one helper; README's table is the same table.

A new command adds a row to :data:`COMMANDS`.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from nnunet_ima.ui import VOCABULARY, SpaceList, eps_value

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- the commands
def _classify(sub: str) -> argparse.ArgumentParser:
    from nnunet_ima.classify.cli import build_parser

    return _subparser(build_parser(), sub)


def _classify_main(argv: list) -> int:
    from nnunet_ima.classify.cli import main

    return main(argv)


def _attack_parser() -> argparse.ArgumentParser:
    from nnunet_ima_eval.cli import build_parser

    return build_parser()


def _attack_main(argv: list) -> int:
    from nnunet_ima_eval.cli import main

    return main(argv)


def _demo_parser() -> argparse.ArgumentParser:
    from nnunet_ima_demo.cli import build_parser

    return build_parser()


def _demo_main(argv: list) -> int:
    """``nnunet-ima demo`` with its working folder in the test's folder (nothing built: every argv is bad)."""
    from nnunet_ima_demo.cli import main

    return main([*argv, "--output", "work"])


def _train_main(argv: list) -> int:
    """``nnunet-ima-train`` (``argv`` goes to nnU-Net's parser, stubbed by :func:`_train_with_a_bad_setting`)."""
    from nnunet_ima_trainers.cli import train_entry

    return train_entry()


def _train_with_a_bad_setting(monkeypatch) -> None:
    """nnU-Net's run_training replaced (3 s of imports) by what it reaches with NNUNET_IMA_EPS_MAX=-1."""
    from nnunet_ima_trainers.config import load_config

    stub = types.ModuleType("nnunetv2.run.run_training")
    stub.run_training_entry = lambda: load_config("Dataset999_Tiny", 32 * 32, True, environ={"NNUNET_IMA_EPS_MAX": "-1"})
    monkeypatch.setitem(sys.modules, "nnunetv2.run.run_training", stub)
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)  # train_entry sets it; restored afterwards


COMMON = frozenset({"output", "quiet", "device", "seed", "overwrite", "batch_size", "norm"})
TRAINING = frozenset({"k", "n", "eps_max", "delta"})
EVALUATION = frozenset({"eps", "attacks", "pgd_steps", "ifgsm_steps"})


@dataclass(frozen=True)
class Command:
    command: str                      # its key in the old spellings of VOCABULARY
    program: str                      # <program> in its error line
    concepts: frozenset               # the shared concepts it offers (VOCABULARY keys)
    main: Callable                    # main(argv) -> exit code (or SystemExit)
    bad: tuple                        # argv lists, each one usage error
    parser: Callable | None = None    # -> its argparse parser; None: its arguments are another program's
    required: tuple = ()              # what every parse needs besides (a positional)
    setup: Callable | None = None     # (monkeypatch) -> None, before its usage errors


COMMANDS = [
    Command("classify", "python -m nnunet_ima.classify run", COMMON | TRAINING | EVALUATION | {"methods"},
            _classify_main, (["run", "--k", "x"], ["run", "--epochs", "0"], ["run", "--eps", "-1"]),
            parser=lambda: _classify("run")),
    Command("classify", "python -m nnunet_ima.classify train", COMMON | TRAINING | EVALUATION, _classify_main,
            (["train", "--device", "gpu"], ["train", "--resume", "--overwrite"]), parser=lambda: _classify("train")),
    Command("classify", "python -m nnunet_ima.classify eval", COMMON | TRAINING | EVALUATION, _classify_main,
            (["eval", "missing.pt"], ["eval", "x.pt", "--attacks", "pgd", "nope"]), parser=lambda: _classify("eval"),
            required=("x.pt",)),
    Command("train", "nnunet-ima-train", frozenset(), _train_main, ([],), setup=_train_with_a_bad_setting),
    Command("attack", "nnunet-ima-attack", COMMON | EVALUATION | {"segpgd_steps", "cospgd_steps", "apgd_steps",
                                                                  "scope", "num_gpus"},
            _attack_main, (["-d", "1", "--eps", "1", "-o", "x", "--device", "tpu"],
                           ["-d", "1", "--eps", "1", "-o", "x", "--attacks", "nope"],
                           ["-d", "1", "--eps", "-1", "-o", "x"]),
            parser=_attack_parser, required=("-d", "1", "--eps", "1", "-o", "x")),
    Command("demo", "nnunet-ima demo", COMMON - {"quiet", "norm"} | TRAINING | {"sat_eps", "eps", "pgd_steps",
                                                                            "ifgsm_steps"},
            _demo_main, (["demo", "--k", "0"], ["demo", "--device", "gpu"], ["demo", "--eps", "x"]),
            parser=lambda: _subparser(_demo_parser(), "demo")),
]
PARSED = [c for c in COMMANDS if c.parser is not None]

#: modules that print their own error line (none: every command goes through nnunet_ima.ui.report_error)
OWN_ERROR_PRINTS: set = set()


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def _options(parser: argparse.ArgumentParser) -> tuple[list, list]:
    """(shown, hidden) optional actions of one parser."""
    opts = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    return [a for a in opts if a.help != argparse.SUPPRESS], [a for a in opts if a.help == argparse.SUPPRESS]


def _exit_code(main, argv) -> int:
    try:
        return main(list(argv))
    except SystemExit as e:
        return e.code


# ---------------------------------------------------------------------------------------------- spelling
@pytest.mark.parametrize("row", PARSED, ids=[c.program for c in PARSED])
def test_shared_flags_are_spelled_and_parsed_as_the_table_says(row):
    shown, hidden = _options(row.parser())
    by_dest = {a.dest: a for a in shown if a.dest in VOCABULARY}
    assert set(by_dest) == row.concepts, "concepts offered differ from the row"
    for dest, action in by_dest.items():
        term = VOCABULARY[dest]
        assert tuple(action.option_strings) == term.flags, (dest, action.option_strings)
        parse = dict(term.parse)
        kind = parse.pop("action", None)
        assert kind is None or (kind == "store_true" and isinstance(action, argparse._StoreTrueAction)) \
            or isinstance(action, kind), (dest, type(action))
        assert all(getattr(action, k) == v for k, v in parse.items()), (dest, parse)
    flags = {f: d for d, t in VOCABULARY.items() for f in t.flags}
    old = {f for t in VOCABULARY.values() for olds in t.old.values() for f in olds}
    for action in shown:  # a shared spelling means the shared concept; an old spelling is never shown
        assert all(flags.get(f, action.dest) == action.dest for f in action.option_strings), action.option_strings
        assert not set(action.option_strings) & old, action.option_strings
    aliases = {(t.dest, f) for a in hidden for t in a.targets for f in a.option_strings}
    table = {(d, f) for d, t in VOCABULARY.items() if d in row.concepts for f in t.old.get(row.command, ())}
    assert aliases == table, "hidden old spellings differ from the table's"


def _value(term) -> list[str]:
    """A valid value of a term, as a user types it."""
    if term.parse.get("action") == "store_true":
        return []
    if term.parse.get("type") is int:
        return ["3"]
    if term.parse.get("type") is float or term.parse.get("item") is eps_value:
        return ["0.5"]
    return [term.parse["choices"][-1]] if "choices" in term.parse else ["x"]


OLD = [(c, d, f) for c in PARSED for d in sorted(c.concepts) for f in VOCABULARY[d].old.get(c.command, ())]


@pytest.mark.parametrize("row, dest, old", OLD, ids=[f"{c.program} {f}" for c, _, f in OLD])
def test_every_old_spelling_works_and_prints_one_deprecation_line(row, dest, old, capsys):
    term = VOCABULARY[dest]
    parser = row.parser()
    new = parser.parse_args([*row.required, term.flag, *_value(term)])
    capsys.readouterr()
    got = parser.parse_args([*row.required, old, *_value(term)])
    lines = capsys.readouterr().err.splitlines()
    assert getattr(got, dest) == getattr(new, dest)
    news = {t.flag for t in VOCABULARY.values() if old in t.old.get(row.command, ())}  # one old flag, several new
    head = f"{parser.prog}: warning: {old} is deprecated; use "
    assert len(lines) == 1 and lines[0].startswith(head) and set(lines[0][len(head):].split(" and ")) == news, lines


@pytest.mark.parametrize("row", [c for c in PARSED if {"eps", "attacks"} <= c.concepts], ids=lambda c: c.program)
def test_the_comma_form_of_a_list_still_works_with_one_line(row, capsys):
    parser = row.parser()
    got = parser.parse_args([*row.required, "--eps", "0,0.5", "1", "--attacks", "pgd"])
    lines = capsys.readouterr().err.splitlines()
    assert got.eps == [0.0, 0.5, 1.0] and got.attacks == ["pgd"]
    assert lines == [f"{parser.prog}: warning: --eps 0,0.5 1: comma-separated values are deprecated; "
                     f"write --eps 0 0.5 1"]
    assert isinstance([a for a in parser._actions if a.dest == "attacks"][0], SpaceList)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("row", COMMANDS, ids=[c.program for c in COMMANDS])
def test_a_usage_error_is_one_line_naming_the_program(row, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing a bad call might write lands in the checkout
    if row.setup:
        row.setup(monkeypatch)
    for argv in row.bad:
        code = _exit_code(row.main, argv)
        err = capsys.readouterr().err
        assert code == 2 and len(err.splitlines()) == 1, (argv, err)
        assert err.startswith(f"{row.program}: error: ") and "Traceback" not in err, (argv, err)


def _prints_an_error_line(node) -> bool:
    if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"):
        return False
    texts = [v.value for a in node.args for v in ast.walk(a) if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return any(re.search(r"(^|: )error: ", t) for t in texts)


def test_error_lines_come_from_the_one_helper():
    """No package module prints ``...error: ...`` itself but nnunet_ima/ui/errors.py (and, until part B,
    the two listed command lines)."""
    printing = set()
    for folder in ("nnunet_ima", "nnunet_ima_trainers", "eval"):
        for path in (ROOT / folder).rglob("*.py"):
            if any(_prints_an_error_line(n) for n in ast.walk(ast.parse(path.read_text()))):
                printing.add(path.relative_to(ROOT).as_posix())
    assert printing == OWN_ERROR_PRINTS | {"nnunet_ima/ui/errors.py"}


# ---------------------------------------------------------------------------------------------- README
def test_readme_holds_the_same_table():
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"## One vocabulary.*?\n\n(\|.*?)\n\n", readme, flags=re.S)
    assert section, "README needs a '## One vocabulary' section with the table"
    rows = section.group(1).splitlines()[2:]
    assert len(rows) >= len(VOCABULARY)
    for dest, term in VOCABULARY.items():
        spelled = re.compile(rf"`{re.escape(' / '.join(term.flags))}[` ]")
        (row,) = [r for r in rows if spelled.match(r.split("|")[2].strip())]
        for command, olds in term.old.items():
            assert all(f"`{old}`" in row.split("|")[3] for old in olds), (dest, row)
