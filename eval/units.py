"""The unit of work of ``nnunet-ima-attack`` and its share-out over the ranks of a job.

A unit is one test case (all its slices / tiles) of one run (model, attack, eps): what is stored,
reused and merged. Small cases are computed together in packs of whole cases (:func:`~.runner.pack_cases`:
they fill their batches), so a task is one pack of one run. Per model, rank 0 decides (:func:`plan_work`)
which runs are to compute (results.json cannot supply them), which of their units are finished already
(:mod:`.shards`, written by an earlier job of any size), and which rank computes each remaining pack
(the costliest first, onto the least loaded rank). It publishes this :class:`WorkOrder`; every rank
computes its share (:func:`compute_share`), writing each finished unit atomically; rank 0 shows the
progress of all (:class:`Progress`), waits until every rank is done and merges each run
(:func:`merge_runs`) only when all its units are there. A unit's numbers depend neither on the rank
nor on the number of ranks (:mod:`.runner`: packs and batches are fixed by the test set, each sample's
random start has its own seed).

Test hook: ``IMA_EVAL_FAIL_AFTER=R:K`` makes rank R raise when it starts its unit K+1 (after K
finished units), as a rank that dies in the middle of a job.
"""
from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass

import numpy as np

from .data import SampleRef, sample_refs
from .distributed import Stopped, UnitFailure, World
from .errors import EvalError
from .metrics import Counts
from .runner import CLEAN, Evaluation, Evaluator
from .shards import ShardStore

FAIL_AFTER_VAR = "IMA_EVAL_FAIL_AFTER"


@dataclass(frozen=True)
class Task:
    """One pack of whole cases (:func:`~.runner.pack_cases`) of one run: ``run`` indexes
    :attr:`WorkOrder.runs`, ``pack`` :attr:`WorkOrder.packs`; ``units``: its cases still to write (all of
    them, unless an earlier job wrote some); ``weight`` = input elements x network passes, the cost
    estimate behind the share-out and the progress bar."""

    run: int
    pack: int
    units: tuple
    weight: int


@dataclass
class WorkOrder:
    """Rank 0's decision for one model, published to every rank."""

    model: str
    job: str                  # this job's id (recorded with each unit it computes)
    runs: list                # the run keys to compute
    inputs: dict              # their provenance (one model: the same for every run)
    units: dict               # every unit (case id) -> its samples' starts, in the evaluation's order
    packs: list               # pack id -> its case ids
    shares: list              # per rank, its tasks (run by run, pack by pack)
    finished: int             # units of these runs found finished on disk
    keep: frozenset = frozenset()  # (case id, start) of the samples to save as examples (--save-examples)

    def share(self, rank: int) -> list[Task]:
        return self.shares[rank] if rank < len(self.shares) else []

    @property
    def tasks(self) -> list[Task]:
        return [t for s in self.shares for t in s]

    @property
    def todo(self) -> int:
        """Units to compute."""
        return sum(len(t.units) for t in self.tasks)

    @property
    def total(self) -> int:
        return sum(t.weight for t in self.tasks)

    def cases_of(self, rank: int) -> list[str]:
        """The cases rank ``rank`` needs (every case of its packs), in the evaluation's order."""
        mine = {c for t in self.share(rank) for c in self.packs[t.pack]}
        return [u for u in self.units if u in mine]

    def describe(self, size: int) -> str:
        n = len(self.runs) * len(self.units)
        where = f"on {size} processes" if size > 1 else "in this process"
        done = f"{self.finished} of {n} units finished by an earlier job (kept), " if self.finished else ""
        return f"{self.model}: {done}{self.todo} of {n} units to compute {where}"


def passes(ev: Evaluator, key: dict) -> int:
    """Network passes per sample of a run: 1 (a prediction), + its steps when it attacks (eps > 0)."""
    attacks = key["attack"] != CLEAN and key["eps"] > 0
    return 1 + (ev.settings.steps(key["attack"]) if attacks else 0)


def assign(tasks: list[Task], n: int) -> list[list[Task]]:
    """Longest processing time first: each task, costliest first, to the least loaded of ``n`` ranks;
    each rank's share back in the plan's order (run by run, pack by pack).

    >>> [[t.pack for t in s] for s in assign([Task(0, 0, ("a",), 3), Task(0, 1, ("b",), 2), Task(0, 2, ("c",), 2)], 2)]
    [[0], [1, 2]]
    """
    position = {t: i for i, t in enumerate(tasks)}
    shares, load = [[] for _ in range(n)], [0] * n
    for t in sorted(tasks, key=lambda t: (-t.weight, position[t])):
        r = min(range(n), key=lambda i: (load[i], i))
        shares[r].append(t)
        load[r] += t.weight
    return [sorted(s, key=position.__getitem__) for s in shares]


def plan_work(world: World, ev: Evaluator, model: str, runs: list[dict], inputs: dict, shards: ShardStore,
              reuse: bool = True, keep: set = frozenset()) -> WorkOrder:
    """Rank 0: the units of ``runs`` still to compute (finished ones on disk are kept when ``reuse``), by
    pack, shared out over the ranks; ``keep``: the evaluator's sample refs to save as examples."""
    packs = [ev.pack_cases[i] for i in sorted(ev.packs)]
    units = {c: [] for p in packs for c in p}
    for r in ev.refs:
        units[ev.cases[r.case].name].append(r.start)
    tasks, finished = [], 0
    for i, key in enumerate(runs):
        done = set(shards.finished(key, inputs, units)) if reuse else set()
        finished += len(done)
        for pid, names in enumerate(packs):
            missing = tuple(c for c in names if c not in done)
            if missing:
                tasks.append(Task(i, pid, missing, sum(b.x.numel() for b in ev.packs[pid]) * passes(ev, key)))
    kept = frozenset((ev.cases[r.case].name, r.start) for r in keep)
    return WorkOrder(model, uuid.uuid4().hex[:8], runs, inputs, units, packs, assign(tasks, world.size), finished, kept)


def share_packs(cases: list, dim: int, patch_size: tuple, order: WorkOrder, rank: int) -> dict[int, list[SampleRef]]:
    """{pack id: its samples} of rank ``rank``'s share, among ``cases`` (the cases of the share, loaded
    here); EvalError when a case here has other samples than rank 0 saw (other data on this node)."""
    index = {c.name: i for i, c in enumerate(cases)}
    out = {}
    for pid in dict.fromkeys(t.pack for t in order.share(rank)):
        refs = []
        for name in order.packs[pid]:
            have = {r.start: r.size for r in sample_refs([cases[index[name]]], dim, patch_size)}
            for start in order.units[name]:
                if tuple(start) not in have:
                    raise EvalError(f"case {name} has no sample at {tuple(start)} here, unlike on rank 0: is the "
                                    f"test data the same on every node?")
                refs.append(SampleRef(index[name], tuple(start), have[tuple(start)]))
        out[pid] = refs
    return out


def fail_after(rank: int) -> int | None:
    """The test hook: K when ``IMA_EVAL_FAIL_AFTER`` is ``<rank>:K``."""
    r, _, k = os.environ.get(FAIL_AFTER_VAR, "").partition(":")
    return int(k) if r.strip().isdigit() and int(r) == rank and k.strip().isdigit() else None


def describe_unit(model: str, key: dict, unit: str) -> str:
    return f"{model} {key['attack']} eps={key['eps']:g} case {unit}"


def describe_task(model: str, key: dict, task: Task) -> str:
    """``STD pgd eps=2 case c7``, ``... case c7 (and 2 more of its pack)``."""
    more = f" (and {len(task.units) - 1} more of its pack)" if len(task.units) > 1 else ""
    return describe_unit(model, key, task.units[0]) + more


def split_cases(evaluation: Evaluation) -> dict[str, Evaluation]:
    """A pack's evaluation cut into one per case (its samples in order; seconds shared by samples)."""
    c, names = evaluation.counts, np.array(evaluation.counts.cases)
    out = {}
    for name in dict.fromkeys(c.cases):
        idx = np.flatnonzero(names == name)
        out[name] = Evaluation(evaluation.attack, evaluation.eps,
                               Counts(c.tp[idx], c.fp[idx], c.fn[idx], [name] * len(idx)),
                               evaluation.seconds * len(idx) / max(c.n, 1), [], evaluation.convention,
                               evaluation.distance[idx], evaluation.on_pad[idx])
    return out


class SampleWork:
    """The sample scope's tasks: a pack's batches through :meth:`~.runner.Evaluator.run`; the order's
    examples saved through ``save_examples(ev, key, evaluation, batches)``."""

    def __init__(self, ev: Evaluator, save_examples=None):
        self.ev, self.save_examples = ev, save_examples

    def compute(self, order: WorkOrder, task: Task, progress) -> Evaluation:
        """The evaluation of ``task``; ``progress(amount)`` after each batch (its share of the task's weight)."""
        ev, key = self.ev, order.runs[task.run]
        batches = ev.packs[task.pack]
        mine = {r for b in batches for r in b.refs if (ev.cases[r.case].name, r.start) in order.keep}
        per_pass = passes(ev, key)
        evaluation = ev.run(key["attack"], key["eps"], batches=batches, keep=mine,
                            on_batch=lambda b: progress(b.x.numel() * per_pass))
        if evaluation.examples and self.save_examples is not None:
            self.save_examples(ev, key, evaluation, batches)
        return evaluation


def compute_share(world: World, work, order: WorkOrder, shards: ShardStore) -> int:
    """Compute this rank's tasks (``work.compute(order, task, progress) -> Evaluation``: :class:`SampleWork`,
    or the case scope's :class:`~.case_scope.CaseWork`), each finished unit written at once; returns how many
    units. Raises :class:`UnitFailure` naming the unit on any error, :class:`Stopped` when another rank
    failed."""
    stop_at, written = fail_after(world.rank), 0
    for task in order.share(world.rank):
        key = order.runs[task.run]
        try:
            if stop_at is not None and written >= stop_at:
                raise RuntimeError(f"injected failure after {written} units ({FAIL_AFTER_VAR}={world.rank}:{stop_at})")
            written += _compute_task(world, work, order, shards, task)
        except (Stopped, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - any error of a unit stops the job, naming it
            raise UnitFailure(describe_task(order.model, key, task), e) from e
    return written


def _compute_task(world: World, work, order: WorkOrder, shards: ShardStore, task: Task) -> int:
    def progress(amount: int) -> None:
        world.count(f"{order.model}/work", int(amount))
        world.check_stop()

    key = order.runs[task.run]
    evaluation = work.compute(order, task, progress)
    meta = {"rank": world.rank, "world_size": world.size, "job": order.job}
    parts = split_cases(evaluation)
    for name in task.units:
        shards.write(key, order.inputs, name, order.units[name], parts[name], meta)
        world.count(f"{order.model}/units", 1)
    return len(task.units)


def merge_runs(order: WorkOrder, shards: ShardStore, convention: str,
               complete_only: bool = False) -> list[tuple[dict, Evaluation, dict]]:
    """Per run of ``order``: (key, its Evaluation merged from every unit in the evaluation's order, the
    record of each unit: rank, world size, job, seconds). EvalError if a unit is missing (with
    ``complete_only``: such runs are left out): a merged result never has samples missing."""
    out = []
    for key in order.runs:
        parts, missing = shards.merge(key, order.inputs, order.units)
        if missing and complete_only:
            continue
        if missing:
            raise EvalError(f"{describe_unit(order.model, key, missing[0])}: not finished although every rank is "
                            f"done ({len(missing)} units missing); nothing merged, a rerun computes them")
        counts = Counts.empty(parts[0].counts.tp.shape[1])
        for p in parts:
            counts.add(p.counts.tp, p.counts.fp, p.counts.fn, p.counts.cases)
        evaluation = Evaluation(key["attack"], float(key["eps"]), counts, sum(p.meta["seconds"] for p in parts),
                                [], convention, np.concatenate([p.distance for p in parts]),
                                np.concatenate([p.on_pad for p in parts]))
        fields = ("rank", "world_size", "job", "seconds")
        record = {u: {k: p.meta[k] for k in fields} for u, p in zip(order.units, parts)}
        out.append((key, evaluation, record))
    return out


class Progress:
    """Rank 0's one progress bar over every rank's work (from the job's counters): share done, units
    finished, elapsed and expected time. A no-op when ``enabled`` is False.

    >>> with Progress(world, order):
    ...     compute_share(world, SampleWork(ev), order, shards)
    """

    def __init__(self, world: World, order: WorkOrder, enabled: bool = True):
        self.world, self.order, self.enabled = world, order, enabled and bool(order.tasks)
        self.stop = threading.Event()
        self.bar = self.thread = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.order.total, leave=False, dynamic_ncols=True, desc=self.describe(0),
                            bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.stop.wait(0.5):
            self.update()

    def update(self) -> None:
        try:
            work, units = self.world.count(f"{self.order.model}/work"), self.world.count(f"{self.order.model}/units")
        except Stopped:
            return
        self.bar.set_description_str(self.describe(units), refresh=False)
        self.bar.update(max(0, min(work, self.order.total) - self.bar.n))

    def describe(self, units: int) -> str:
        where = f" on {self.world.size} processes" if self.world.size > 1 else ""
        return f"{self.order.model}: {units}/{self.order.todo} units{where}"

    def __exit__(self, *exc) -> None:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.update()
            self.bar.close()


def lead(world: World, work, order: WorkOrder, shards: ShardStore, progress: bool) -> None:
    """Rank 0: publish ``order``, compute its own share (``work``, as :func:`compute_share`) under the one
    progress bar, wait for every rank."""
    world.publish(f"{order.model}/order", order)
    with Progress(world, order, progress):
        compute_share(world, work, order, shards)
        world.count(f"{order.model}/done", 1)
        world.wait_count(f"{order.model}/done", world.size)


def skip(world: World, model: str) -> None:
    """Rank 0, nothing to compute for ``model``: tell the ranks, wait until each has heard it."""
    world.publish(f"{model}/order", None)
    world.count(f"{model}/done", 1)
    world.wait_count(f"{model}/done", world.size)


def follow(world: World, model: str, load, shards: ShardStore) -> None:
    """Ranks > 0: wait for rank 0's order for ``model``, compute this rank's share (``load(order)``: the work
    over the cases of the share, as :func:`compute_share` takes it), say done."""
    order = world.receive(f"{model}/order")
    if order is not None and order.share(world.rank):
        compute_share(world, load(order), order, shards)
    world.count(f"{model}/done", 1)
