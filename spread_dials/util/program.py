"""Shared plumbing for the dials.spread_* command-line programs, so each program stays thin.

A program module in command_line/ looks like a DIALS one::

    '''Simulate XFEL stills.

    Examples::

      dials.spread_simulate psii.phil nimages=10 device.name=cuda
    '''
    import logging

    from libtbx.phil import parse

    from spread_dials.util.program import Program, SpreadError, handle_errors

    logger = logging.getLogger("dials.spread.simulate")   # must live under "dials"

    phil_scope = parse('''
    include scope spread_dials.phil.common.common_phil
    nimages = 1
      .type = int(value_min=1)
      .help = "Number of stills"
    ''', process_includes=True)

    program = Program("dials.spread_simulate", usage="dials.spread_simulate [options] [model.phil]",
                      help=__doc__, phil=phil_scope)

    @handle_errors
    def run(args=None, phil=phil_scope):
        ctx = program.start(args, phil=phil)     # parse, log file, banner, diff phil, MPI, device
        items = ctx.mpi.stripe(range(ctx.params.nimages))
        ...
        if ctx.mpi.is_root:
            logger.info("Wrote %s", ctx.output_path("images_000.h5"))

    if __name__ == "__main__":
        run()

:meth:`Program.start` parses PHIL files and ``key=value`` arguments with
``dials.util.options.ArgumentParser`` (``-h`` help, ``-c`` the configuration, ``-e N`` expert level,
``-a N`` attributes level, ``-v`` verbosity), writes ``<program>.log`` through
``dials.util.log.config`` and logs the DIALS version and the modified parameters.
:func:`handle_errors` turns ``Sorry`` / :class:`SpreadError` into ``Sorry: <message>`` on stderr
and exit status 1, with no traceback.

A refused run leaves nothing behind: the log goes to a hidden temporary file until the program
calls :meth:`ProgramContext.accept_inputs` (its inputs are checked; from here on the log and
outputs are this run's) or returns.  A ``Sorry`` before that removes the temporary log, and the
output directory too if this run created it, so the log of a run already in the directory is
untouched.  An output that cannot be written (a full disk, a read-only or forbidden directory)
is a ``Sorry`` naming the file, in every program.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import dials.util
import dials.util.log
from dials.util.options import ArgumentParser
from dials.util.version import dials_version
from libtbx.phil import scope as phil_scope_type

import spread_dials
from spread_dials.parallel import Parallel, launcher_rank, mpi_context
from spread_dials.util.atomic import temporary_beside
from spread_dials.util.errors import Sorry, SpreadError

__all__ = ["Program", "ProgramContext", "Sorry", "SpreadError", "configure_logging", "handle_errors", "write_error"]

logger = logging.getLogger("dials.spread.program")

F = TypeVar("F", bound=Callable[..., Any])

# handlers that our last configure_logging() added, removed again by the next call
_installed_handlers: list[tuple[logging.Logger, logging.Handler]] = []


@dataclasses.dataclass
class ProgramContext:
    """What :meth:`Program.start` hands to a program's ``run``.

    Attributes:
        params: the extracted PHIL parameters.
        options: the argparse options (``options.verbose`` ...).
        diff_phil: the parameters that differ from the defaults, as PHIL text ("" if none).
        mpi: this process's :class:`~spread_dials.parallel.Parallel` (serial without an mp scope).
        device: the ``torch.device`` from the ``device`` scope, or None when the program has none.
        dtype: the ``torch.dtype`` from ``device.dtype``, or None.
        output_dir: ``output.directory`` (created), or the working directory without an output scope.
        logfile: the log file written, or None.
    """

    params: Any
    options: argparse.Namespace
    diff_phil: str
    mpi: Parallel
    device: Any = None
    dtype: Any = None
    output_dir: Path = Path(".")
    logfile: Path | None = None
    created_dirs: tuple[Path, ...] = ()
    pending_log: Path | None = None

    def output_path(self, name: str) -> Path:
        """``name`` inside the output directory."""
        return self.output_dir / name

    def accept_inputs(self) -> None:
        """The inputs are checked: the log becomes ``logfile`` (replacing a previous run's), and
        a later ``Sorry`` leaves it and the outputs in place.  Call it before writing outputs."""
        if self.pending_log is not None:
            os.replace(self.pending_log, self.logfile)  # the open handlers follow the file
            self.pending_log = None

    def discard(self) -> None:
        """After a ``Sorry`` before :meth:`accept_inputs`: remove the temporary log, and the
        output directory (and its parents) where this run created it and it is empty."""
        if self.pending_log is None:
            return
        _close_log_files()
        with contextlib.suppress(OSError):
            self.pending_log.unlink()
        self.pending_log = None
        _remove_empty(self.created_dirs)


#: the context of the program running in this process (handle_errors finishes it)
_current: ProgramContext | None = None

#: seconds a failed MPI rank waits for the others to fail too before it aborts the job
SHARED_ERROR_WAIT_S = 30.0

#: errno values that mean "this output cannot be written here", not a bug
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def configure_logging(logfile: Path | str | None, verbosity: int = 0, rank: int = 0) -> None:
    """``dials.util.log.config`` for our programs, safe to call more than once in a process.

    Rank 0 logs INFO (DEBUG with ``-vv``) to the console and ``logfile``; other MPI ranks write
    only warnings to the console so that messages are not repeated once per rank.
    """
    for log, handler in _installed_handlers:
        log.removeHandler(handler)
        handler.close()
    _installed_handlers.clear()
    loggers = [logging.getLogger(n) for n in ("dials", "dxtbx", "py.warnings")]
    before = {id(h) for log in loggers for h in log.handlers}
    quiet = rank != 0 and "DIALS_NOBANNER" not in os.environ
    if quiet:  # the citation banner once per job, not once per rank
        os.environ["DIALS_NOBANNER"] = "1"
    try:
        dials.util.log.config(verbosity=verbosity, logfile=str(logfile) if logfile else None)
    finally:
        if quiet:
            del os.environ["DIALS_NOBANNER"]
    for log in loggers:
        for handler in log.handlers:
            if id(handler) in before:
                continue
            _installed_handlers.append((log, handler))
            if rank != 0 and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)


class Program:
    """A DIALS-style command-line program: name, usage, help text and PHIL scope.

    Arguments:
        name: the command, e.g. "dials.spread_simulate"; also the default log file stem.
        usage: the usage line without "usage:", e.g. "dials.spread_simulate [options] model.phil".
        help: the help text shown after the options (usually the module ``__doc__``).
        phil: the program's ``libtbx.phil`` scope (include the common scopes for device, mp,
            output and random to get the behaviour described in :meth:`start`).
        read_experiments, read_reflections, check_format: passed to ``ArgumentParser``.
    """

    def __init__(
        self,
        name: str,
        usage: str,
        help: str | None,
        phil: phil_scope_type,
        *,
        read_experiments: bool = False,
        read_reflections: bool = False,
        check_format: bool = False,
    ) -> None:
        self.name = name
        self.usage = usage
        self.help = help
        self.phil = phil
        self.parser_options = {
            "read_experiments": read_experiments,
            "read_reflections": read_reflections,
            "check_format": check_format,
        }

    def parser(self, phil: phil_scope_type | None = None) -> ArgumentParser:
        """A fresh ``dials.util.options.ArgumentParser`` for this program."""
        return ArgumentParser(
            prog=self.name, usage=self.usage, phil=phil or self.phil, epilog=self.help, **self.parser_options
        )

    def parse(self, args: list[str] | None = None, phil: phil_scope_type | None = None) -> tuple[Any, Any, str]:
        """Parse ``args`` (default ``sys.argv[1:]``): return ``(params, options, diff_phil)``.

        ``-h`` and ``-c`` print and exit 0 here.  Unknown parameters raise ``Sorry``, and so do
        values that libtbx.phil rejects (out of range, not a number), which it reports as
        ``RuntimeError``.
        """
        parser = self.parser(phil)
        try:
            params, options = parser.parse_args(args=args, show_diff_phil=False)
        except RuntimeError as e:  # libtbx.phil's way of saying "bad value"
            raise Sorry(str(e)) from None
        return params, options, parser.diff_phil.as_str()

    def logfile(self, params: Any, rank: int = 0) -> Path:
        """The log file: ``output.log`` or ``<name>.log``, inside ``output.directory``.

        MPI ranks other than 0 get ``<stem>.rankNNNN.log``.
        """
        output = getattr(params, "output", None)
        name = Path(getattr(output, "log", None) or f"{self.name}.log")
        if rank:
            name = name.with_name(f"{name.stem}.rank{rank:04d}{name.suffix or '.log'}")
        return _output_dir(params) / name

    def start(self, args: list[str] | None = None, phil: phil_scope_type | None = None) -> ProgramContext:
        """Parse the command line and set the program up; return a :class:`ProgramContext`.

        In order: parse (``-h``/``-c`` exit here); open the MPI context for ``mp.method``;
        create ``output.directory``; configure logging to :meth:`logfile`; log the versions and
        the modified parameters; set torch's threads from ``mp.nproc``; choose the device and dtype
        from the ``device`` scope (rank r of several GPUs gets GPU r % n).  Scopes the program
        does not have are skipped.

        Raises:
            Sorry: unknown or invalid parameters.
            SpreadError: an output directory that cannot be made, or an unusable device.
        """
        global _current
        params, options, diff_phil = self.parse(args, phil)
        mp = getattr(params, "mp", None)
        mpi = mpi_context(mp.method) if mp is not None else Parallel()
        output_dir = _output_dir(params)
        # deepest first; rank 0's view, taken before any rank makes them, so that whichever rank
        # discards its log last after a Sorry finds them empty and removes them
        created = mpi.bcast(tuple(d for d in (output_dir, *output_dir.parents) if not d.exists()))
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpreadError(f"cannot create output.directory {str(output_dir)!r}: {e.strerror}") from None
        logfile = self.logfile(params, mpi.rank)
        try:
            name = temporary_beside(logfile)
        except OSError as e:
            _remove_empty(created)
            raise SpreadError(f"cannot write in output.directory {str(output_dir)!r}: {e.strerror}") from None
        configure_logging(name, options.verbose, mpi.rank)
        logger.info("%s (spread_dials %s, %s)", self.name, spread_dials.__version__, dials_version())
        if mpi.method == "mpi":
            logger.info("MPI: rank %d of %d", mpi.rank, mpi.size)
        if diff_phil:
            logger.info("The following parameters have been modified:\n%s", diff_phil)
        ctx = ProgramContext(params, options, diff_phil, mpi, output_dir=output_dir, logfile=logfile,
                             created_dirs=created, pending_log=name)  # fmt: skip
        _current = ctx
        if mp is not None or hasattr(params, "device"):
            import torch

            if mp is not None:
                torch.set_num_threads(mp.nproc)
            device = getattr(params, "device", None)
            if device is not None:
                from spread_dials.util.device import select_device, select_dtype

                ctx.device = select_device(device.name, rank=mpi.rank)
                ctx.dtype = select_dtype(device.dtype)
                logger.info("Device: %s, %s", ctx.device, str(ctx.dtype).replace("torch.", ""))
        return ctx


def _output_dir(params: Any) -> Path:
    output = getattr(params, "output", None)
    return Path(getattr(output, "directory", None) or ".")


def _log_to_files(message: str) -> None:
    """Put ``message`` in the log files only (the console gets it on stderr)."""
    record = logging.LogRecord("dials.spread.program", logging.ERROR, __file__, 0, message, None, None)
    for log, handler in _installed_handlers:
        if log.name == "dials" and isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _remove_empty(directories: tuple[Path, ...]) -> None:
    """Remove these directories (deepest first) while they are empty."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:  # not empty: something else was put there
            return


def _close_log_files() -> None:
    """Close and remove the log-file handlers that configure_logging installed."""
    for log, handler in list(_installed_handlers):
        if isinstance(handler, logging.FileHandler):
            log.removeHandler(handler)
            handler.close()
            _installed_handlers.remove((log, handler))


def _finish(refused: bool) -> None:
    """End the running program's context: a refusal before accept_inputs leaves nothing; any
    other end keeps the log."""
    global _current
    ctx, _current = _current, None
    if ctx is None:
        return
    if refused:
        ctx.discard()
    else:
        with contextlib.suppress(OSError):
            ctx.accept_inputs()


def write_error(error: OSError) -> Sorry | None:
    """An OSError that says an output cannot be written (full disk, read-only or forbidden
    place) as a one-line Sorry naming the file; None for any other OSError (a bug)."""
    if error.errno not in _WRITE_ERRNOS:
        return None
    where = f" {error.filename}" if error.filename else ""
    return Sorry(f"cannot write{where}: {error.strerror or os.strerror(error.errno)}")


def _abort_other_ranks() -> None:
    """After an error on one MPI rank, end the job instead of leaving the others waiting."""
    mpi_module = sys.modules.get("mpi4py.MPI")
    if mpi_module is None:
        return
    with contextlib.suppress(Exception):  # never let the error report itself fail
        if mpi_module.Is_initialized() and not mpi_module.Is_finalized() and mpi_module.COMM_WORLD.Get_size() > 1:
            mpi_module.COMM_WORLD.Abort(1)


def handle_errors(func: F) -> F:
    """Decorate a program's ``run``: user errors become ``Sorry: <message>`` and exit status 1.

    ``Sorry`` (which includes :class:`SpreadError` and DIALS' own parameter errors) is printed on
    one line to stderr and to the log file, with no traceback.  ``sys.exit("message")`` is shown
    in red as DIALS does, and a crash still dumps tracebacks of all threads on SIGUSR2 (the
    ``dials.util`` helpers ``enable_faulthandler`` and ``make_sys_exit_red``).  Other exceptions are
    bugs and keep their traceback.  Under MPI with several ranks, an error that every rank meets
    (bad input) is printed once, by rank 0, and every rank exits with status 1; an error of some
    ranks only is printed by each and aborts the whole job.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with dials.util.enable_faulthandler(), dials.util.make_sys_exit_red():
            try:
                result = func(*args, **kwargs)
            except Sorry as e:
                error = e
            except OSError as e:
                error = write_error(e)
                if error is None:
                    _finish(refused=False)
                    raise
            except BaseException:
                _finish(refused=False)
                raise
            else:
                _finish(refused=False)
                return result
            message = f"Sorry: {error}"
            _log_to_files(message)
            mpi = _current.mpi if _current is not None else None
            rank = mpi.rank if mpi is not None else launcher_rank()
            _finish(refused=True)
            if rank == 0:
                print(message, file=sys.stderr, flush=True)
            # an input error fails every rank alike: say it once and end cleanly; an error of
            # some ranks only is said by each of them, and ends the job (the others would wait)
            if mpi is not None and not mpi.all_ranks_failed(SHARED_ERROR_WAIT_S):
                if rank != 0:
                    print(message, file=sys.stderr, flush=True)
                _abort_other_ranks()
            nxmx = sys.modules.get("spread_dials.io.nxmx")
            if nxmx is not None and nxmx.HDF5_UNCLOSED:
                logging.shutdown()  # HDF5 holds a file it could not close and would crash at exit
                sys.stdout.flush()
                os._exit(1)
            raise SystemExit(1) from None

    return wrapper  # type: ignore[return-value]
