"""The error users see: :class:`SpreadError`, a ``libtbx.utils.Sorry`` for bad input.

``Sorry`` is DIALS' exception for user mistakes: programs show its message on one line with no
traceback.  Where libtbx is absent (the GPU machine: torch only) a plain ``Exception`` stands in,
so pure-torch code may still raise :class:`SpreadError`.
"""

from __future__ import annotations

__all__ = ["Sorry", "SpreadError"]

try:
    from libtbx.utils import Sorry
except ImportError:  # torch-only machine: no cctbx

    class Sorry(Exception):  # type: ignore[no-redef]
        """Stand-in for ``libtbx.utils.Sorry`` when libtbx is not installed."""


class SpreadError(Sorry):
    """Bad input to a spread_dials program: shown as ``Sorry: <message>``, exit status 1."""
