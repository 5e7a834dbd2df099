"""The error users see: :class:`SpreadError`, a ``libtbx.utils.Sorry`` for bad input.

``Sorry`` is DIALS' exception for user mistakes: programs show its message on one line with no
traceback.  Where libtbx is absent (the GPU machine: torch only) a plain ``Exception`` stands in,
so pure-torch code may still raise :class:`SpreadError`.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["Sorry", "SpreadError", "require_file"]

try:
    from libtbx.utils import Sorry
except ImportError:  # torch-only machine: no cctbx

    class Sorry(Exception):  # type: ignore[no-redef]
        """Stand-in for ``libtbx.utils.Sorry`` when libtbx is not installed."""


class SpreadError(Sorry):
    """Bad input to a spread_dials program: shown as ``Sorry: <message>``, exit status 1."""


def require_file(path: str | os.PathLike, parameter: str) -> Path:
    """``path`` as a Path if it is a file this process can read; else a SpreadError that says
    which of those it is not (missing, a directory, not readable), naming ``parameter``."""
    path = Path(path)
    if path.is_dir():
        raise SpreadError(f"{parameter} {str(path)!r} is a directory, not a file")
    if not path.exists():
        raise SpreadError(f"{parameter} {str(path)!r} does not exist")
    if not path.is_file():
        raise SpreadError(f"{parameter} {str(path)!r} is not a regular file")
    if not os.access(path, os.R_OK):
        raise SpreadError(f"{parameter} {str(path)!r} cannot be read (permission denied)")
    return path
