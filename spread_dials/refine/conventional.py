"""The conventional route to per-site f'/f'': quasi-monochromatic "moving window" SpReAD on
integrated intensities, the yardstick beside pixel-level SPREAD (issue 12, experiment 4).

As in the energy-binned merging of recent cctbx.xfel SpReAD work: every integrated reflection
is treated as monochromatic at its spectrum-weighted energy, reflections are binned by that
energy, and per bin the sites' f', f'' are fitted against

    I_hi = k_i P_hi |F0_h + sum_s (f'_s,b + i f''_s,b) G_s,h|^2,

k_i a scale per still, P_hi the reflection's partiality (its expected photons per unit |F|^2),
b the bin of E_hi.  Here E_hi and P_hi come from the same per-channel profiles the pixel route
uses (E_hi = sum_c P_hic E_c / sum_c P_hic, P_hi = sum_c P_hic over the shoebox): the route is
told the partialities and the energies exactly, so it loses information only where it is
conventional: one energy per reflection, summation integration, merging.  Each site's edge
shift is then the shift of its reference curve that best fits the binned f', f'' under their
full covariance (per-still scales profiled out).

Pure torch / numpy; works from the refinement's caches (:class:`~spread_dials.refine.model.ShotCache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from spread_dials.physics.anomalous import TabulatedCurve
from spread_dials.refine.derivatives import value_and_jacobian

__all__ = ["Reflections", "summation_reflections", "BinnedFit", "energy_bins", "fit_binned", "edge_shifts_from_bins"]


@dataclass(frozen=True)
class Reflections:
    """Integrated reflections of many stills (all float64, on the CPU).

    Attributes:
        intensity: (R,) summation intensity (photons, background subtracted).
        variance: (R,) its variance (photons^2).
        still: (R,) long index of the still.
        energy_eV: (R,) spectrum-weighted energy of each reflection (eV).
        partiality: (R,) expected photons per unit |F|^2 and unit still scale.
        F0: (R,) complex; G: (R, S) complex: the reflection's structure-factor parts.
    """

    intensity: Tensor
    variance: Tensor
    still: Tensor
    energy_eV: Tensor
    partiality: Tensor
    F0: Tensor
    G: Tensor

    @classmethod
    def concatenate(cls, parts: list["Reflections"]) -> "Reflections":
        """One set of the reflections of ``parts`` (their still indices kept)."""
        return cls(**{f: torch.cat([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__})


def summation_reflections(caches: list, shoeboxes: list) -> Reflections:
    """Summation integration of every shoebox of ``caches`` (one per still; their profiles at
    the given crystals) with ``shoeboxes`` (the stills' :class:`~spread_dials.refine.shots.Shoeboxes`):
    the background is the mean of the box's valid border pixels, I = sum over valid pixels of
    (counts - background), var I = sum counts + n^2 var(background mean).  Boxes without a valid
    border or inner pixel are dropped."""
    out = {k: [] for k in ("intensity", "variance", "still", "energy_eV", "partiality", "F0", "G")}
    for i, (cache, sb) in enumerate(zip(caches, shoeboxes)):
        box = cache.pixel_shoebox.cpu()
        n_b = int(sb.n_shoeboxes)
        counts = cache.counts.detach().cpu().double()
        valid = cache.valid.cpu()
        fast, slow = cache.fast.cpu(), cache.slow.cpu()
        half_f = (sb.n_fast.cpu()[box].double() - 1) / 2
        half_s = (sb.n_slow.cpu()[box].double() - 1) / 2
        border = valid & ((fast.abs() >= half_f - 1e-9) | (slow.abs() >= half_s - 1e-9))
        zeros = torch.zeros(n_b, dtype=torch.float64)
        n_border = zeros.index_add(0, box, border.double())
        background = zeros.index_add(0, box, counts * border) / n_border.clamp(min=1)
        n_valid = zeros.index_add(0, box, valid.double())
        total = zeros.index_add(0, box, counts * valid)
        intensity = total - n_valid * background
        variance = total + n_valid**2 * background / n_border.clamp(min=1)
        channel = torch.zeros((n_b, cache.profiles.profile.shape[1]), dtype=torch.float64)
        channel = channel.index_add(0, box, cache.profiles.profile.detach().cpu().double() * valid.unsqueeze(-1))
        partiality = channel.sum(-1)
        energy = (channel * cache.energy_eV.double()).sum(-1) / partiality.clamp(min=1e-300)
        keep = (n_border > 0) & (n_valid > n_border) & (partiality > 0) & (variance > 0)
        out["intensity"].append(intensity[keep])
        out["variance"].append(variance[keep])
        out["still"].append(torch.full((int(keep.sum()),), i, dtype=torch.long))
        out["energy_eV"].append(energy[keep])
        out["partiality"].append(partiality[keep])
        out["F0"].append(cache.F0.cpu()[keep])
        out["G"].append(cache.G.cpu()[keep])
    return Reflections(**{k: torch.cat(v) for k, v in out.items()})


@dataclass(frozen=True)
class BinnedFit:
    """f', f'' per energy bin and site with their covariance (scales profiled out).

    Attributes:
        energy_eV: (K,) centre of each bin that holds reflections (eV).
        f_prime, f_double_prime: (K, S) electrons.
        covariance: (2KS, 2KS) of the flat vector [f' (K, S), f'' (K, S)].
        scale: (N,) per-still scale k_i.
        reflections: (K,) reflections per bin.
    """

    energy_eV: Tensor
    f_prime: Tensor
    f_double_prime: Tensor
    covariance: Tensor
    scale: Tensor
    reflections: Tensor


def _model(refl: Reflections, bin_of: Tensor, fp: Tensor, fdp: Tensor) -> Tensor:
    """(R,) |F0 + G (f' + i f'')|^2 at each reflection's bin (fp, fdp (K, S)): the formula of
    :func:`~spread_dials.refine.model.intensities`, which gives every reflection at every
    channel (R, K); here each reflection needs only its own bin."""
    anomalous = torch.complex(fp[bin_of], fdp[bin_of]).to(refl.G.dtype)  # (R, S)
    return (refl.F0 + (refl.G * anomalous).sum(-1)).abs() ** 2


def fit_binned(refl: Reflections, n_stills: int, bin_edges_eV: Tensor, start: tuple[Tensor, Tensor],
               iterations: int = 30) -> BinnedFit:  # fmt: skip
    """Weighted least squares of ``refl`` (module docstring) for per-bin f', f'' and per-still
    scales: Gauss-Newton on all of them at once (the scales eliminated per still by the Schur
    complement), from ``start`` = (f', f'') (K, S) per bin of ``bin_edges_eV`` (K + 1,) (eV).

    Raises:
        ValueError: a bin or still without reflections to fit.
    """
    k_bins, n_sites = start[0].shape
    bin_of = torch.bucketize(refl.energy_eV, bin_edges_eV) - 1
    inside = (bin_of >= 0) & (bin_of < k_bins)
    refl = Reflections(*(getattr(refl, f)[inside] for f in Reflections.__dataclass_fields__))
    bin_of = bin_of[inside]
    counts = torch.bincount(bin_of, minlength=k_bins)
    if bool((counts == 0).any()) or bool((torch.bincount(refl.still, minlength=n_stills) == 0).any()):
        raise ValueError("every energy bin and every still needs reflections: use fewer, wider bins")
    w = 1.0 / refl.variance
    p = 2 * k_bins * n_sites
    x = torch.cat([start[0].reshape(-1), start[1].reshape(-1)]).double()

    def split(v: Tensor) -> tuple[Tensor, Tensor]:
        return v[: p // 2].view(k_bins, n_sites), v[p // 2 :].view(k_bins, n_sites)

    def per_still(values: Tensor) -> Tensor:
        return torch.zeros(n_stills, dtype=torch.float64).index_add(0, refl.still, values)

    def rate(v: Tensor) -> Tensor:  # (R,) per unit scale
        return _model(refl, bin_of, *split(v)) * refl.partiality

    m = rate(x)
    scale = per_still(w * refl.intensity * m) / per_still(w * m**2)  # the scales that fit the starting curves
    for _ in range(iterations):
        m, jac = value_and_jacobian(rate, x)  # (R,), (R, P)
        k = scale[refl.still]
        r = refl.intensity - k * m
        # normal equations in (x, scales): J_x = k jac, J_k = m (per still)
        jx = k.unsqueeze(-1) * jac
        h_xx = jx.T @ (w.unsqueeze(-1) * jx)
        g_x = jx.T @ (w * r)
        h_kk = per_still(w * m * m)
        g_k = per_still(w * m * r)
        h_xk = torch.zeros((p, n_stills), dtype=torch.float64).index_add(1, refl.still, (jx * (w * m).unsqueeze(-1)).T)
        reduced = h_xx - (h_xk / h_kk) @ h_xk.T
        step_x = torch.linalg.solve(reduced, g_x - (h_xk / h_kk) @ g_k)
        step_k = (g_k - h_xk.T @ step_x) / h_kk
        x = x + step_x
        scale = scale + step_k
        if float(step_x.abs().max()) < 1e-9:
            break
    covariance = torch.linalg.inv(0.5 * (reduced + reduced.T))
    centres = 0.5 * (bin_edges_eV[1:] + bin_edges_eV[:-1])
    fp, fdp = split(x)
    return BinnedFit(centres.double(), fp, fdp, covariance, scale, counts)


def edge_shifts_from_bins(fit: BinnedFit, references: list[TabulatedCurve], iterations: int = 20) -> tuple[Tensor, Tensor]:
    """((S,) edge shift of each site (eV), (S, S) covariance): the shifts of the reference
    curves f_s(E - Delta_s) that best fit the binned f', f'' under ``fit.covariance``
    (generalised least squares, Gauss-Newton from 0)."""
    n_sites = len(references)
    precision = torch.linalg.inv(fit.covariance)
    observed = torch.cat([fit.f_prime.reshape(-1), fit.f_double_prime.reshape(-1)])
    energy = fit.energy_eV

    def curves(delta: Tensor) -> Tensor:
        fp = torch.stack([references[s].at(energy, delta[s])[0] for s in range(n_sites)], -1)  # (K, S)
        fdp = torch.stack([references[s].at(energy, delta[s])[1] for s in range(n_sites)], -1)
        return torch.cat([fp.reshape(-1), fdp.reshape(-1)])

    delta = torch.zeros(n_sites, dtype=torch.float64)
    for _ in range(iterations):
        value, j = value_and_jacobian(curves, delta)  # (2KS,), (2KS, S)
        r = observed - value
        h = j.T @ precision @ j
        step = torch.linalg.solve(h, j.T @ precision @ r)
        step = step.clamp(-2.0, 2.0)
        delta = delta + step
        if float(step.abs().max()) < 1e-8:
            break
    j = value_and_jacobian(curves, delta)[1]
    return delta, torch.linalg.inv(j.T @ precision @ j)


def energy_bins(energy_eV: Tensor, width_eV: float, min_reflections: int = 20) -> Tensor:
    """(K + 1,) edges of bins ``width_eV`` wide over the reflections' energies (eV), the sparse
    ends dropped and a sparse inner bin merged into its upper neighbour, so that every bin holds
    at least ``min_reflections`` (reflections outside the edges are not used).

    Raises:
        ValueError: too few reflections for even one bin.
    """
    lo = math.floor(float(energy_eV.min()) / width_eV) * width_eV
    hi = math.ceil(float(energy_eV.max()) / width_eV) * width_eV
    edges = list(np.arange(lo, hi + 0.5 * width_eV, width_eV))

    def counts() -> list[int]:
        return torch.histogram(energy_eV.double(), torch.as_tensor(edges, dtype=torch.float64)).hist.long().tolist()

    while len(edges) > 2 and counts()[0] < min_reflections:
        edges.pop(0)
    while len(edges) > 2 and counts()[-1] < min_reflections:
        edges.pop()
    c = counts()
    while len(edges) > 2 and min(c) < min_reflections:
        k = c.index(min(c))
        edges.pop(k + 1 if k + 1 < len(edges) - 1 else k)
        c = counts()
    if c[0] < min_reflections:
        raise ValueError(f"{energy_eV.numel()} reflections cannot fill one bin of {min_reflections}")
    return torch.as_tensor(edges, dtype=torch.float64)
