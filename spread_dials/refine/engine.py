"""SPREAD refinement: macrocycles of per-shot (stage 1, Gauss-Newton) and global f'/f'' (stage 2,
L-BFGS) fits.

Pure torch plus a communicator (:class:`spread_dials.parallel.Parallel`, serial or MPI): shots
are striped over ranks; stage 1 is local to a rank; in stage 2 every rank computes its shots'
NLL and gradient, the per-shot values are gathered and summed in global shot order (so any
number of ranks gives the serial result bit for bit), and every rank runs the same L-BFGS.

A macrocycle: (1) stage 1 refines each still's scale, orientation, (optionally) unit-cell
lengths and background planes on its cached profiles (linearised in orientation and cell about
the cache point) with f', f'' fixed; (2) the profiles are recomputed with the kernel at the new
orientation and cell; (3) stage 2 moves the global parameters from the cache: one
Fisher-scoring step of the profile likelihood (default) or L-BFGS with the per-shot parameters
fixed (:meth:`Refinement.stage2`).  Refinement stops when the
total NLL changes by less than ``nll_tolerance``, or no global parameter moves by more than
``parameter_tolerance``, between macrocycles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from spread_dials.physics.structure_factors import StructureFactors
from spread_dials.refine.information import follow_step, psd_pseudo_inverse, shot_information
from spread_dials.refine.model import (
    ShotCache,
    ShotState,
    bragg_terms,
    intensities_and_slope,
    negative_log_likelihood,
    pixel_rate,
    site_intensities,
    sum_channels,
)
from spread_dials.refine.profiles import CrystalModel, ShotProfiles, stills_profiles
from spread_dials.refine.residuals import shoebox_statistics
from spread_dials.refine.shots import ShotSet
from spread_dials.refine.sites import SiteModel
from spread_dials.refine.stage1 import STAGE1_BATCH_PIXELS, refine_shot, refine_shots, trust_radius

__all__ = ["RefineSettings", "Refinement", "initial_state", "channel_summer", "make_caches", "MissingReflectionsError", "refine_shot", "global_objective", "refine_globals", "inverse_resolution"]

logger = logging.getLogger("dials.spread.refine")


@dataclass(frozen=True)
class RefineSettings:
    """Optimiser settings.

    Attributes:
        macrocycles: most macrocycles.
        nll_tolerance: converged when the total NLL changes less than this between macrocycles,
        parameter_tolerance: or when no global parameter moves more than this.
        reject_sigma_z: after each stage 1, shoeboxes whose sigma_Z (rms standardized residual
            over their valid pixels) exceeds this leave the fit for good (None: keep all).
        stage1_iterations: most Gauss-Newton steps per still and stage-1 pass
            (:mod:`spread_dials.refine.stage1`).
        stage2: ``scoring`` (one Fisher-scoring step of the profile likelihood per macrocycle)
            or ``lbfgs`` (L-BFGS with the per-shot parameters fixed); :meth:`Refinement.stage2`.
        stage2_iterations: most L-BFGS iterations of the global parameters per macrocycle.
        max_global_step: largest change of any global parameter in one scoring step (eV for
            edge shifts, electrons for f', f'').
        readout_sigma: None for the Poisson likelihood, else the Gaussian readout width (photons).
        model_error_fraction: > 0: the Gaussian likelihood with a fractional model error in the
            variance (:func:`~spread_dials.refine.model.pixel_variance`); the first macrocycle's
            stage 1 (the ramp) fits the crystals under Poisson (:meth:`Refinement.stage1`).
        refine_orientation: refine the three rotation angles in stage 1 (else only scale and
            background).
        refine_cell: refine each still's unit-cell lengths in stage 1 (under the lattice
            symmetry's ties; the caches must be made with a cell, :func:`make_caches`).
        rotation_step_mrad: trust radius of one stage-1 pass: each rotation angle moves at most
            this far (mrad) from the point where the profiles were linearised.
        cell_step_permille: the same for each cell length (parts per thousand).
        refine_mosaic: refine each still's mosaic spreads about its a, b, c axes in stage 1
            (3 log factors after the cell lengths; the model must have
            ``CrystalModel.mosaic_latent``) under the prior N(0, ``mosaic_sigma``^2) each.
        mosaic_step_percent: trust radius of one stage-1 pass for each mosaic log factor
            (per cent: 20 lets a spread change by ~20 % a pass).
        mosaic_sigma: the prior sd of each mosaic log factor (0.5: a spread within a factor
            exp(0.5) = 1.65 of the model's at one sd).
        relinearisations: most stage-1 passes per still and macrocycle; after each the profiles
            are recomputed at the new orientation and cell; a pass whose largest step is under a
            quarter of its trust radius ends them.
        resolution_ramp: fractions of each still's shoeboxes, lowest resolution first, that the
            first macrocycle's stage 1 fits before all of them (one pass each; :meth:`Refinement.stage1`).
        energy_jitter_sigma_eV: None, or refine each still's energy jitter delta (its recorded
            spectrum's offset from the true energies, eV) in stage 1 under the prior
            N(0, sigma^2) with this sigma (eV); profiled out of the information like the other
            per-shot parameters.
        sum_channels: hold each still's profiles summed over the channels
            (:func:`~spread_dials.refine.model.sum_channels`, 30-60x less memory) at the current
            theta and jitter, summed again wherever the kernel recomputes them; stage 2's line
            search and the first stage-1 pass after it then see the Bragg terms to first order
            in theta (the per-channel profiles give them exactly).  The caches must be made
            summed too (:func:`make_caches` with :func:`channel_summer`).
        noise_flow: None, or a learned density of the standardized residuals under the
            Gaussian likelihood (:class:`~spread_dials.correct.noise_flow.ResidualFlow`,
            dials.spread_correct's for charge-integrating detectors): every NLL and Fisher
            weight goes through it (:func:`~spread_dials.refine.model.pixel_nll`).
    """

    macrocycles: int = 5
    nll_tolerance: float = 0.05
    stage1_iterations: int = 50
    stage2_iterations: int = 50
    stage2: str = "scoring"
    max_global_step: float = 2.0
    readout_sigma: float | None = None
    refine_orientation: bool = True
    model_error_fraction: float = 0.0
    rotation_step_mrad: float = 1.0
    refine_cell: bool = False
    cell_step_permille: float = 1.0
    refine_mosaic: bool = False
    mosaic_step_percent: float = 20.0
    mosaic_sigma: float = 0.5
    relinearisations: int = 3
    parameter_tolerance: float = 0.01
    reject_sigma_z: float | None = None
    resolution_ramp: tuple[float, ...] = (0.3, 0.5, 0.7, 0.85)
    energy_jitter_sigma_eV: float | None = None
    sum_channels: bool = False
    noise_flow: Any = None


def _radii_moved(move: Tensor, radius: Tensor) -> float:
    """The largest |move| in units of its trust radius; offsets held by a zero radius count 0."""
    return float(torch.where(radius > 0, move / radius.clamp(min=torch.finfo(radius.dtype).tiny), 0.0).abs().max())


def channel_summer(sites: SiteModel, theta: Tensor, settings: RefineSettings,
                   points: list[tuple[Tensor, Tensor | None]] | None = None) -> Callable[[int, ShotCache], ShotCache] | None:  # fmt: skip
    """:func:`make_caches`' ``reduce`` for ``settings``: with ``sum_channels`` each still's cache
    summed over the channels at ``theta`` (and, with an energy-jitter prior, at a jitter of
    0 eV, its prior mean), or still i at ``points[i]`` (theta0, jitter0) (a checkpoint's, so a
    resumed refinement goes on from the same caches); else None (per-channel caches)."""
    if not settings.sum_channels:
        return None
    jitter = None if settings.energy_jitter_sigma_eV is None else torch.zeros((), dtype=torch.float64)

    def reduce(i: int, cache: ShotCache) -> ShotCache:
        at, delta = (theta, jitter) if points is None else points[i]
        return cache.with_profiles(sum_channels(cache, sites, at, delta))

    return reduce


def pixel_runs(sizes: list[int], limit: int = STAGE1_BATCH_PIXELS) -> list[list[int]]:
    """Positions 0 .. len(``sizes``) - 1 in consecutive runs of at most ``limit`` pixels in all
    (one still at least): the stills whose profiles are made, or fitted by stage 1, at once."""
    runs, pixels = [], 0
    for k, size in enumerate(sizes):
        if not runs or pixels + size > limit:
            runs.append([])
            pixels = 0
        runs[-1].append(k)
        pixels += size
    return runs


def initial_state(cache: ShotCache, intensity: Tensor, n_shoeboxes: int, iterations: int = 50, jitter: bool = False) -> ShotState:
    """Starting per-shot parameters: flat background levels and the scale G from the linear least
    squares fit counts ~ level_b + G * bragg (alternating closed-form updates); with ``jitter``
    an energy jitter of 0 eV (its prior mean)."""
    dtype = cache.counts.dtype
    bragg = bragg_terms(cache, intensity, jacobian=False).value
    valid = cache.fitted.to(dtype)
    sb = cache.pixel_shoebox
    device = cache.counts.device
    n_valid = torch.zeros(n_shoeboxes, dtype=dtype, device=device).index_add(0, sb, valid).clamp(min=1)
    scale = torch.tensor(0.0, dtype=dtype, device=device)
    for _ in range(iterations):
        level = torch.zeros(n_shoeboxes, dtype=dtype, device=device).index_add(0, sb, (cache.counts - scale * bragg) * valid) / n_valid
        scale = ((cache.counts - level[sb]) * bragg * valid).sum() / (bragg * bragg * valid).sum().clamp(min=1e-300)
    background = torch.zeros((n_shoeboxes, 3), dtype=dtype, device=device)
    background[:, 0] = level.clamp(min=1e-3)
    cell = None if cache.profiles.cell is None else cache.profiles.cell.clone()
    jitter_eV = torch.zeros((), dtype=dtype, device=device) if jitter else None
    return ShotState(torch.log(scale.clamp(min=1e-12)), cache.profiles.rotation.clone(), background, cell, jitter_eV)


def global_objective(
    theta: Tensor, caches: list[ShotCache], states: list[ShotState], sites: SiteModel, readout_sigma: float | None,
    model_error_fraction: float = 0.0, noise_flow: Any = None,
) -> list[Tensor]:
    """Each local still's weighted NLL as a function of the global parameters ``theta``."""
    values = []
    for cache, state in zip(caches, states):
        lam, _ = pixel_rate(cache, state, site_intensities(sites, theta, cache, state.energy_offset))
        values.append(cache.weight * negative_log_likelihood(lam, cache.counts, cache.fitted, readout_sigma, model_error_fraction,
                                                                noise_flow))  # fmt: skip
    return values


def _in_still_order(refinement, local: list) -> list:
    """Every rank's per-still values (``local``: one per local still of ``refinement``, which
    gives the comm, its shot_index and n_shots), gathered and put in global still order: what
    makes :class:`Refinement`'s ordered sums rank-count independent."""
    gathered = refinement.comm.allgather(list(zip(refinement.shot_index, local)))
    by_index = dict(pair for part in gathered for pair in part)
    return [by_index[i] for i in range(refinement.n_shots) if i in by_index]


@dataclass
class Refinement:
    """The state of one refinement on this rank.

    Attributes:
        shots: this rank's stills (geometry shared by all ranks).
        shot_index: global index of each local still (for ordered sums across ranks).
        n_shots: total stills over all ranks.
        caches, states: per local still.
        sites: the global model; theta: its parameters (identical on every rank).
        crystal_model: fixed crystal assumptions.
        comm: the communicator.
        history: per macrocycle {"macrocycle", "nll", "theta", "seconds"}.
        profile_map: applied to every still's profiles as the kernel recomputes them (index of
            the local still, physics profiles -> the profiles the fit uses; dials.spread_correct
            maps them through its learned correction), or None.
    """

    shots: ShotSet
    shot_index: list[int]
    n_shots: int
    caches: list[ShotCache]
    states: list[ShotState]
    sites: SiteModel
    theta: Tensor
    crystal_model: CrystalModel
    comm: object
    settings: RefineSettings
    history: list[dict] = field(default_factory=list)
    profile_map: Callable[[int, ShotProfiles], ShotProfiles] | None = None

    def __post_init__(self) -> None:
        """Raises ValueError: ``settings.refine_mosaic`` and the model's mosaic latent differ (the
        one says which offsets stage 1 refines, the other which the caches carry)."""
        if self.settings.refine_mosaic != self.crystal_model.mosaic_latent:
            raise ValueError("settings.refine_mosaic and the CrystalModel's mosaic_latent must agree "
                             "(the stills' offsets carry the mosaic factors exactly when they are refined)")  # fmt: skip

    def map_profiles(self, profile_map: Callable[[int, ShotProfiles], ShotProfiles]) -> None:
        """Route every still's profiles through ``profile_map`` (:attr:`profile_map`): the
        current caches' now, the kernel's recomputations from here on."""
        self.profile_map = profile_map
        self.caches = [c.with_profiles(profile_map(i, c.profiles)) for i, c in enumerate(self.caches)]

    def profiles_at(self, i: int, state: ShotState) -> ShotProfiles:
        """Local still i's profiles (and derivatives) recomputed by the kernel at the crystal
        offsets of ``state``, through :attr:`profile_map`."""
        return self.profiles_of([i], [state])[0]

    def profiles_of(self, indices: list[int], states: list[ShotState]) -> list[ShotProfiles]:
        """:meth:`profiles_at` of the local stills ``indices`` at ``states`` (made together on a
        GPU: :func:`~spread_dials.refine.profiles.stills_profiles`)."""
        made = stills_profiles(self.shots, [self.shots.shots[i] for i in indices], self.crystal_model,
                               [s.rotation for s in states], [s.cell for s in states])  # fmt: skip
        if self.profile_map is not None:
            made = [self.profile_map(i, p) for i, p in zip(indices, made)]
        if self.settings.sum_channels:  # at the current theta and each still's jitter
            jitter = self.settings.energy_jitter_sigma_eV is not None
            made = [sum_channels(self.caches[i].with_profiles(p), self.sites, self.theta, s.energy_jitter() if jitter else None)
                    for i, p, s in zip(indices, made, states)]  # fmt: skip
        return made

    def curves_intensity(self, i: int, theta: Tensor | None = None, state: ShotState | None = None) -> Tensor:
        """(B, C) |F_h(E_c - delta)|^2 of local still i at ``theta`` and the energy jitter delta
        of ``state`` (defaults: the current ones)."""
        state = self.states[i] if state is None else state
        return site_intensities(self.sites, self.theta if theta is None else theta, self.caches[i], state.energy_offset)

    def stage1_terms(self, indices: list[int], states: list[ShotState], theta: Tensor | None = None,
                     jitter: bool | None = None) -> tuple[list[Tensor], list[Tensor] | None]:  # fmt: skip
        """(intensities, slopes): what stage 1 (:func:`refine_shots`) takes for the local stills
        ``indices`` from ``states`` at ``theta`` (default the current): |F|^2 at each still's
        energy jitter and, when the jitter is fitted (``jitter``; default: with the jitter
        prior), its slope in the jitter (else None); detached."""
        theta = self.theta if theta is None else theta
        if not (self.settings.energy_jitter_sigma_eV is not None if jitter is None else jitter):
            return [self.curves_intensity(i, theta, s).detach() for i, s in zip(indices, states)], None
        pairs = [intensities_and_slope(self.sites, theta, self.caches[i], s.energy_jitter()) for i, s in zip(indices, states)]
        return [v for v, _ in pairs], [d for _, d in pairs]

    def ordered_sum(self, local: list[Tensor]) -> Tensor:
        """Sum of per-still values over all ranks in global still order (rank-count independent)."""
        total = None
        for value in _in_still_order(self, [v.detach().cpu() for v in local]):
            total = value.clone() if total is None else total + value
        return total

    def ordered_scatter_sum(self, local: list[tuple[Tensor, Tensor]], size: int) -> Tensor:
        """(size, size) float64 on the CPU: the sum over all ranks' stills, in global still order
        (rank-count independent, as :meth:`ordered_sum`), of each local still's block (Q_i, Q_i)
        placed at rows and columns ``index`` (Q_i,) of a zero matrix; ``local`` holds one
        (index, block) per local still.  A block of a matrix whose other entries are 0 for that
        still (the leaky correction's reflections a still does not see) travels small."""
        total = torch.zeros((size, size), dtype=torch.float64)
        for index, block in _in_still_order(self, [(ix.cpu(), m.detach().cpu()) for ix, m in local]):
            total[index.unsqueeze(-1), index] += block
        return total

    def ordered_total(self, values: list[float]) -> float:
        """Sum of per-still numbers over all ranks in global still order (0 without stills)."""
        total = self.ordered_sum([torch.tensor([v], dtype=torch.float64) for v in values])
        return 0.0 if total is None else float(total[0])

    def prior_hessian(self, theta: Tensor) -> Tensor:
        """(P, P) Hessian of the site model's negative log prior at ``theta`` (autograd)."""
        return torch.autograd.functional.hessian(self.sites.negative_log_prior, theta.detach())

    def information(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """(profiled, conditional) Fisher information of theta over all stills (summed in still
        order; :func:`~spread_dials.refine.information.shot_information`) plus the prior's Hessian."""
        profiled, conditional, _ = self.information_and_responses(theta)
        return profiled, conditional

    def information_and_responses(self, theta: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """:meth:`information` and each local still's per-shot response (S_i, P) to theta
        (:attr:`~spread_dials.refine.information.ShotInformation.response`)."""
        parts = [shot_information(self, i, theta) for i in range(len(self.caches))]
        prior = self.prior_hessian(theta)
        sums = [self.ordered_sum([part[k] for part in parts]) for k in (0, 1)]
        profiled, conditional = (prior if total is None else total + prior for total in sums)
        return profiled, conditional, [part.response for part in parts]

    def still_nlls(self, theta: Tensor) -> list[Tensor]:
        """Each local still's weighted NLL as a function of ``theta`` (this refinement's likelihood)."""
        return global_objective(theta, self.caches, self.states, self.sites, self.settings.readout_sigma,
                                self.settings.model_error_fraction, self.settings.noise_flow)  # fmt: skip

    def still_values_and_grads(self, theta: Tensor) -> list[Tensor]:
        """(1 + P,) per local still: its NLL and its gradient in ``theta`` (its score)."""
        theta = theta.detach().clone().requires_grad_(True)
        out = []
        for value in self.still_nlls(theta):
            (grad,) = torch.autograd.grad(value, theta)
            out.append(torch.cat([value.detach().reshape(1).to(grad.device), grad]))
        return out

    def global_value_and_grad(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Total NLL + prior and its gradient in theta (every rank gets the same numbers)."""
        total = self.ordered_sum(self.still_values_and_grads(theta))
        if total is None:
            total = torch.zeros(theta.numel() + 1, dtype=theta.dtype)
        prior_theta = theta.detach().clone().requires_grad_(True)
        prior = self.sites.negative_log_prior(prior_theta)
        (prior_grad,) = torch.autograd.grad(prior, prior_theta)
        return total[0] + prior.detach(), total[1:] + prior_grad

    def stage1(self, progress: Callable[[int, int], None] | None = None, ramp: bool = False) -> tuple[float, float]:
        """Per-shot refinement, then the profiles recomputed at the new offsets: pass by pass,
        every local still that is still moving fitted in one batch (:func:`refine_shots`).

        With ``ramp`` (the first macrocycle) each still first fits growing sets of its
        lowest-resolution shoeboxes (``settings.resolution_ramp``: fractions of them), the
        profiles recomputed after each: a cell or orientation error moves a high-resolution spot
        by more than its width, out of the linearisation's reach, while the low-resolution spots
        still pull the crystal towards the truth.

        Returns:
            (total NLL over all ranks (summed in still order), the largest move of any still's
            offsets in units of its trust radius, over all ranks).
        """
        settings = self.settings
        if ramp and settings.energy_jitter_sigma_eV is not None:
            # the first macrocycle's edge shifts are their starting values: a jitter fitted now
            # would take up their error (the data fix only delta + Delta_E), so the jitters join
            # from the second on
            settings = replace(settings, energy_jitter_sigma_eV=None)
        if ramp and settings.model_error_fraction > 0:
            # the first stage 1 fits the crystals under Poisson: a model error's Gaussian weighs a
            # pixel the misplaced model predicts near 0 by (k - lambda)^2 / lambda, and its fit
            # from stills_process's crystals crawled (rubredoxin, 5 %: 7 macrocycles, NLL from
            # 2.7e7 to 1e5; benchmarks/RESULTS.md session 17)
            settings = replace(settings, model_error_fraction=0.0)
        moves_crystal = settings.refine_orientation or settings.refine_cell or settings.refine_mosaic
        passes = settings.relinearisations if moves_crystal else 1
        n = len(self.caches)
        starts = [s.offsets.clone() for s in self.states]
        radii = [trust_radius(s.numel(), settings, s) for s in starts]
        fractions = list(settings.resolution_ramp) if ramp and moves_crystal else []
        orders = [inverse_resolution(shot) for shot in self.shots.shots] if fractions else None
        nlls, active, finished = [0.0] * n, list(range(n)), 0
        for fraction in [*fractions, *([None] * passes)]:
            still_moving = []
            for chunk in self._pixel_chunks(active):  # one batch of stage 1 at a time: its old profiles freed as it goes
                caches = [self.caches[i] for i in chunk]
                if fraction is not None:  # the lowest-resolution shoeboxes only
                    lows = [orders[i] <= torch.quantile(orders[i], fraction) for i in chunk]
                    caches = [replace(c, rejected=~low if c.rejected is None else c.rejected | ~low) for c, low in zip(caches, lows)]
                states = [self.states[i] for i in chunk]
                intensities, slopes = self.stage1_terms(chunk, states, jitter=settings.energy_jitter_sigma_eV is not None)
                fits = refine_shots(caches, states, intensities, settings, slopes)
                profiles = self.profiles_of(chunk, [state for state, _ in fits])
                for i, (state, nll), made, before in zip(chunk, fits, profiles, states):
                    step = _radii_moved(state.offsets - self.caches[i].profiles.offsets, radii[i])
                    if settings.energy_jitter_sigma_eV is not None:
                        step = max(step, abs(float(state.energy_jitter() - before.energy_jitter())) / settings.energy_jitter_sigma_eV)
                    self.states[i], nlls[i] = state, nll
                    self.caches[i] = self.caches[i].with_profiles(made)
                    if fraction is None and step < 0.25:
                        finished += 1
                        if progress is not None:
                            progress(finished, n)
                    else:
                        still_moving.append(i)
            active = still_moving
        for _ in active:  # stills that used every pass
            finished += 1
            if progress is not None:
                progress(finished, n)
        largest = max((_radii_moved(self.states[i].offsets - starts[i], radii[i]) for i in range(n)), default=0.0)
        return self.ordered_total(nlls), float(self.comm.allreduce(largest, op="max"))

    def _pixel_chunks(self, indices: list[int]) -> list[list[int]]:
        """``indices`` of local stills in :func:`pixel_runs`: what stage 1 fits in one batch.
        Stage 1 recomputes a run's profiles before the next, so the old and new profiles of
        every still (each a still's largest tensors) are never held at once: the peak is one
        set plus a run."""
        runs = pixel_runs([int(self.caches[i].counts.numel()) for i in indices])
        return [[indices[k] for k in run] for run in runs]

    def initialise_states(self) -> None:
        """Starting per-shot parameters from the caches at the current theta."""
        jitter = self.settings.energy_jitter_sigma_eV is not None
        self.states = [initial_state(c, site_intensities(self.sites, self.theta, c).detach(),
                                     int(self.shots.shots[i].shoeboxes.n_shoeboxes), jitter=jitter)
                       for i, c in enumerate(self.caches)]  # fmt: skip

    def run(self, start_macrocycle: int = 0, on_macrocycle: Callable[["Refinement"], None] | None = None,
            progress: Callable[[int, int], None] | None = None) -> None:  # fmt: skip
        """Macrocycles until the NLL or the global parameters stop changing (or the most macrocycles)."""
        previous = self.history[-1]["nll"] if self.history else None
        for cycle in range(start_macrocycle, self.settings.macrocycles):
            t0 = time.perf_counter()
            theta_before = self.theta.clone()
            stage1, offsets_moved = self.stage1(progress, ramp=cycle == 0)
            rejected = self.reject_shoeboxes()
            nll = self.stage2()
            self.history.append({"macrocycle": cycle + 1, "stage1_nll": stage1, "nll": nll,
                                 "theta": self.theta.tolist(), "seconds": time.perf_counter() - t0})  # fmt: skip
            logger.info("macrocycle %d: NLL %.3f (stage 1 %.3f), %s, %.1f s", cycle + 1, nll, stage1,
                        ", ".join(f"{n} {v:.3f}" for n, v in zip(self.sites.parameter_names(), self.theta.tolist())
                                  ) if self.theta.numel() <= 8 else f"{self.theta.numel()} parameters",
                        time.perf_counter() - t0)  # fmt: skip
            if on_macrocycle is not None:
                on_macrocycle(self)
            moved = float((self.theta - theta_before).abs().max()) if self.theta.numel() else 0.0
            if rejected:  # the fit's pixels changed: compare from the next macrocycle on
                previous = nll
                continue
            if previous is not None and abs(previous - nll) < self.settings.nll_tolerance:
                logger.info("converged: NLL changed by %.4f < %g", abs(previous - nll), self.settings.nll_tolerance)
                break
            if previous is not None and moved < self.settings.parameter_tolerance and offsets_moved < 0.05:
                logger.info("converged: global parameters moved by at most %.4g < %g, crystal offsets by at most %.3f of "
                            "their trust radius", moved, self.settings.parameter_tolerance, offsets_moved)  # fmt: skip
                break
            previous = nll

    def reject_shoeboxes(self) -> int:
        """Leave out of the fit the shoeboxes whose sigma_Z exceeds ``settings.reject_sigma_z``
        (a neighbour's spot in the box, a model far off); returns how many were newly left out
        on all ranks, and logs it."""
        threshold = self.settings.reject_sigma_z
        if threshold is None:
            return 0
        new = 0
        for i, cache in enumerate(self.caches):
            n_b = int(self.shots.shots[i].shoeboxes.n_shoeboxes)
            stats = shoebox_statistics(cache, self.states[i], self.curves_intensity(i).detach(), n_b,
                                       self.settings.readout_sigma, self.settings.model_error_fraction)  # fmt: skip
            bad = torch.as_tensor(stats["sigma_z"] > threshold, device=cache.counts.device)
            before = cache.rejected if cache.rejected is not None else torch.zeros_like(bad)
            new += int((bad & ~before).sum())
            self.caches[i] = replace(cache, rejected=before | bad)
        new = int(self.comm.allreduce(new))
        total = int(self.comm.allreduce(sum(int(c.rejected.sum()) for c in self.caches)))
        logger.info("Left out of the fit %d more shoeboxes with sigma_Z > %g (%d in all; spread.rejected in the "
                    "output reflections)", new, threshold, total)  # fmt: skip
        return new

    def stage2(self) -> float:
        """The global parameters from the caches (``settings.stage2``); returns the total NLL +
        prior at the new theta (per-shot parameters as stage 1 left them).

        ``scoring``: one Fisher-scoring step on the profile likelihood, the per-shot parameters
        profiled out: theta - t (sum_i I_i + prior Hessian)^-1 (gradient), I_i each still's
        profiled information (:func:`~spread_dials.refine.information.shot_information`); with
        stage 1 at its optimum for the current theta the gradient at fixed per-shot parameters
        is the profile likelihood's.  Each parameter moves at most ``max_global_step``; t from a
        backtracking line search on the profile NLL (:meth:`scoring_step`).
        ``lbfgs``: L-BFGS with the per-shot parameters fixed (conditional: steps shrink by the
        ratio of the profiled to the conditional information, ~30x on the demo's stills).
        """
        if self.settings.stage2 == "lbfgs":
            self.theta = refine_globals(self.global_value_and_grad, self.theta, self.settings.stage2_iterations)
        else:
            self.scoring_step()
        value, _ = self.global_value_and_grad(self.theta)
        return float(value)

    def scoring_step(self) -> None:
        """theta + t d, d the Fisher-scoring direction of the profile likelihood (capped at
        ``max_global_step``), t in 1, 1/4, 1/16 the first that lowers the profile NLL on the
        caches (every still's scale, offsets and planes refitted at the trial theta by stage 1's
        Gauss-Newton, without recomputing profiles); the refitted per-shot parameters are kept.
        Under misfit the Fisher information can misjudge the curvature either way (too small a
        step on bright stills, too large along a poorly determined direction): the line search
        keeps every step downhill.  No step when none of the three lowers it.  Each trial's
        refits start from the per-shot parameters moved by their linear response to the step
        (:func:`~spread_dials.refine.information.follow_step`)."""
        # the per-shot parameters refitted on the current caches (stage 1 recomputed the profiles
        # after its last fit): the profile NLL at theta that a trial must beat
        value, self.states = self._profile_nll(self.theta)
        _, grad = self.global_value_and_grad(self.theta)
        information, _, responses = self.information_and_responses(self.theta)
        step = -psd_pseudo_inverse(0.5 * (information + information.T)) @ grad
        largest = float(step.abs().max()) if step.numel() else 0.0
        if largest > self.settings.max_global_step:
            step = step * (self.settings.max_global_step / largest)
        for t in (1.0, 0.25, 0.0625):
            trial = self.theta + t * step
            starts = [follow_step(s, r, t * step, self.settings) for s, r in zip(self.states, responses)]
            profile, states = self._profile_nll(trial, starts)
            if profile < value:
                self.theta, self.states = trial, states
                return

    def refit_shots(self, theta: Tensor, starts: list[ShotState] | None = None) -> list[tuple[ShotState, float]]:
        """(state, NLL) of every local still refitted by stage 1's Gauss-Newton at ``theta`` from
        ``starts`` (default the current per-shot parameters) on the current caches' profiles."""
        starts = self.states if starts is None else starts
        intensities, slopes = self.stage1_terms(list(range(len(self.caches))), starts, theta)
        return refine_shots(self.caches, starts, intensities, self.settings, slopes)

    def _profile_nll(self, theta: Tensor, starts: list[ShotState] | None = None) -> tuple[float, list[ShotState]]:
        """Profile NLL + prior at ``theta`` on the current caches (every still's per-shot
        parameters refitted by stage 1's Gauss-Newton from ``starts``, default their current
        values, profiles kept; each still's NLL times its ``weight``, summed in still order) and
        the refitted per-shot parameters."""
        fits = self.refit_shots(theta, starts)
        profile = self.ordered_total([cache.weight * nll for cache, (_, nll) in zip(self.caches, fits)])
        profile += float(self.sites.negative_log_prior(theta))
        return profile, [state for state, _ in fits]


def inverse_resolution(shot) -> Tensor:
    """(B,) |h| in reciprocal space (1/A) of each shoebox's reflection under the given crystal."""
    q = shot.shoeboxes.miller_index.to(shot.real_space.dtype) @ torch.linalg.inv(shot.real_space).T
    return q.norm(dim=-1)


def table_rows(table: StructureFactors, miller_index: Tensor, spoil_hkl: bool = False) -> Tensor:
    """(B,) rows of ``table`` for Miller indices (B, 3); with ``spoil_hkl`` (the negative
    control) those of (h, k, l + 1), or of (h, k, l - 1) where l + 1 is not in the table.
    ``table.n_reflections`` marks a reflection the table lacks."""
    if not spoil_hkl:
        return table.index_of(miller_index)
    step = torch.tensor([0, 0, 1], dtype=miller_index.dtype)
    up, down = table.index_of(miller_index + step), table.index_of(miller_index - step)
    return torch.where(up < table.n_reflections, up, down)


class MissingReflectionsError(ValueError):
    """A still's reflections are missing from the structure-factor table (:func:`make_caches`)."""


def make_caches(shots: ShotSet, table: StructureFactors, model: CrystalModel, rotations: list[Tensor] | None = None,
                spoil_hkl: bool = False, shuffle_seed: int | None = None, cells: list[Tensor] | None = None,
                refine_cell: bool = False, reduce: Callable[[int, ShotCache], ShotCache] | None = None) -> list[ShotCache]:  # fmt: skip
    """Each still's cache: pixels, F0 and G of its reflections (from ``table``) and profiles at
    ``rotations`` (default zero) and, with ``refine_cell`` or ``model.mosaic_latent``, at log
    cell-length changes [and mosaic log factors] ``cells`` (default zero;
    ``model.n_cell_parameters`` [+ 3] each), made ``STAGE1_BATCH_PIXELS`` pixels of
    stills at a time, each still's cache passed through ``reduce`` (index, cache) -> cache
    (e.g. :func:`channel_summer`'s) before the next run's are made.

    Negative controls (refinement must then fail to find the truth): ``spoil_hkl`` looks F0 and
    G up at (h, k, l + 1), or at (h, k, l - 1) where l + 1 lies beyond the table (a table made
    to the detector's reach); ``shuffle_seed`` permutes the channel energies at which f', f'' are
    evaluated (the kernel keeps the true ones), one seeded permutation per still.

    Raises:
        MissingReflectionsError: a reflection missing from the structure-factor table.
    """
    caches, rows_of, offsets = [], [], []
    for i, shot in enumerate(shots.shots):
        rows = table_rows(table, shot.shoeboxes.miller_index.cpu(), spoil_hkl)
        if bool((rows >= table.n_reflections).any()):
            raise MissingReflectionsError(f"still {shot.identifier}: reflections missing from the structure-factor table")
        rows_of.append(rows)
        device = shot.shoeboxes.counts.device
        rotation = torch.zeros(3, dtype=torch.float64) if rotations is None else rotations[i]
        cell = None
        if refine_cell or model.mosaic_latent:
            n_cell = model.n_cell_parameters + model.n_mosaic_parameters
            cell = (torch.zeros(n_cell, dtype=torch.float64) if cells is None else cells[i]).to(device)
        offsets.append((rotation.to(device), cell))
    for run in pixel_runs([int(shot.shoeboxes.n_pixels) for shot in shots.shots]):
        profiles = stills_profiles(shots, [shots.shots[i] for i in run], model, [offsets[i][0] for i in run],
                                   [offsets[i][1] for i in run])  # fmt: skip
        for i, made in zip(run, profiles):
            sb = shots.shots[i].shoeboxes
            device = sb.counts.device
            fast, slow = sb.pixel_coordinates()
            energy = shots.shots[i].energy_eV.cpu()
            if shuffle_seed is not None:
                energy = energy[torch.randperm(energy.numel(), generator=torch.Generator().manual_seed(shuffle_seed + i))]
            cache = ShotCache(
                pixel_shoebox=sb.pixel_shoebox(), fast=fast, slow=slow, counts=sb.counts, valid=sb.valid,
                F0=table.F0[rows_of[i]].to(device), G=table.G[rows_of[i]].to(device), energy_eV=energy, profiles=made,
            )  # fmt: skip
            caches.append(cache if reduce is None else reduce(i, cache))
    return caches


def refine_globals(value_and_grad: Callable[[Tensor], tuple[Tensor, Tensor]], theta: Tensor, iterations: int) -> Tensor:
    """L-BFGS over the global parameters with an external value-and-gradient (MPI-summed)."""
    x = theta.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([x], max_iter=iterations, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-10, tolerance_change=1e-14, history_size=20)  # fmt: skip

    def closure() -> Tensor:
        optimizer.zero_grad()
        value, grad = value_and_grad(x.detach())
        x.grad = grad.to(x)
        return value.to(x)

    optimizer.step(closure)
    return x.detach()
