"""PHIL scopes shared by every spread_dials program; reuse them rather than copy them.

Each name is a libtbx.phil string, so this module imports without cctbx.  In a program::

    phil_scope = libtbx.phil.parse('''
    include scope spread_dials.phil.common.device_phil
    include scope spread_dials.phil.common.mp_phil
    include scope spread_dials.phil.common.output_phil
    include scope spread_dials.phil.common.random_phil
    ''', process_includes=True)

``include scope X`` inserts the top-level scope of X (``device { ... }`` and so on).
:data:`common_phil` is all four together.
"""

from __future__ import annotations

__all__ = ["common_phil", "device_phil", "mp_phil", "output_phil", "random_phil"]

device_phil = """
device
  .help = "Where and in what precision the torch forward model runs"
{
  name = *auto cpu cuda
    .type = choice
    .help = "auto: a CUDA GPU if torch sees one, else the CPU. cuda: fail unless a GPU is usable."
            "With several visible GPUs, MPI rank r uses GPU r % n."
  dtype = *float32 float64
    .type = choice
    .help = "Floating-point precision of the simulation and refinement tensors"
}
"""

mp_phil = """
mp
  .help = "Parallel processing (cctbx.xfel naming)"
{
  method = *serial mpi
    .type = choice
    .help = "serial: one process does everything. mpi: launch with mpirun/srun -n N; rank r"
            "takes items r, r+N, r+2N, ... Falls back to serial (with a note in the log) when"
            "mpi4py is missing or MPI cannot start."
  nproc = 1
    .type = int(value_min=1, allow_none=False)
    .help = "CPU threads for torch in each process (torch.set_num_threads). The number of MPI"
            "ranks is set by the launcher (mpirun -n, srun -n), not here."
}
"""

output_phil = """
output
  .help = "Where results go"
{
  directory = .
    .type = path
    .help = "Directory for every file the program writes; created if missing"
  prefix = None
    .type = str
    .help = "Prefix for output file names; None uses the program's own default"
  log = None
    .type = path
    .help = "Log file name; None: <program name>.log. A relative name is taken inside"
            "output.directory. Under MPI, ranks other than 0 add .rankNNNN before .log"
    .expert_level = 1
}
"""

random_phil = """
random
  .help = "Random numbers (noise, orientations, spectra)"
{
  seed = 0
    .type = int(value_min=0, allow_none=False)
    .help = "Seed for the random draws, so that runs are reproducible"
}
"""

common_phil = device_phil + mp_phil + output_phil + random_phil
