"""Which rank this process is, and which transport the engine uses.

Rank discovery: an initialized ``torch.distributed`` first (Megatron's order), else the
launcher's variables as the C++ detector reads them (``detect_launch()``, celo2/launch.h:
torchrun ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, then Slurm ``SLURM_PROCID``/
``SLURM_NTASKS``/``SLURM_LOCALID``, then Open MPI ``OMPI_COMM_WORLD_RANK``/``_SIZE``/
``_LOCAL_RANK``). Python does not read those variables itself: the detector is the one
in the C++ library, reached through the extension (``celo2._launch``), so Python, the C++
communicators and the NCCL bootstrap always agree. A malformed or inconsistent variable
raises ``celo2.CommError`` naming it.

The transport (``choose_communicator``) is chosen in this one place:

- one rank: ``"local"``;
- an MPI launcher started the job (mpirun, srun --mpi=pmix) and its ranks are the ranks
  discovered above: ``"mpi"`` (the C++ MPI communicator, no Python in the data path);
- otherwise an initialized ``torch.distributed`` (torchrun): ``TorchCommunicator``, the
  engine's collectives over a gloo process group (initialized here from torchrun's
  variables when the trainer has not done it yet).

A launch that fits none of these raises ``RuntimeError`` saying what is missing.
"""
from __future__ import annotations

import atexit
import datetime
import importlib.machinery
import importlib.util
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    source: str  # torch.distributed | torchrun | slurm | openmpi | none


_LAUNCH = None


def _launch_module():
    """The extension's launcher detector: ``_celo2`` itself when it registers the functions,
    else ``celo2._launch``, a second module name the same shared object answers to."""
    global _LAUNCH
    if _LAUNCH is None:
        from . import _celo2  # noqa: PLC0415

        if hasattr(_celo2, "detect_launch"):
            _LAUNCH = _celo2
        else:
            name = f"{__package__}._launch"
            mod = sys.modules.get(name)
            if mod is None:
                loader = importlib.machinery.ExtensionFileLoader(name, _celo2.__file__)
                spec = importlib.util.spec_from_file_location(name, _celo2.__file__, loader=loader)
                mod = importlib.util.module_from_spec(spec)
                loader.exec_module(mod)
                sys.modules[name] = mod
            _LAUNCH = mod
    return _LAUNCH


def detect_launch() -> dict:
    """The launcher that started this process, as the C++ ``celo2::detect_launch()`` reads it:
    ``launcher`` (torchrun, slurm, openmpi or none), ``rank``, ``size``, ``local_rank``,
    ``local_size`` (-1: unknown), the variable each came from (``rank_from``, ...), the MPI
    launcher (``mpi_launcher``, ``mpi_rank``, ``mpi_size``; -1: unknown), ``master_addr``,
    ``master_port`` and ``describe`` (one line for people)."""
    return _launch_module().detect_launch()


def _torch_dist():
    try:
        import torch.distributed as dist  # noqa: PLC0415 (optional dependency)
    except ImportError:
        return None
    if not dist.is_available():
        return None
    return dist


def discover_rank() -> RankInfo:
    """Rank, world size and local rank: torch.distributed when initialized, else the
    launcher's (see the module docstring)."""
    launch = detect_launch()
    dist = _torch_dist()
    if dist is not None and dist.is_initialized():
        return RankInfo(dist.get_rank(), dist.get_world_size(), launch["local_rank"], "torch.distributed")
    return RankInfo(launch["rank"], launch["size"], launch["local_rank"], launch["launcher"])


def mpi_launched() -> tuple[int, int] | None:
    """(rank, size) when an MPI launcher started more than one rank, else None: mpirun,
    srun --mpi=pmix, or plain srun unless CELO2_SLURM_MPI=0 (srun + torchrun jobs)."""
    launch = detect_launch()
    if launch["mpi_size"] > 1 and launch["mpi_rank"] >= 0:
        return launch["mpi_rank"], launch["mpi_size"]
    return None


def comm_timeout_s() -> float:
    """``CELO2_COMM_TIMEOUT_S`` as the C++ library reads it (celo2/params.h; 0: no limit)."""
    return _launch_module().param_value("CELO2_COMM_TIMEOUT_S")


# gloo needs a finite timeout: "no limit" (CELO2_COMM_TIMEOUT_S=0) is a year.
_NO_LIMIT = datetime.timedelta(days=365)

# What gloo (PyTorch 1.13) says when a peer's process is gone (its sockets were closed or
# reset) and when a peer did not take part in time.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
_TIMED_OUT = ("Timed out waiting",)



class TorchCommunicator:
    """The engine's collectives over a torch.distributed gloo group (CPU tensors sharing
    the engine's memory through NumPy). Used under torchrun, where no MPI is running.

    The collectives run on a gloo group of their own, created here with the timeout
    ``CELO2_COMM_TIMEOUT_S`` (default 600 s; 0: no limit), so a collective that some ranks
    never join fails instead of hanging. gloo's errors become ``celo2.CommError`` naming the
    collective and this rank and telling the two failures gloo can tell apart: a peer whose
    process is gone (gloo: the connection was closed) and a peer that is alive but did not
    join in time (gloo: timed out: a collective called on some ranks only, or a hung rank).
    Given ``group=``, the collectives run on that group with the timeout it was created with.

    gloo in PyTorch 1.13 has no reduce-scatter and no uneven all-gather: reduce-scatter is an
    all-reduce of the whole buffer, all-gather pads to the largest count. Both are correct;
    use MPI or NCCL transports where their cost matters.
    """

    def __init__(self, group=None):
        dist = _torch_dist()
        if dist is None or not dist.is_initialized():
            raise RuntimeError("TorchCommunicator needs an initialized torch.distributed")
        import torch  # noqa: PLC0415

        self._torch = torch
        self._dist = dist
        self._timeout_s = None
        if group is None:
            # Collective over the default group (every rank builds its optimizer). gloo: the
            # engine's buffers are in host memory, which NCCL groups cannot move.
            self._timeout_s = comm_timeout_s()
            timeout = datetime.timedelta(seconds=self._timeout_s) if self._timeout_s > 0 else _NO_LIMIT
            group = dist.new_group(backend="gloo", timeout=timeout)
        self._group = group
        self._rank = dist.get_rank(group)
        self._size = dist.get_world_size(group)
        self._global = [self._to_global(r) for r in range(self._size)]

    def _failed(self, op, error, waited=0.0):
        """celo2.CommError for a gloo error in collective `op` after `waited` seconds, saying
        what happened, on which rank, and what to do."""
        from ._celo2 import CommError  # noqa: PLC0415

        global _comm_failed
        _comm_failed = True
        text = str(error)
        gloo = text.split("] ", 1)[-1] if text.startswith("[") else text  # without gloo's file:line
        where = (f"celo2: rank {self._global[self._rank]} of {self._size}: {op} over "
                 "torch.distributed/gloo")
        limit = (f"{self._timeout_s:g} s (CELO2_COMM_TIMEOUT_S)" if self._timeout_s is not None
                 else "the timeout of the group given to TorchCommunicator")
        # Every rank has the same CELO2_COMM_TIMEOUT_S, and gloo closes a pair's connection
        # when its own collective times out: a peer that closes as this rank's limit comes up
        # timed out itself (alive, elsewhere), it did not die.
        peer_timed_out = self._timeout_s is not None and self._timeout_s > 0 and waited >= self._timeout_s - 1.0
        if any(k in text for k in _PEER_GONE) and peer_timed_out:
            msg = (f"{where} did not complete within {limit}: a peer closed its connection when its "
                   f"own limit ran out, so the other ranks are alive but in a different collective "
                   f"or none, or hung. {_launch_module().HANG_FIX} (gloo: {gloo})")
        elif any(k in text for k in _PEER_GONE):
            msg = (f"{where} failed: a peer rank died (its process is gone: gloo reports its "
                   f"connection closed). Look at the other ranks' output for the first error; "
                   f"this job cannot continue. (gloo: {gloo})")
        elif any(k in text for k in _TIMED_OUT):
            msg = (f"{where} did not complete within {limit}: the other ranks are alive (their "
                   f"connections are open) but in a different collective or none, or hung. {_launch_module().HANG_FIX} "
                   f"(gloo: {gloo})")
        else:
            msg = f"{where} failed: {gloo}"
        return CommError(msg)

    def _run(self, op, fn, *args, **kwargs):
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            raise self._failed(op, e, time.monotonic() - t0) from e

    def _to_global(self, r):
        if self._group is None:
            return r
        try:
            return self._dist.distributed_c10d._get_global_rank(self._group, r)
        except AttributeError:  # newer PyTorch
            return self._dist.get_global_rank(self._group, r)

    def rank(self):
        return self._rank

    def size(self):
        return self._size

    def backend(self):
        return "torch.distributed/gloo"

    def _t(self, a):
        return self._torch.from_numpy(a)

    def all_reduce_sum(self, a):
        self._run("all_reduce", self._dist.all_reduce, self._t(a), group=self._group)

    def reduce_scatter_sum(self, send, recv, counts):
        full = self._t(send).clone()
        self._run("reduce_scatter", self._dist.all_reduce, full, group=self._group)
        lo = sum(counts[: self._rank])
        self._t(recv).copy_(full[lo : lo + counts[self._rank]])

    def all_gather(self, send, recv, counts):
        torch = self._torch
        width = max(counts) if counts else 0
        if width == 0:
            return
        mine = torch.zeros(width, dtype=torch.float32)
        mine[: counts[self._rank]] = self._t(send)
        parts = [torch.empty(width, dtype=torch.float32) for _ in counts]
        self._run("all_gather", self._dist.all_gather, parts, mine, group=self._group)
        out, at = self._t(recv), 0
        for part, n in zip(parts, counts):
            out[at : at + n] = part[:n]
            at += n

    def all_to_all_v(self, send, send_counts, recv, recv_counts):
        self._run("all_to_all", self._dist.all_to_all_single,
                  self._t(recv), self._t(send), output_split_sizes=list(recv_counts),
                  input_split_sizes=list(send_counts), group=self._group)

    def broadcast(self, a, root):
        self._run("broadcast", self._dist.broadcast, self._t(a), src=self._global[root],
                  group=self._group)

    def barrier(self):
        self._run("barrier", self._dist.barrier, group=self._group)

    def split(self, color, key):
        """Collective: a TorchCommunicator for the ranks of this one's that pass the same
        ``color`` (the engine's Newton–Schulz groups). torch.distributed.new_group must be
        called by every process for every group, so every rank's (colour, key) is gathered
        first and the groups are made in colour order; within a group ranks keep this
        communicator's order (torch orders a group by global rank; ``key`` must not reorder
        them). Needs this communicator to span every process."""
        dist, torch = self._dist, self._torch
        if self._size != dist.get_world_size():
            raise RuntimeError("TorchCommunicator.split needs a communicator over every process "
                               f"({self._size} of {dist.get_world_size()})")
        both = torch.zeros(2 * self._size, dtype=torch.float64)
        both[2 * self._rank] = float(color)
        both[2 * self._rank + 1] = float(key)
        self._run("split", dist.all_reduce, both, group=self._group)
        colors = [int(both[2 * r]) for r in range(self._size)]
        keys = [int(both[2 * r + 1]) for r in range(self._size)]
        mine = None
        for c in sorted(set(colors)):
            members = [r for r in range(self._size) if colors[r] == c]
            if [keys[r] for r in members] != sorted(keys[r] for r in members):
                raise ValueError(f"TorchCommunicator.split: keys {[keys[r] for r in members]} of colour {c} "
                                 "reorder the ranks; torch groups keep global-rank order")
            timeout = datetime.timedelta(seconds=self._timeout_s) if self._timeout_s and self._timeout_s > 0 else _NO_LIMIT
            group = dist.new_group(ranks=[self._global[r] for r in members], backend="gloo", timeout=timeout)
            if c == color:
                mine = group
        sub = TorchCommunicator(group=mine)
        sub._timeout_s = self._timeout_s
        return sub


def _init_torch_from_env(info: RankInfo):
    dist = _torch_dist()
    if dist is None:
        raise RuntimeError(
            f"{info.world_size} ranks from the launcher's variables, but torch.distributed is "
            "unavailable and no MPI launcher started this process")
    launch = detect_launch()
    if not launch["master_addr"] or not launch["master_port"]:
        raise RuntimeError(
            f"{info.world_size} ranks ({info.source}), no MPI launcher and no torch.distributed: call "
            "torch.distributed.init_process_group() first, or set MASTER_ADDR and MASTER_PORT")
    timeout_s = comm_timeout_s()
    dist.init_process_group("gloo", rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s) if timeout_s > 0 else _NO_LIMIT)
    # A gloo group still open at interpreter exit can abort the process ("terminate called
    # without an active exception") in PyTorch 1.13; close the group we opened.
    atexit.register(_close_process_group)


_comm_failed = False  # a collective of this process failed: its peers cannot be waited for


def _dying_of_uncaught_exception():
    """Whether this process is exiting because of an uncaught exception: the interpreter
    sets sys.last_value before the atexit hooks run. The exception, or None."""
    return getattr(sys, "last_value", None)


def _abort_mpi_after_uncaught_exception():
    """At exit, after an uncaught exception (Python sets sys.last_value before atexit runs),
    in a job of two or more MPI ranks: MPI_Abort, so that mpirun ends every rank now. Left to
    MPI_Finalize, this rank would wait for the others, which may be waiting for it in a
    collective (an optimizer step, a barrier): the job would sit until CELO2_COMM_TIMEOUT_S.
    Registered at import; does nothing where MPI is not running."""
    exc = _dying_of_uncaught_exception()
    if exc is None:
        return
    from . import _celo2  # noqa: PLC0415

    _celo2.abort_mpi_world(1, f"uncaught {type(exc).__name__}")


atexit.register(_abort_mpi_after_uncaught_exception)


def _close_process_group():
    dist = _torch_dist()
    if dist is not None and dist.is_initialized():
        # No barrier when a collective failed here or the process dies of an uncaught
        # exception: its peers may be gone or stuck, and waiting for them would keep this
        # process alive, so that they would see a hung rank instead of a dead one.
        try:
            if not _comm_failed and _dying_of_uncaught_exception() is None:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def choose_communicator(kind="auto"):
    """What celo2.Engine takes as its communicator: "local", "mpi", a celo2.Communicator,
    or an object with the collectives (TorchCommunicator). See the module docstring."""
    if not isinstance(kind, str):
        return kind  # a celo2.Communicator or a duck-typed object
    if kind in ("local", "mpi"):
        return kind
    if kind == "torch":
        return TorchCommunicator()
    if kind != "auto":
        raise ValueError(f"communicator={kind!r}: expected 'auto', 'local', 'mpi', 'torch' or an object")
    info = discover_rank()
    if info.world_size == 1:
        return "local"
    mpi = mpi_launched()
    if mpi is not None and mpi == (info.rank, info.world_size):
        return "mpi"
    if info.source == "torch.distributed":
        return TorchCommunicator()
    if info.source == "torchrun":
        _init_torch_from_env(info)
        return TorchCommunicator()
    if mpi is not None:
        return "mpi"
    raise RuntimeError(
        f"{info.world_size} ranks ({info.source}) but no transport: start the job with mpirun or "
        "srun --mpi=pmix, or initialize torch.distributed")


def make_communicator(kind="auto"):
    """A celo2.Communicator for ``kind`` (see choose_communicator): what a trainer uses to
    share the engine's transport for its own sums (losses, a baseline's gradients)."""
    from . import _celo2  # noqa: PLC0415

    chosen = choose_communicator(kind)
    if isinstance(chosen, str):
        return _celo2.Communicator(chosen)
    if isinstance(chosen, _celo2.Communicator):
        return chosen
    return _celo2.wrap_communicator(chosen)
