"""Several processes for ``nnunet-ima-attack``: torch.distributed's rendezvous and key-value store.

    torchrun --standalone --nproc_per_node 4 -m nnunet_ima_eval <the arguments of nnunet-ima-attack>
    nnunet-ima-attack <arguments> --num-gpus 4        # the same on one machine, started by :func:`launch`

Each process (rank) joins the job with :func:`join` (torch.distributed's ``env://`` rendezvous: RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as torchrun or :func:`launch` set them) and gets a
:class:`World`: its rank, the number of ranks, and the job's key-value store (a c10d ``TCPStore``,
hosted by torchrun's agent or by rank 0). The ranks exchange no tensors: results go through the
shared output folder (:mod:`.shards`), and the store carries what all must agree on or see: rank 0's
work order, the progress counters, "done", and the first failure. A waiting rank polls the store,
so that a failure anywhere stops every rank (no rank hangs in a collective), and only the first
failure is reported: one line (:func:`run_as_rank`). One process is a World of size 1 with an
in-memory store, through the same code.

Each rank takes its own device (``cuda:LOCAL_RANK`` with ``--device cuda``, or the CPU) and its own
threads (``OMP_NUM_THREADS``, which torchrun sets to 1, else the CPUs divided among the node's ranks).
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from nnunet_ima.ui import UsageError, report_error, usage_error

from .errors import EvalError

PREFIX = "nnunet_ima_eval/"   # the job's keys in the store (+ torchrun's restart count: a restarted job starts afresh)
POLL_S = 0.1                  # how often a waiting rank looks at the store
JOIN_TIMEOUT = timedelta(minutes=30)
FAILED, STOPPED = 1, 1        # exit codes: a rank that failed; a rank stopped by another's failure
STOP_GRACE_S = 0.5            # a stopped rank waits this long before it exits
REAP_GRACE_S = 5.0            # after a failure, the launcher lets the other ranks stop by themselves this long


class Stopped(Exception):
    """Another rank failed (or the job's store is gone): this rank stops without a word."""


class UnitFailure(Exception):
    """An error while computing one unit: the one line names the rank and the unit."""

    def __init__(self, unit: str, cause: BaseException):
        super().__init__(f"{unit}: {cause.__class__.__name__}: {cause}")
        self.unit, self.cause = unit, cause


class LocalStore:
    """The store of a one-process World (or of Worlds in threads of one process): the c10d Store calls
    the code uses (set, get, add, check), thread-safe."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def set(self, key: str, value: bytes) -> None:
        with self.lock:
            self.data[key] = value

    def get(self, key: str) -> bytes:
        with self.lock:
            return self.data[key]

    def add(self, key: str, n: int) -> int:
        with self.lock:
            self.data[key] = str(int(self.data.get(key, b"0")) + n).encode()
            return int(self.data[key])

    def check(self, keys: list) -> bool:
        with self.lock:
            return all(k in self.data for k in keys)


@dataclass
class World:
    """This process's place in the job. ``store``: the job's key-value store (c10d Store or LocalStore).

    >>> world = join()                      # World(rank=0, size=1) without torchrun
    >>> world.publish("order", obj); world.receive("order")
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    store: object = field(default_factory=LocalStore)
    prefix: str = PREFIX
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _op(self, name: str, *args):
        try:
            with self.lock:
                return getattr(self.store, name)(*args)
        except (RuntimeError, OSError) as e:  # c10d's DistStoreError / DistNetworkError: the host is gone
            raise Stopped(f"the job's store is unreachable ({e.__class__.__name__})") from e

    def count(self, name: str, n: int = 0) -> int:
        """Add ``n`` to the job-wide counter ``name``; returns its value (n = 0: read it)."""
        return int(self._op("add", self.prefix + name, n))

    def publish(self, name: str, obj) -> None:
        """Rank 0 tells every rank ``obj`` under ``name`` (read with :meth:`receive`)."""
        self._op("set", self.prefix + name, pickle.dumps(obj))

    def receive(self, name: str):
        """What rank 0 published under ``name``, once it is there; :class:`Stopped` on a failure."""
        while not self._op("check", [self.prefix + name]):
            self.check_stop()
            time.sleep(POLL_S)
        return pickle.loads(self._op("get", self.prefix + name))

    def wait_count(self, name: str, n: int) -> None:
        """Wait until the counter ``name`` reaches ``n``; :class:`Stopped` on a failure."""
        while self.count(name) < n:
            self.check_stop()
            time.sleep(POLL_S)

    def check_stop(self) -> None:
        """:class:`Stopped` if a rank has failed."""
        if self.count("failures") > 0:
            raise Stopped("another rank failed")

    def claim_failure(self) -> bool:
        """True for the first rank to fail (it alone reports); False for later ones or without a store."""
        try:
            return self.count("failures", 1) == 1
        except Stopped:
            return False

    @contextlib.contextmanager
    def silenced(self):
        """Ranks > 0 print nothing (rank 0 speaks for the job); their failure line comes after this."""
        if self.is_main:
            yield
            return
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield

    def name(self) -> str:
        """``rank 1 of 4`` (empty for one process)."""
        return f"rank {self.rank} of {self.size}" if self.size > 1 else ""


# ---------------------------------------------------------------------------------------------- joining
def launched_rank() -> int:
    """This process's rank as torchrun / :func:`launch` set it (0 when not launched so)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def in_job() -> bool:
    """Whether this process is one of several ranks (WORLD_SIZE > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def join(timeout: timedelta = JOIN_TIMEOUT) -> World:
    """The World of this process: size 1 unless WORLD_SIZE > 1, else torch.distributed's ``env://``
    rendezvous (every rank must join; rank 0 or torchrun's agent hosts the store)."""
    if not in_job():
        return World()
    from torch.distributed import rendezvous

    store, rank, size = next(rendezvous("env://", timeout=timeout))
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return World(rank, size, local_rank, local_size, store, f"{PREFIX}{restart}/")


@contextlib.contextmanager
def only_rank0_speaks():
    """Argument parsing in a job: every rank parses the same arguments, rank 0 alone prints (errors,
    deprecation lines)."""
    if launched_rank() == 0:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def rank_device(world: World, device: str) -> str:
    """The device of this rank: ``device`` for one process; with several, ``cpu`` or ``cuda:LOCAL_RANK``
    (``--device cuda``; the GPU is made current)."""
    if world.size == 1 or device == "cpu":
        return device
    if device != "cuda":
        raise usage_error("--device", device, f"cpu or cuda with {world.size} processes (each process takes "
                                              f"cuda:LOCAL_RANK)")
    import torch

    n = torch.cuda.device_count()
    if world.local_rank >= n:
        raise EvalError(f"local rank {world.local_rank} needs cuda:{world.local_rank}, PyTorch sees {n} GPU(s) on "
                        f"this node: start at most {n} processes per node")
    torch.cuda.set_device(world.local_rank)
    return f"cuda:{world.local_rank}"


def rank_threads(world: World) -> int:
    """Intra-op threads of this rank: ``OMP_NUM_THREADS`` when set (torchrun sets 1), else the CPUs
    divided among the ranks of this node; one process keeps torch's default."""
    import torch

    if world.size > 1:
        env = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(int(env) if env.isdigit() and int(env) > 0 else max(1, cpu_count() // world.local_size))
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------- failures
def run_as_rank(program: str, out, body, world: World | None = None):
    """Join the job (or take ``world``) and return ``body(world)``; ranks > 0 silent. A failure is one line
    on stderr from the first rank that fails (naming the rank, and the unit when in one): a usage or
    input problem exits 2, any other error 1 with its traceback saved to ``<out>/errors/rank<R>.txt``;
    ranks stopped by another's failure exit 1 without a word."""
    world = world or join()
    try:
        with world.silenced():
            return body(world)
    except Stopped:  # a moment for the failing rank's line before a launcher reaps the job
        time.sleep(STOP_GRACE_S)
        return STOPPED
    except (EvalError, UsageError) as e:
        return _report(world, program, str(e), 2)
    except UnitFailure as e:
        return _report(world, program, f"unit {e}", FAILED, _save_traceback(out, world, e.cause)
                       + f"; finished units are kept in {Path(out) / 'shards'}, a rerun of any size computes the rest")
    except Exception as e:  # noqa: BLE001 - every error of a rank becomes the one line
        return _report(world, program, f"{e.__class__.__name__}: {e}", FAILED, _save_traceback(out, world, e))


def _report(world: World, program: str, message: str, code: int, where: str = "") -> int:
    if world.claim_failure():
        head = f"{world.name()}: " if world.size > 1 else ""
        report_error(program, f"{head}{message}{where}")
    return code


def clear_errors(out) -> None:
    """Remove the tracebacks of an earlier failed job (``<out>/errors``) after a job that succeeded."""
    folder = Path(out) / "errors"
    for f in folder.glob("rank*.txt") if folder.is_dir() else ():
        f.unlink()
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _save_traceback(out, world: World, e: BaseException) -> str:
    """Write the traceback of ``e`` to ``<out>/errors/rank<R>.txt``; returns " (traceback in ...)" or ""."""
    try:
        path = Path(out) / "errors" / f"rank{world.rank}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(e)))
        return f" (traceback in {path})"
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- launching
def check_num_gpus(n: int, device: str | None) -> None:
    """``--num-gpus N``: N >= 1, not under torchrun, and N GPUs here (one usage error line otherwise)."""
    if n < 1:
        raise usage_error("--num-gpus", n, "an integer >= 1")
    if n == 1:
        return
    if in_job():
        raise usage_error("--num-gpus", n, "no --num-gpus under torchrun: its --nproc_per_node starts the processes")
    cpu_hint = (f"for several CPU processes: torchrun --standalone --nproc_per_node {n} -m nnunet_ima_eval ... "
                f"--device cpu")
    if device not in (None, "cuda"):
        raise usage_error("--num-gpus", n, f"--device cuda or no --device (each process takes cuda:RANK), "
                                           f"not --device {device}; {cpu_hint}")
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < n:
        raise usage_error("--num-gpus", n, f"at most the {have} GPU(s) PyTorch sees here ({cpu_hint})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(program: str, argv: list[str], nprocs: int, command: list[str] | None = None) -> int:
    """Start ``nprocs`` ranks of ``command + argv`` (default ``python -m nnunet_ima_eval``) on this machine,
    as ``torchrun --standalone --nproc_per_node nprocs`` would (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT; OMP_NUM_THREADS = the CPUs divided among them unless set), and wait for them: when one
    fails the others are stopped and its exit code is returned (a rank killed by a signal gets the one
    line here).

    >>> launch("nnunet-ima-attack", ["-d", "4", "--eps", "2", "-o", "out", "--num-gpus", "1"], 2)
    """
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nprocs),
               LOCAL_WORLD_SIZE=str(nprocs))
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // nprocs)))
    command = command or [sys.executable, "-m", "nnunet_ima_eval"]
    procs = [subprocess.Popen([*command, *argv],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nprocs)]
    return supervise(program, procs)


def supervise(program: str, procs: list) -> int:
    """Wait for the ranks ``procs`` (rank = index); the first failure stops the rest."""
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                rank, code = bad[0]
                _wait(procs, REAP_GRACE_S)  # the others notice the failure at their next batch
                _stop(procs)
                if code < 0:  # killed by a signal: it could not say so itself
                    report_error(program, f"rank {rank} of {len(procs)} was killed by {signal.Signals(-code).name} "
                                          f"(out of memory?); finished units are kept, a rerun computes the rest")
                return code if code > 0 else FAILED
            if all(c == 0 for c in codes):
                return 0
            time.sleep(POLL_S)
    except KeyboardInterrupt:  # the ranks had it too: rank 0 says so
        _stop(procs)
        return 130


def _wait(procs: list, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(POLL_S)


def _stop(procs: list, grace: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
