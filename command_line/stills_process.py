"""Run the stock DIALS stills processing (dials.stills_process) with the full stills indexer on
any cctbx install: spot finding, indexing, refinement and integration of every still, unchanged.

Debian's cctbx lacks the compiled extension ``xfel_mono_sim_ext``.  The stills indexer
(``indexing.stills.indexer=stills``, the default) and ``dispatch.refine=True`` import it through
``xfel.mono_simulation`` without using it, so on Debian stock stills_process fails on every image
- quietly: it exits 0 and writes no ``*_integrated.refl``.  This command puts an empty stand-in
module in its place, and only when the real extension cannot be imported (conda-forge, NERSC and
cctbx bootstrap builds have it and use it unchanged), then calls
``dials.command_line.stills_process.run`` with the same arguments.  Everything else - parameters,
outputs, logs, MPI (``mp.method=mpi`` under mpirun/srun) - is stills_process's own; see
``dials.stills_process -h``.

Ready PHIL files ship with spread_dials (a bare name is taken from spread_dials/phil unless a
file of that name exists here): ``stills_process.phil`` (the common settings: dispersion spot
finding, known symmetry P 21 21 21, shoeboxes kept in the integrated reflections, centroids by
centre of mass, sigma_b_cutoff raised, composite_output False) and, with the preset's cell and
resolution, ``rubredoxin_stills_process.phil`` and ``psii_stills_process.phil``.

The alternative that needs no stand-in is the sequences indexer: ``dials.stills_process ...
indexing.stills.indexer=sequences`` (a plain crystal model, no mosaic refinement; fewer
integrated reflections per still).

Examples::

  dials.spread_stills_process sim/images_0*.h5 rubredoxin_stills_process.phil output.output_dir=proc
  mpirun -n 4 dials.spread_stills_process sim/images_0*.h5 psii_stills_process.phil mp.method=mpi
  dials.spread_stills_process -c -a1          # every stills_process parameter
"""

from __future__ import annotations

import glob
import importlib
import logging
import os
import sys
import types

from spread_dials.util.errors import SpreadError
from spread_dials.util.program import handle_errors

__all__ = ["install_mono_sim_stub", "resolve_arguments", "run"]

logger = logging.getLogger("dials.spread.stills_process")

_EXTENSION = "xfel_mono_sim_ext"


def install_mono_sim_stub() -> bool:
    """Put an empty ``xfel_mono_sim_ext`` module in ``sys.modules`` if the real one is missing.

    Returns:
        True when the stand-in was installed, False when the compiled extension is present (or a
        stand-in is in place already).
    """
    if _EXTENSION in sys.modules:
        return False
    try:
        importlib.import_module(_EXTENSION)
    except ImportError:
        stub = types.ModuleType(_EXTENSION)
        stub.__doc__ = "Empty stand-in installed by dials.spread_stills_process (the compiled extension is missing)."
        sys.modules[_EXTENSION] = stub
        return True
    return False


def _is_option(arg: str) -> bool:
    return arg.startswith("-")


def _is_assignment(arg: str) -> bool:
    return "=" in arg and not os.path.exists(arg)


def resolve_arguments(args: list[str], phil=None) -> list[str]:
    """The command line with bare shipped PHIL names resolved, after checking the input files.

    A ``name.phil`` that is not a file here but ships in spread_dials/phil is replaced by the
    shipped file.  Every other plain argument must be an existing file or a glob that matches one
    (stills_process would print help and exit 0 without inputs), and every ``key=value`` must be a
    parameter of ``phil`` (stills_process's scope) when given.

    Raises:
        SpreadError: a missing file or PHIL file, an unknown parameter, or no image files at all.
    """
    from spread_dials.command_line.simulate import shipped_phil_files

    interpreter = phil.command_line_argument_interpreter() if phil is not None else None
    sources = []

    args = shipped_phil_files(list(args))
    if any(a in ("-h", "--help", "-c", "--show-config") for a in args):
        return args  # help / configuration: stills_process prints them
    inputs = 0
    for arg in args:
        if _is_option(arg):
            continue
        if _is_assignment(arg):
            if interpreter is not None:
                try:
                    sources.append(interpreter.process(arg=arg))
                except Exception as e:  # noqa: BLE001  libtbx's Sorry for an unknown name
                    raise SpreadError(f"unknown parameter {arg!r}: {e}") from None
            if arg.split("=", 1)[0].strip() in ("input.glob", "glob", "input.file_list", "file_list"):
                inputs += 1
            continue
        if arg.endswith(".phil"):
            if not os.path.isfile(arg):
                raise SpreadError(f"PHIL file not found: {arg}")
            continue
        matches = glob.glob(arg)
        if not matches:
            raise SpreadError(f"no such image file: {arg}")
        for path in matches:
            if not os.path.isfile(path):
                raise SpreadError(f"not an image file: {path}")
        inputs += len(matches)
    if sources:
        try:
            phil.fetch(sources=sources).extract()
        except Exception as e:  # noqa: BLE001  libtbx.phil reports bad values as RuntimeError
            message = str(e)
            if message.startswith("Please report this error"):  # DIALS' wrapper text around the real message
                message = message.split(": ", 1)[-1]
            raise SpreadError(f"invalid parameter value: {message}") from None
    if not inputs:
        raise SpreadError("no image files given (e.g. dials.spread_stills_process sim/images_0*.h5 stills_process.phil)")
    return args


@handle_errors
def run(args: list[str] | None = None) -> None:
    """Install the stand-in if needed and run ``dials.command_line.stills_process.run`` (the module
    docstring says more)."""
    stubbed = install_mono_sim_stub()
    from dials.command_line import stills_process

    args = resolve_arguments(sys.argv[1:] if args is None else list(args), stills_process.phil_scope)

    if stubbed:
        # goes to stdout before stills_process configures its log, once per job
        rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")) or 0)
        if rank == 0 and not any(a in ("-h", "--help", "-c", "--show-config") for a in args):
            print(f"dials.spread_stills_process: {_EXTENSION} is not compiled in this cctbx; using an empty "
                  "stand-in (the stills indexer does not call it)", flush=True)  # fmt: skip
    stills_process.run(args)


if __name__ == "__main__":
    run()
