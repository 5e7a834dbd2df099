"""Planning: each site's edge-shift sigma for N stills from the Fisher information alone, without
simulating and refining a data set (pure torch; issue 12, "go beyond tables").

For a few probe stills at the truth (true crystal, true scale, flat true background, true f',
f''), the profiled Fisher information of the global parameters is
:func:`~spread_dials.refine.information.shot_information` (the Poisson likelihood's expected
Hessian with each still's scale, crystal offsets and background planes eliminated by the Schur
complement): exactly what dials.spread_refine reports as its Fisher sigma at the optimum, here
evaluated at the truth and with no counts (the information depends on the expected rates only).
Stills are exchangeable, so the information of N stills is N times the mean per still, and

    sigma_N = sqrt(diag((N * I_mean)^-1)),   sigma_N(i - j) = sqrt(C_ii + C_jj - 2 C_ij),

the Cramer-Rao bound of an unbiased estimate from N such stills (no prior).  Its accuracy is
that of the mean over the probe stills (stills differ in orientation and spectrum: a handful
gives the mean to some ten per cent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from spread_dials.parallel import Parallel
from spread_dials.physics.structure_factors import StructureFactors
from spread_dials.refine.engine import Refinement, RefineSettings, make_caches
from spread_dials.refine.information import shot_information
from spread_dials.refine.model import ShotState
from spread_dials.refine.profiles import CrystalModel
from spread_dials.refine.shots import ShotSet
from spread_dials.refine.sites import SiteModel
from spread_dials.refine.synthetic import synthetic_shots

__all__ = ["StillInformation", "probe_stills", "still_information", "pseudo_true", "predicted_covariance",
           "predicted_sigma", "site_pairs", "difference_variance", "stills_needed"]


@dataclass(frozen=True)
class StillInformation:
    """Per-still profiled Fisher information of the global parameters at the truth.

    Attributes:
        per_still: (K, P, P) one matrix per probe still (eV^-2 for edge shifts).
        mean: (P, P) their mean, the expected information of one still.
        names: the P parameter names.
    """

    per_still: Tensor
    mean: Tensor
    names: list[str]


def probe_stills(panels, truth: StructureFactors, model: CrystalModel, real_space: Tensor, energy_eV: Tensor,
                 seeds: list[int], spot_scale: float, background_photons: float, min_bragg_photons: float,
                 device: torch.device, max_box_px: int | None = None) -> ShotSet:  # fmt: skip
    """Noise-free probe stills at the truth (counts = the expected photons), one per seed:
    random orientations and SASE-like channel weights
    (:func:`~spread_dials.refine.synthetic.synthetic_shots`), the given crystal the true one (no
    orientation or cell error), shoeboxes of reflections with at least
    ``min_bragg_photons`` expected Bragg photons; with ``max_box_px`` every box larger than that
    is cut to it about its centre (as dials.spread_refine's refinement.max_shoebox_px), else such
    boxes are dropped (more than 25 px).

    Arguments:
        panels: the detector (physics panels); truth: F0, G and the true f', f'' (S, C) per
            channel; model: the crystal model (its domains make the stills); real_space: (3, 3)
            the cell's rows a, b, c (A); energy_eV: (C,) channel energies (eV); spot_scale: the
            kernel's scale (domains in the beam); background_photons: flat background per pixel.
    """
    shots, made = [], None
    for seed in seeds:
        made, _ = synthetic_shots(panels, truth, model, real_space, energy_eV, 1, seed=seed, spot_scale=spot_scale,
                                  background_photons=background_photons, orientation_error_deg=0.0,
                                  min_bragg_photons=min_bragg_photons, device=device, poisson=False,
                                  **({} if max_box_px is None else {"max_box_px": max_box_px, "cut_large_boxes": True}))  # fmt: skip
        shots.append(made.shots[0])
    return ShotSet(made.panels, made.beam_direction, made.e_vector, made.polarization_fraction, shots,
                   [f"probe {i}" for i in range(len(seeds))]).to(device)  # fmt: skip


def still_information(shots: ShotSet, table: StructureFactors, model: CrystalModel, sites: SiteModel, theta: Tensor,
                      spot_scale: float, background_photons: float, settings: RefineSettings) -> StillInformation:  # fmt: skip
    """Profiled Fisher information of ``theta`` (P,) per still of ``shots``, each at its truth.

    Arguments:
        shots: probe stills whose given crystals ARE the true ones (made with no orientation or
            cell error; their counts are not used).
        table: F0 and G of every reflection (no f', f'').
        model: the crystal model of the refinement, which made the stills (same domains).
        sites: the site model; ``theta`` its true parameters (edge shifts, eV).
        spot_scale: the true scale G of every still (the kernel's spot scale at the model's fluence).
        background_photons: the true flat background (photons per pixel).
        settings: which per-shot parameters refinement refines (``refine_orientation``,
            ``refine_cell``) and its likelihood (``readout_sigma``, ``model_error_fraction``).
    """
    n = len(shots.shots)
    caches = make_caches(shots, table, model, refine_cell=settings.refine_cell)
    dtype = torch.float64
    states = []
    for shot, cache in zip(shots.shots, caches):
        n_boxes = int(shot.shoeboxes.n_shoeboxes)
        background = torch.zeros((n_boxes, 3), dtype=dtype, device=cache.counts.device)
        background[:, 0] = background_photons
        states.append(ShotState(torch.tensor(math.log(spot_scale), dtype=dtype, device=cache.counts.device),
                                cache.profiles.rotation.clone(), background,
                                None if cache.profiles.cell is None else cache.profiles.cell.clone()))  # fmt: skip
    refinement = Refinement(shots, list(range(n)), n, caches, states, sites, theta.detach().clone(), model, Parallel(),
                            settings)  # fmt: skip
    per_still = torch.stack([shot_information(refinement, i, refinement.theta)[0] for i in range(n)])
    return StillInformation(per_still, per_still.mean(0), sites.parameter_names())


def pseudo_true(shots: ShotSet, table: StructureFactors, model: CrystalModel, sites: SiteModel,
                settings: RefineSettings) -> Tensor:  # fmt: skip
    """(P,) the pseudo-true parameters: where the refinement converges on noise-free stills
    (:func:`probe_stills`: counts = expected photons, given crystals = the true ones), i.e. the
    parameters whose expected rates are closest to the true ones in Kullback-Leibler divergence,
    the limit of the estimate over many stills.  Equal to the truth when the site model can
    express it (a reference moved by an edge shift); for a curve the model cannot reach (the
    measured Fe(III) curve against a moved Fe(II) reference) it is what the edge shift estimates,
    and what a bias must be measured from."""
    n = len(shots.shots)
    caches = make_caches(shots, table, model, refine_cell=settings.refine_cell)
    refinement = Refinement(shots, list(range(n)), n, caches, [], sites, sites.initial(), model, Parallel(), settings)
    refinement.initialise_states()
    refinement.run()
    return refinement.theta.detach().clone()


def predicted_covariance(information: StillInformation, n_stills: int) -> Tensor:
    """(P, P) covariance (inverse information) of the global parameters from ``n_stills`` stills."""
    h = n_stills * information.mean
    return torch.linalg.inv(0.5 * (h + h.T))


def predicted_sigma(information: StillInformation, n_stills: int) -> Tensor:
    """(P,) sigma of each global parameter from ``n_stills`` stills (eV for edge shifts)."""
    return predicted_covariance(information, n_stills).diagonal().clamp(min=0).sqrt()


def site_pairs(n_sites: int) -> list[tuple[int, int]]:
    """Every pair (i, j), i < j, of ``n_sites`` sites, in the order every pairwise report uses."""
    return [(i, j) for i in range(n_sites) for j in range(i + 1, n_sites)]


def difference_variance(covariance: Tensor, i: int, j: int) -> float:
    """Variance of theta_i - theta_j from their covariance (P, P): C_ii + C_jj - 2 C_ij."""
    return float(covariance[i, i] + covariance[j, j] - 2 * covariance[i, j])


def stills_needed(variance_one_still: float, sigma_eV: float) -> int:
    """Stills whose information gives a sigma of at most ``sigma_eV`` to a quantity whose
    variance from one still's mean information is ``variance_one_still`` (eV^2):
    ceil(variance / sigma^2).

    Raises:
        ValueError: a sigma that is not positive.
    """
    if not sigma_eV > 0:
        raise ValueError(f"the target sigma must be > 0 eV, not {sigma_eV}")
    return max(1, math.ceil(variance_one_still / sigma_eV**2 - 1e-9))
