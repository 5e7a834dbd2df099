"""torch.compile'd versions of the kernels' functions, built once per process."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

__all__ = ["fused"]


@functools.cache
def fused(fn: Callable, dynamic: bool | None = None) -> Callable:
    """``fn`` compiled by torch.compile.

    ``dynamic=None`` (the per-pixel kernels): compiled for the first call's shapes and, when a
    later call changes a size (the per-window tables change with every still; the fixed-size
    pixel chunks do not), recompiled once with that size symbolic.  Their launch parameters are
    tuned by inductor's coordinate descent, which costs seconds of compilation once and saves
    ~10 % of every still (benchmarks/RESULTS.md).  ``dynamic=True`` compiles once for all sizes
    (window prediction, whose every size changes with every still).  Python floats are
    specialised by torch.compile, so values that change between calls must be passed as tensors.
    """
    if dynamic:
        return torch.compile(fn, dynamic=True)
    return torch.compile(fn, dynamic=None, options={"coordinate_descent_tuning": True})
