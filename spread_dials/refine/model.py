"""The pixel-rate model of SPREAD refinement and its likelihood (pure torch).

For shoebox pixel p of reflection h in a still::

    lambda_p = (a_b + b_b x_p + c_b y_p) + G * sum_c P_c(p; rotation) * |F_h(E_c)|^2
    F_h(E) = F0_h + sum_s (f'_s(E) + i f''_s(E)) G_{s,h}

with a background plane per shoebox (photons per pixel; x, y pixel offsets from the shoebox
centre), the still's scale G, the kernel's per-channel profile P (photons per unit |F|^2,
summed over mosaic domains; :mod:`spread_dials.refine.profiles`) and the structure factor of the
round-1 assembly.  P is cached at rotation r0 with its derivative, and evaluated as
P(r0) + dP/dr (r - r0) (exact at the cache point).  Likelihoods: Poisson (photon counting) or
Gaussian with variance lambda + sigma_readout^2 (charge-integrating detectors).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from spread_dials.refine.profiles import ShotProfiles

__all__ = ["ShotState", "ShotCache", "intensities", "pixel_rate", "pixel_variance", "negative_log_likelihood", "LAMBDA_FLOOR"]

#: smallest pixel rate (photons) the likelihood sees (a plane may dip below 0 at a corner)
LAMBDA_FLOOR = 1e-6


@dataclass(frozen=True)
class ShotState:
    """Per-shot parameters.

    Attributes:
        log_scale: () log of the scale G.
        rotation: (3,) small rotation vector (rad, lab frame) applied to the .expt crystal.
        background: (B, 3) plane per shoebox: photons per pixel at the centre, per pixel in
            fast, per pixel in slow.
    """

    log_scale: Tensor
    rotation: Tensor
    background: Tensor

    def flat(self) -> Tensor:
        return torch.cat([self.log_scale.reshape(1), self.rotation, self.background.reshape(-1)])

    @staticmethod
    def from_flat(x: Tensor) -> "ShotState":
        return ShotState(x[0], x[1:4], x[4:].view(-1, 3))

    def detach(self) -> "ShotState":
        return ShotState(self.log_scale.detach(), self.rotation.detach(), self.background.detach())


@dataclass(frozen=True)
class ShotCache:
    """What stage 2 needs of one still, fixed between stage-1 passes.

    Attributes:
        pixel_shoebox: (N,) long shoebox of each pixel.
        fast, slow: (N,) pixel offsets from the shoebox centre.
        counts: (N,) photons; valid: (N,) bool (mask and trusted range).
        F0: (B,) complex non-anomalous structure factor of each shoebox's reflection.
        G: (B, S) complex site basis of each reflection.
        energy_eV: (C,) channel energies at which f', f'' are evaluated (on the CPU, with the
            global parameters; everything else on the still's device).
        profiles: cached per-channel profiles (and derivatives).
        weight: how many times the still counts (bootstrap resampling; 1 normally).
        rejected: (B,) bool shoeboxes left out of the fit (extreme residuals), or None.
    """

    pixel_shoebox: Tensor
    fast: Tensor
    slow: Tensor
    counts: Tensor
    valid: Tensor
    F0: Tensor
    G: Tensor
    energy_eV: Tensor
    profiles: ShotProfiles
    weight: float = 1.0
    rejected: Tensor | None = None

    @property
    def fitted(self) -> Tensor:
        """(N,) bool pixels in the fit: valid and not in a rejected shoebox."""
        return self.valid if self.rejected is None else self.valid & ~self.rejected[self.pixel_shoebox]

    def with_profiles(self, profiles: ShotProfiles) -> "ShotCache":
        return replace(self, profiles=profiles)


def intensities(F0: Tensor, G: Tensor, f_prime: Tensor, f_double_prime: Tensor) -> Tensor:
    """|F0 + G (f' + i f'')|^2: (B, C) electrons^2 from F0 (B,), G (B, S), f', f'' (S, C)."""
    anomalous = torch.complex(f_prime, f_double_prime).to(G.dtype)
    F = F0.unsqueeze(-1) + G @ anomalous
    return F.real * F.real + F.imag * F.imag


def pixel_rate(cache: ShotCache, state: ShotState, intensity: Tensor) -> tuple[Tensor, Tensor]:
    """(lambda, bragg): expected photons (N,) of every pixel and the Bragg part without G.

    Args:
        cache: the still's cache.
        state: its per-shot parameters (rotation relative to the cache's is linearised).
        intensity: (B, C) |F_h(E_c)|^2 of its reflections.
    """
    profile = cache.profiles.profile
    if cache.profiles.jacobian is not None:
        delta = state.rotation - cache.profiles.rotation.to(state.rotation)
        if delta.requires_grad or bool((delta != 0).any()):
            profile = profile + cache.profiles.jacobian @ delta
    bragg = (profile * intensity[cache.pixel_shoebox]).sum(-1)
    plane = state.background[cache.pixel_shoebox]
    background = plane[:, 0] + plane[:, 1] * cache.fast + plane[:, 2] * cache.slow
    return background + torch.exp(state.log_scale) * bragg, bragg


def pixel_variance(lam: Tensor, readout_sigma: float | None = None, model_error_fraction: float = 0.0) -> Tensor:
    """Variance (photons^2) of a pixel's count: lambda (Poisson) + sigma_readout^2 + (f lambda)^2,
    the last term the model's own fractional error f (bright spots: a 2 % error in a 1e4-photon
    pixel is 200 photons, twice its Poisson noise)."""
    lam = lam.clamp(min=LAMBDA_FLOOR)
    return lam + (readout_sigma or 0.0) ** 2 + (model_error_fraction * lam) ** 2


def negative_log_likelihood(lam: Tensor, counts: Tensor, valid: Tensor, readout_sigma: float | None = None,
                            model_error_fraction: float = 0.0) -> Tensor:  # fmt: skip
    """Sum over valid pixels of the NLL (up to a constant): Poisson lambda - k log lambda, or
    (``readout_sigma`` (photons) or ``model_error_fraction`` given) Gaussian
    0.5 ((k - lambda)^2 / v + log v) with v = :func:`pixel_variance`."""
    lam = lam.clamp(min=LAMBDA_FLOOR)
    if readout_sigma is None and model_error_fraction == 0:
        terms = lam - counts * torch.log(lam)
    else:
        v = pixel_variance(lam, readout_sigma, model_error_fraction)
        terms = 0.5 * ((counts - lam) ** 2 / v + torch.log(v))
    return torch.where(valid, terms, torch.zeros_like(terms)).sum()
