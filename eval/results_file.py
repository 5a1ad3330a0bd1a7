"""The one reader of an output folder's ``results.json`` (the store, ``read_table``, ``read_sample_dice``).

A file that is not JSON, not an object, or whose lists are not lists is *damaged* as a whole
(:class:`ResultsFileError`, one line naming the file and what is wrong). Inside a sound file, an entry
with the wrong structure is left out with one message per kind naming the file and the first reason,
so one hand-edited entry costs that result, not all of them. A run's ``samples`` file must lie inside
the output folder (:func:`inside`): the tool reads, renames and removes files there only.

>>> parsed = read_results(Path("out"))
>>> parsed.runs, parsed.rows, parsed.problems
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from numbers import Number
from pathlib import Path


class ResultsFileError(ValueError):
    """``results.json`` cannot be used at all; the message names the file and what is wrong."""


@dataclass
class ParsedResults:
    version: object = None
    runs: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    per_case: list = field(default_factory=list)
    checks: list = field(default_factory=list)
    sanity: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # one sentence per kind of entry left out


def inside(out: Path, rel) -> Path | None:
    """``out / rel`` when ``rel`` is a relative path that stays inside ``out`` (symbolic links resolved),
    else None. The one rule for any file of a results entry the tool reads, renames or removes."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel):
        return None
    root = Path(out).resolve()
    path = (root / rel).resolve()
    return root / path.relative_to(root) if path != root and path.is_relative_to(root) else None


def _is_number(v) -> bool:
    return isinstance(v, Number) and not isinstance(v, bool)


def _run_problem(out: Path, e) -> str | None:
    if not isinstance(e, dict) or not isinstance(e.get("key"), dict) or not isinstance(e.get("inputs"), dict):
        return "no 'key' and 'inputs' objects"
    k = e["key"]
    if not (isinstance(k.get("model"), str) and isinstance(k.get("attack"), str) and _is_number(k.get("eps"))):
        return "its key has no model, attack and eps"
    if inside(out, e.get("samples")) is None:
        return f"its samples file {e.get('samples')!r} lies outside {out}"
    if not isinstance(e.get("classes", {}), dict) or not _is_number(e.get("seconds", 0)):
        return "its classes or seconds have the wrong type"
    return None


def _row_problem(r) -> str | None:
    if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("model", "attack", "class")):
        return "no model, attack and class"
    try:
        float(r.get("eps"))
    except (TypeError, ValueError):
        return "no numeric eps"
    return None


def _check_problem(c) -> str | None:
    ok = isinstance(c, dict) and all(isinstance(c.get(k), str) for k in ("model", "check", "status", "message"))
    return None if ok else "no model, check, status and message"


def _sanity_problem(s) -> str | None:
    if not isinstance(s, dict) or not isinstance(s.get("key"), dict) or not isinstance(s.get("inputs"), dict):
        return "no 'key' and 'inputs' objects"
    checks = s.get("checks")
    return None if isinstance(checks, list) and all(_check_problem(c) is None for c in checks) else "no list of checks"


def _keep(path: Path, kind: str, entries: list, problem, problems: list) -> list:
    """The entries without a problem; one sentence in ``problems`` for those left out."""
    judged = [(e, problem(e)) for e in entries]
    bad = [why for _, why in judged if why]
    if bad:
        problems.append(f"{path}: {len(bad)} {kind} ignored ({bad[0]}); what they held is recomputed")
    return [e for e, why in judged if not why]


def read_results(out) -> ParsedResults | None:
    """The parsed ``out/results.json`` (None when there is none); :class:`ResultsFileError` when damaged."""
    path = Path(out) / "results.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ResultsFileError(f"{path} is damaged ({e.__class__.__name__}: {str(e)[:80]})") from None
    if not isinstance(data, dict):
        raise ResultsFileError(f"{path} is damaged (not a JSON object)")
    lists = {k: data.get(k, []) for k in ("runs", "rows", "per_case", "checks", "sanity")}
    wrong = [k for k, v in lists.items() if not isinstance(v, list)]
    if wrong:
        raise ResultsFileError(f"{path} is damaged ({', '.join(wrong)}: not a list)")
    parsed = ParsedResults(version=data.get("version"))
    parsed.runs = _keep(path, "run entries", lists["runs"], lambda e: _run_problem(Path(out), e), parsed.problems)
    parsed.rows = _keep(path, "rows", lists["rows"], _row_problem, parsed.problems)
    parsed.per_case = _keep(path, "per-case rows", lists["per_case"],
                            lambda r: None if isinstance(r, dict) and isinstance(r.get("model"), str) else "no model",
                            parsed.problems)
    parsed.checks = _keep(path, "checks", lists["checks"], _check_problem, parsed.problems)
    parsed.sanity = _keep(path, "sanity-check entries", lists["sanity"], _sanity_problem, parsed.problems)
    return parsed
