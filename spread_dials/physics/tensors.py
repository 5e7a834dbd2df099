"""A mixin that moves every tensor field of a frozen dataclass to a device and dtype."""

from __future__ import annotations

from dataclasses import fields, replace

from torch import Tensor

__all__ = ["TensorFields"]


class TensorFields:
    """Mixin for frozen dataclasses whose fields are tensors (and plain settings)."""

    def to(self, device=None, dtype=None):
        """A copy with tensors on ``device``; floating (and complex) tensors cast to ``dtype``.

        A real ``dtype`` turns complex fields into the matching complex dtype.
        """
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                target = None
                if dtype is not None and v.is_complex():
                    target = dtype.to_complex() if not dtype.is_complex else dtype
                elif dtype is not None and v.is_floating_point():
                    target = dtype
                changes[f.name] = v.to(device=device, dtype=target)
            elif isinstance(v, TensorFields):
                changes[f.name] = v.to(device=device, dtype=dtype)
        return replace(self, **changes)
