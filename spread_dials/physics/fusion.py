"""torch.compile'd versions of the kernels' per-pixel functions, built once per process."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

__all__ = ["fused"]


@functools.cache
def fused(fn: Callable) -> Callable:
    """``fn`` compiled by torch.compile (static shapes: callers pass fixed-size chunks)."""
    return torch.compile(fn, dynamic=False)
