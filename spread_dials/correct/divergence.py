"""The anchor of the correction to the physics: the Kullback-Leibler divergence between the
Poisson likelihoods of two pixel rates, in closed form (pure torch)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["poisson_kl"]


def poisson_kl(rate: Tensor, reference: Tensor, floor: float = 1e-6) -> Tensor:
    """KL(Poisson(rate) || Poisson(reference)) per pixel (nats):
    rate log(rate / reference) - rate + reference, for rates (photons, any shape, equal shapes);
    both clamped at ``floor``.  0 where the rates agree, >= 0 everywhere."""
    p, q = rate.clamp(min=floor), reference.clamp(min=floor)
    return p * (torch.log(p) - torch.log(q)) - p + q
