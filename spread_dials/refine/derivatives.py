"""A function's value and its Jacobian in a few inputs by two reverse-mode passes (pure torch).

For y = f(x) with many outputs and few inputs (the f'/f'' curves in the site parameters, a
still's rate in the correction's parameters, the conventional route's model; the profiles'
derivatives in the crystal offsets come in closed form from the kernel) the Jacobian's columns are Jacobian-vector products.  torch's forward mode computes
them in one pass, but in torch 2.13 every operation between a dual tensor and a constant there
runs the undefined tangent through an efficient zero tensor whose output shape comes from a
Python meta kernel (torch._meta_registrations): ~0.5 ms of Python per operation, 170x the
Python calls of the plain forward pass for one rubredoxin still's profiles.  Here instead:
g(u) = J^T u by a backward pass kept differentiable (u a dummy cotangent), then J v = d(g . v)/du
for every basis vector v at once (a batched second backward).  The Jacobian is the same to
rounding (tests/refine/test_derivatives.py against torch.func.jacfwd and finite differences);
the cost is the forward graph held in memory until the second pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["value_and_jacobian"]


def value_and_jacobian(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """(fn(x), d fn / d x) with the Jacobian's input axis last.

    Args:
        fn: a function of one tensor, differentiable twice by autograd (every torch operation
            with a backward formula is).
        x: (n,) the point (any float dtype and device).

    Returns:
        (value (...,), jacobian (..., n)), both detached.
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = fn(x)
        if not value.requires_grad:  # fn does not depend on x
            return value.detach(), value.new_zeros((*value.shape, x.numel()))
        cotangent = torch.zeros_like(value, requires_grad=True)
        (transposed,) = torch.autograd.grad(value, x, grad_outputs=cotangent, create_graph=True)
        basis = torch.eye(x.numel(), dtype=x.dtype, device=x.device)
        (columns,) = torch.autograd.grad(transposed, cotangent, grad_outputs=basis, is_grads_batched=True)
    return value.detach(), columns.movedim(0, -1).detach()
