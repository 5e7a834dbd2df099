"""MPI for spread_dials programs, in the style of cctbx.xfel: ranks stripe the work.

``mpi_context(params.mp.method)`` gives a :class:`Parallel` with ``rank``, ``size``,
``stripe(items)`` (rank r takes items r, r + size, ... like cctbx.xfel's ``iterable[rank::size]``),
``barrier``, ``gather``/``allgather``/``bcast`` of picklable objects and ``reduce``/``allreduce``
of simple numbers.  With ``mp.method=serial``, without mpi4py, or when MPI cannot start, it is a
one-rank stand-in with the same methods, and a note in the log says why.

Example (run with ``mpirun -n 4 dials.spread_simulate mp.method=mpi ...``)::

    mpi = mpi_context(params.mp.method)
    mine = mpi.stripe(range(n_images))
    counts = mpi.gather(simulate(mine))          # list of per-rank results on rank 0, else None
    total = mpi.reduce(len(mine))                # sum over ranks on rank 0, else None
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterable
from typing import Any, TypeVar

from spread_dials.util.errors import SpreadError

__all__ = ["METHODS", "Parallel", "assign_gpu", "launcher_rank", "launcher_size", "mpi_context"]

logger = logging.getLogger("dials.spread.parallel")

METHODS = ("serial", "mpi")
_OPS = ("sum", "max", "min", "prod")
# environment variables that MPI launchers set to the number of ranks (OpenMPI, MPICH/Cray/Slurm PMI, MVAPICH)
_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")

T = TypeVar("T")


def launcher_rank() -> int:
    """This process's rank from an MPI launcher's environment (before MPI starts); 0 if none."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def launcher_size() -> int:
    """The number of ranks an MPI launcher (mpirun, srun) started, from its environment; 1 if none."""
    for name in _SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


class Parallel:
    """This process's place among the ranks: a wrapper of an mpi4py communicator, or serial.

    Arguments:
        comm: an ``mpi4py.MPI.Comm`` (e.g. ``MPI.COMM_WORLD``), or None for a single serial rank.
    """

    def __init__(self, comm: Any = None) -> None:
        self.comm = comm
        self.rank: int = comm.Get_rank() if comm is not None else 0
        self.size: int = comm.Get_size() if comm is not None else 1
        # a communicator of its own for errors, so that it never matches the program's collectives
        self._error_comm = comm.Dup() if comm is not None and self.size > 1 else None

    def all_ranks_failed(self, timeout_s: float) -> bool:
        """Called by a rank whose program failed: True when every rank calls it within
        ``timeout_s`` (an input error, met by all ranks alike), False when some rank does not
        (that rank is still working or waiting for this one: the job must be aborted)."""
        if self._error_comm is None:
            return True
        request = self._error_comm.Ibarrier()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if request.Test():
                return True
            time.sleep(0.01)
        return False

    @property
    def method(self) -> str:
        """The method in use: "mpi" when backed by a communicator, else "serial"."""
        return "serial" if self.comm is None else "mpi"

    @property
    def is_root(self) -> bool:
        """True on rank 0, the rank that writes shared outputs and reports."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Parallel(method={self.method!r}, rank={self.rank}, size={self.size})"

    def stripe(self, items: Iterable[T]) -> list[T]:
        """This rank's share of ``items``: items rank, rank + size, rank + 2*size, ..."""
        if hasattr(items, "__getitem__") and hasattr(items, "__len__"):
            return list(items[self.rank :: self.size])  # type: ignore[index]
        return list(itertools.islice(items, self.rank, None, self.size))

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.comm is not None:
            self.comm.barrier()

    def gather(self, obj: T, root: int = 0) -> list[T] | None:
        """Every rank's ``obj`` as a list in rank order on ``root``; None elsewhere."""
        if self.comm is None:
            return [obj]
        return self.comm.gather(obj, root=root)

    def allgather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` as a list in rank order, on every rank."""
        if self.comm is None:
            return [obj]
        return self.comm.allgather(obj)

    def bcast(self, obj: T, root: int = 0) -> T:
        """``root``'s ``obj`` on every rank."""
        if self.comm is None:
            return obj
        return self.comm.bcast(obj, root=root)

    def reduce(self, value: T, op: str = "sum", root: int = 0) -> T | None:
        """Combine a number from every rank with ``op`` (sum, max, min, prod); result on ``root``."""
        if self.comm is None:
            self._mpi_op(op)
            return value
        return self.comm.reduce(value, op=self._mpi_op(op), root=root)

    def allreduce(self, value: T, op: str = "sum") -> T:
        """Combine a number from every rank with ``op``; result on every rank."""
        if self.comm is None:
            self._mpi_op(op)
            return value
        return self.comm.allreduce(value, op=self._mpi_op(op))

    def abort(self, code: int = 1) -> None:
        """End every rank (after an error on one rank, so that the others do not wait forever)."""
        if self.comm is not None and self.size > 1:
            self.comm.Abort(code)

    def _mpi_op(self, op: str) -> Any:
        if op not in _OPS:
            raise ValueError(f"reduce op must be one of {', '.join(_OPS)}, not {op!r}")
        if self.comm is None:
            return None
        from mpi4py import MPI

        return {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}[op]


def mpi_context(method: str = "serial") -> Parallel:
    """A :class:`Parallel` for ``mp.method`` (serial or mpi).

    With "mpi" this imports mpi4py (which initialises MPI) and uses ``MPI.COMM_WORLD``.  If
    mpi4py is missing or MPI cannot initialise, it logs a note and returns a serial one.

    Raises:
        SpreadError: for a method other than serial or mpi.
    """
    if method not in METHODS:
        raise SpreadError(f"mp.method must be one of {', '.join(METHODS)}, not {method!r}")
    if method == "serial":
        n = launcher_size()
        if n > 1:
            logger.warning(
                "Started as %d MPI ranks but mp.method=serial: every rank does all the work. "
                "Use mp.method=mpi to share it.",
                n,
            )
        return Parallel()
    try:
        from mpi4py import MPI
    except ImportError as e:  # no mpi4py, or mpi4py without a loadable MPI library
        logger.info("mp.method=mpi but mpi4py.MPI cannot be imported (%s): running serially.", e)
        return Parallel()
    except Exception as e:  # noqa: BLE001  MPI_Init failures surface as RuntimeError or MPI.Exception
        logger.info("mp.method=mpi but MPI could not initialise (%s): running serially.", e)
        return Parallel()
    return Parallel(MPI.COMM_WORLD)


def assign_gpu(rank: int, n_devices: int | None = None) -> int | None:
    """Pick this rank's CUDA device: rank r uses device ``r % n`` of the n visible ones.

    Arguments:
        rank: the MPI rank.
        n_devices: how many devices to share out; default ``torch.cuda.device_count()``.

    Returns the device index (also made torch's current device when CUDA is usable), or None
    when no CUDA device is visible.  With ``srun --gpus-per-task=1`` each rank sees one device: 0.
    """
    if n_devices is None:
        import torch

        n_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_devices < 1:
        return None
    index = rank % n_devices
    import torch

    if torch.cuda.is_available() and index < torch.cuda.device_count():
        torch.cuda.set_device(index)
    return index
