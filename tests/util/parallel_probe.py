"""Run by tests/util/test_parallel.py, under mpirun or alone: stripe 5 items, gather, reduce.

usage: python parallel_probe.py METHOD OUTDIR [block-mpi4py | block-mpi4py.MPI]

Each rank writes OUTDIR/rank<r>.json.  The optional third argument makes the import of mpi4py
(or of its compiled MPI module) really fail in this process, as on a machine without it.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

if len(sys.argv) > 3:
    # None in sys.modules makes "import <name>" raise ImportError, exactly as for a missing module
    sys.modules[sys.argv[3].removeprefix("block-")] = None  # type: ignore[assignment]

logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")

from spread_dials.parallel import mpi_context  # noqa: E402  after sys.modules is set up

mpi = mpi_context(sys.argv[1])
mine = mpi.stripe(["a", "b", "c", "d", "e"])
result = {
    "method": mpi.method,
    "rank": mpi.rank,
    "size": mpi.size,
    "mine": mine,
    "gathered": mpi.gather(mine),
    "allgathered": mpi.allgather(mpi.rank),
    "bcast": mpi.bcast({"from": mpi.rank}),
    "count": mpi.reduce(len(mine)),
    "max_rank": mpi.allreduce(mpi.rank, op="max"),
    "range_share": mpi.stripe(range(5)),
    "iter_share": mpi.stripe(iter(range(5))),
}
mpi.barrier()
Path(sys.argv[2], f"rank{mpi.rank}.json").write_text(json.dumps(result))
