"""dials.spread_refine's job: load, set up, refine (with checkpoints), estimate uncertainty, report.

Rank 0 writes every shared output; each rank refines its stripe of the input file pairs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from spread_dials.refine.engine import Refinement, RefineSettings, channel_summer, make_caches
from spread_dials.refine.model import ShotState
from spread_dials.refine.profiles import CrystalModel
from spread_dials.refine.references import matched_edge_shifts
from spread_dials.refine.sites import EdgeShiftSites, FreeSites, SplineKKSites
from spread_dials.refine.uncertainty import bootstrap, curvature, interval, state_probabilities
from spread_dials.util.atomic import atomic_path
from spread_dials.util.errors import SpreadError

__all__ = ["RefineSetup", "checkpoint_saver", "checkpoint_states", "has_cell_vector", "load_checkpoint", "load_setup", "make_refinement", "refined_residuals",
           "restore_checkpoint", "run_refinement",
           "saved_cache_points", "saved_states", "saved_summed_points", "truth_curves_from_record", "truth_edge_shifts"]

logger = logging.getLogger("dials.spread.refine")


def _pairs(experiments, reflections) -> list[tuple[Path, Path]]:
    if not experiments or not reflections:
        raise SpreadError("give the integrated experiments and reflections: dials.spread_refine idx-*_integrated.expt "
                          "idx-*_integrated.refl")  # fmt: skip
    if len(experiments) != len(reflections):
        raise SpreadError(f"{len(experiments)} experiment files but {len(reflections)} reflection files: give them in pairs")
    return [(Path(e), Path(r)) for e, r in zip(experiments, reflections)]


def _crystal_model(params, cell_ties: tuple[int, int, int]) -> CrystalModel:
    c = params.crystal
    fluence = params.beam.photons / (math.pi * (0.5e-6 * params.beam.diameter_um) ** 2)
    return CrystalModel(tuple(float(x) for x in c.ncells_abc), float(c.mosaic_spread_deg), int(c.mosaic_domains),
                        c.shape, int(params.random.seed), fluence, int(c.oversample), c.domain_set, cell_ties,
                        mosaic_latent=bool(params.refinement.refine_mosaic))  # fmt: skip


def has_cell_vector(params) -> bool:
    """Whether each still's state and cache carry a cell vector (cell lengths [, mosaic factors])."""
    return bool(params.refinement.refine_cell or params.refinement.refine_mosaic)


#: the scopes whose values change the refinement (a checkpoint of other values is refused)
_REFINING_SCOPES = ("input", "structure", "reference", "model", "crystal", "beam", "likelihood", "readout_sigma_photons",
                    "model_error_fraction",
                    "refinement", "controls", "random")  # fmt: skip


def _fingerprint(params, pairs) -> str:
    """What a checkpoint must match: the input files and every parameter that changes the
    refinement (not outputs, uncertainty, resume, the number of macrocycles or flag_sigma_z)."""
    from spread_dials.command_line.refine import phil_scope

    working = phil_scope.format(python_object=params)
    text = "".join(working.get(name).as_str() for name in _REFINING_SCOPES)
    text = "\n".join(line for line in text.splitlines() if not any(k in line for k in ("resume", "macrocycles", "tolerance", "flag_sigma_z")))
    text += json.dumps([str(p.resolve()) for pair in pairs for p in pair])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class RefineSetup:
    """What dials.spread_refine and dials.spread_correct set up from their inputs and PHIL on
    this rank: the local stills (on the device), their global order, the structure's F0/G
    table, the sites and their references, the crystal model and the optimiser settings."""

    pairs: list[tuple[Path, Path]]
    shots: object
    shot_index: list[int]
    n_shots: int
    n_shoeboxes: int
    n_pixels: int
    band: tuple[float, float]
    prepared: object
    table: object
    refs: object
    sites: object
    model: CrystalModel
    settings: RefineSettings


def load_setup(ctx, experiments, reflections) -> RefineSetup:
    """Load the stills of the file pairs striped over the ranks and set up the model from
    ``ctx.params`` (the scopes of command_line/refine.py).

    Raises:
        SpreadError: bad inputs or parameters (one line each).
    """
    from spread_dials.adapters.anomalous_setup import atom_name
    from spread_dials.refine.loader import load_shots
    from spread_dials.refine.setup import prepare_structure, site_references

    params, comm = ctx.params, ctx.mpi
    pairs = _pairs(experiments, reflections)
    if params.likelihood == "gaussian_readout" and params.readout_sigma_photons is None:
        raise SpreadError("likelihood=gaussian_readout needs readout_sigma_photons (photons)")
    jitter = params.refinement.energy_jitter_sigma_eV
    if jitter is not None and not jitter > 0:
        raise SpreadError(f"refinement.energy_jitter_sigma_eV must be > 0 eV (or None: not refined), not {jitter}")
    if jitter is not None and not params.refinement.refine_cell:
        logger.warning("refinement.energy_jitter_sigma_eV without refinement.refine_cell: a jitter also moves every "
                       "spot's Bragg condition, which only a refined cell absorbs (docs/refine.md)")  # fmt: skip
    t0 = time.perf_counter()
    # ranks take whole file pairs in turn, or (fewer pairs than ranks) every rank reads every
    # pair and keeps every size-th experiment
    by_file = len(pairs) >= comm.size
    local = [pairs[i] for i in range(comm.rank, len(pairs), comm.size)] if by_file else pairs
    stripe = (0, 1) if by_file else (comm.rank, comm.size)
    shots = None
    error = None
    try:
        shots = load_shots([p[0] for p in local], [p[1] for p in local], quantum_gain=params.input.quantum_gain,
                           spectra_file=params.input.spectra_file, min_shoeboxes=params.refinement.min_shoeboxes,
                           max_shoebox_px=params.refinement.max_shoebox_px, stripe=stripe)  # fmt: skip
    except SpreadError as e:
        error = str(e) if by_file or "no still has" not in str(e) else f"{e} on MPI rank {comm.rank} of {comm.size}: run fewer ranks"
    errors = [e for e in comm.allgather(error) if e]
    if errors:
        raise SpreadError(errors[0])
    counts = comm.allgather(len(shots.shots) if shots else 0)
    n_shots = sum(counts)
    if n_shots == 0:
        raise SpreadError("no still has enough integrated shoeboxes to refine")
    shots = _common_sensor(shots, comm)
    if shots is not None and ctx.device.type != "cpu":
        shots = shots.to(ctx.device)
    logger.info("Kernel and pixels on %s (float64; device.dtype applies to dials.spread_simulate)", ctx.device)
    # the global still order is that of the experiment identifiers: the same on any number of ranks
    identifiers = [s.identifier for s in shots.shots] if shots else []
    order = {name: i for i, name in enumerate(sorted(x for part in comm.allgather(identifiers) for x in part))}
    shot_index = [order[name] for name in identifiers]
    # global quantities: d_min, band
    d_local, lo_local, hi_local = [], [], []
    for shot in shots.shots if shots else []:
        q = shot.shoeboxes.miller_index.double() @ torch.linalg.inv(shot.real_space).T
        d_local.append(float(1.0 / q.norm(dim=-1).max()))
        used = shot.weight > 0
        lo_local.append(float(shot.energy_eV[used].min()))
        hi_local.append(float(shot.energy_eV[used].max()))
    # with spoil_hkl, l + 1 must stay inside the table
    d_min = min(x for part in comm.allgather(d_local) for x in part) * (0.85 if params.controls.spoil_hkl else 0.99)
    band = (min(x for part in comm.allgather(lo_local) for x in part), max(x for part in comm.allgather(hi_local) for x in part))
    n_sb = comm.allreduce(sum(s.shoeboxes.n_shoeboxes for s in shots.shots) if shots else 0)
    n_px = comm.allreduce(sum(s.shoeboxes.n_pixels for s in shots.shots) if shots else 0)
    logger.info("Loaded %d stills, %d shoeboxes, %d pixels in %.1f s; spectra %.1f-%.1f eV; d_min %.2f A",
                n_shots, n_sb, n_px, time.perf_counter() - t0, band[0], band[1], d_min)  # fmt: skip

    prepared, table, free_atom_table = prepare_structure(params.structure, d_min, 0.5 * (band[0] + band[1]))
    refs = site_references(params.reference, prepared.sites, band, free_atom_table)
    if params.model.tie == "atom_name":
        names = [atom_name(s) for s in prepared.sites]
        labels = list(dict.fromkeys(names))
        group = [labels.index(n) for n in names]
    else:
        labels = [s.label for s in prepared.sites]
        group = list(range(len(prepared.sites)))
    if params.model.anomalous == "edge_shift":
        start = list(params.model.start_edge_shift_eV or [0.0])
        start = start * len(labels) if len(start) == 1 else start
        if len(start) != len(labels):
            raise SpreadError(f"model.start_edge_shift_eV: give one value or one per site group ({len(labels)})")
        sites = EdgeShiftSites(refs.reference, group, labels, start, params.model.edge_shift_prior_sigma_eV)
    elif params.model.anomalous == "spline_kk":
        kk = params.model.spline_kk
        n_steps = max(2, math.ceil((band[1] - math.floor(band[0])) / kk.node_step_eV - 1e-9))
        nodes = math.floor(band[0]) + kk.node_step_eV * torch.arange(n_steps + 1, dtype=torch.float64)
        sites = SplineKKSites(refs.reference, group, labels, nodes, kk.smoothness_sigma_e, kk.change_sigma_e)
    else:
        grid = torch.arange(math.floor(band[0]), math.ceil(band[1]) + 1e-9, params.model.free.grid_step_eV, dtype=torch.float64)
        sites = FreeSites(refs.reference, group, labels, grid, params.model.free.smoothness_sigma_e,
                          params.model.free.kramers_kronig_sigma_e)  # fmt: skip
    logger.info("Sites: %s; model %s with %d parameters", ", ".join(f"{s.label} [{r.label}]" for s, r in zip(prepared.sites, refs.reference)),
                sites.kind, sites.initial().numel())  # fmt: skip

    model = _crystal_model(params, shots.cell_ties)
    r = params.refinement
    settings = RefineSettings(
        macrocycles=r.macrocycles, nll_tolerance=r.nll_tolerance, stage1_iterations=r.stage1_iterations,
        stage2_iterations=r.stage2_iterations,
        readout_sigma=params.readout_sigma_photons if params.likelihood == "gaussian_readout" else None,
        refine_orientation=r.refine_orientation, rotation_step_mrad=r.rotation_step_mrad, relinearisations=r.relinearisations,
        refine_cell=r.refine_cell, cell_step_permille=r.cell_step_permille, refine_mosaic=r.refine_mosaic,
        mosaic_step_percent=r.mosaic_step_percent, mosaic_sigma=r.mosaic_sigma,
        resolution_ramp=tuple(r.resolution_ramp or ()), stage2=r.stage2, max_global_step=r.max_global_step,
        parameter_tolerance=r.parameter_tolerance, model_error_fraction=params.model_error_fraction,
        reject_sigma_z=r.reject_sigma_z, energy_jitter_sigma_eV=r.energy_jitter_sigma_eV, sum_channels=r.sum_channels,
    )  # fmt: skip
    return RefineSetup(pairs, shots, shot_index, n_shots, n_sb, n_px, band, prepared, table, refs, sites, model, settings)


def make_refinement(ctx, setup: RefineSetup, rotations: list[Tensor] | None = None, cells: list[Tensor] | None = None,
                    summed: list[tuple[Tensor, Tensor | None]] | None = None) -> Refinement:  # fmt: skip
    """The engine over ``setup``'s stills: profiles at the given cache points (default the
    stills' own crystals; with ``settings.sum_channels`` summed over the channels at the
    sites' start or at ``summed``, a checkpoint's :func:`saved_summed_points`), theta at the
    sites' start, no per-shot states yet."""
    params, r = ctx.params, ctx.params.refinement
    if params.controls.shuffle_channels:
        logger.info("NEGATIVE CONTROL: channel energies shuffled for f'/f'' (the kernel keeps the true ones)")
    if params.controls.spoil_hkl:
        logger.info("NEGATIVE CONTROL: structure factors looked up at h, k, l+1")
    t1 = time.perf_counter()
    sites = setup.sites
    caches = make_caches(setup.shots, setup.table, setup.model, rotations, spoil_hkl=params.controls.spoil_hkl,
                         shuffle_seed=params.random.seed if params.controls.shuffle_channels else None,
                         cells=cells, refine_cell=r.refine_cell,
                         reduce=channel_summer(sites, sites.initial(), setup.settings, summed))  # fmt: skip
    logger.info("Profiles of %d local stills in %.1f s%s", len(caches), time.perf_counter() - t1,
                " (summed over the channels)" if setup.settings.sum_channels else "")  # fmt: skip
    return Refinement(setup.shots, setup.shot_index, setup.n_shots, caches, [], sites, sites.initial(), setup.model, ctx.mpi,
                      setup.settings)  # fmt: skip


def run_refinement(ctx, experiments, reflections) -> dict:
    """The whole job for ``ctx.params`` (see command_line/refine.py)."""
    params, comm = ctx.params, ctx.mpi
    t0 = time.perf_counter()
    setup = load_setup(ctx, experiments, reflections)
    shots, pairs = setup.shots, setup.pairs
    checkpoint = ctx.output_path(f"{params.output.prefix}.checkpoint.pt")
    fingerprint = _fingerprint(params, pairs)
    saved = load_checkpoint(checkpoint, fingerprint) if params.refinement.resume else None
    ctx.accept_inputs()  # the inputs are checked: from here on the log and outputs stay
    # the caches at the saved cache points (stage 2 may move the states off them)
    with_cell = has_cell_vector(params)
    rotations, cells = saved_cache_points(saved, shots, with_cell, ctx.device) if saved is not None else (None, None)
    refinement = make_refinement(ctx, setup, rotations, cells, saved_summed_points(saved, shots) if saved is not None else None)
    start_cycle = 0
    if saved is not None:
        start_cycle = restore_checkpoint(refinement, saved, with_cell, ctx.device)
        logger.info("Resuming after macrocycle %d (%s)", start_cycle, checkpoint.name)
    else:
        refinement.initialise_states()
    rate = StillsProgress(len(refinement.caches))
    refinement.run(start_cycle, on_macrocycle=checkpoint_saver(checkpoint, fingerprint, comm), progress=rate)
    residuals = refined_residuals(refinement, comm, setup.settings.readout_sigma, params.refinement.flag_sigma_z)
    results = _report(ctx, refinement, setup.refs, setup.prepared, setup.band, setup.n_shots, setup.n_shoeboxes,
                      setup.n_pixels, time.perf_counter() - t0, file_pairs=pairs, residuals=residuals)  # fmt: skip
    return results


def refined_residuals(refinement: Refinement, comm, readout_sigma, threshold: float) -> tuple:
    """Per-shoebox model intensities and sigma_Z, gathered on rank 0; the flagged count and the
    refined stills in the log (see :mod:`spread_dials.refine.residuals`)."""
    from spread_dials.refine.residuals import gather_residuals

    summary, stills, panels = gather_residuals(refinement, comm, readout_sigma, threshold)
    logger.info("Flagged %d of %d shoeboxes whose sigma_Z (rms standardized residual) exceeds "
                "refinement.flag_sigma_z = %g: kept in the refinement, column spread.flagged of the output "
                "reflections; sigma_Z mean %.3f, median %.3f; rms z over %d valid pixels %.3f",
                summary["shoeboxes_flagged"], summary["shoeboxes"], threshold, summary["sigma_z_mean"],
                summary["sigma_z_median"], summary["valid_pixels"], summary["z_rms"])  # fmt: skip
    if stills is not None:
        log = logger.info if len(stills) <= 20 else logger.debug
        for s in stills:
            jitter = "" if s["energy_jitter_eV"] is None else f", energy jitter {s['energy_jitter_eV']:+.3f} eV"
            if s["mosaic_spread_abc_deg"] is not None:
                jitter += ", mosaic spread about a, b, c ({:.4f}, {:.4f}, {:.4f}) deg".format(*s["mosaic_spread_abc_deg"])
            log("  still %s: scale %.6g, rotation (%+.4f, %+.4f, %+.4f) mrad, cell lengths x (%.5f, %.5f, %.5f)%s, "
                "%d shoeboxes (%d flagged)", s["identifier"], s["scale"], *(1e3 * s["rotation_rad"]), *s["cell_scale"],
                jitter, s["sigma_z"].size, int(s["flagged"].sum()))  # fmt: skip
    return summary, stills, panels


def _common_sensor(shots, comm):
    """Every rank's panels with the sensor mu averaged over ALL stills (the loader averages over
    its own), summed in experiment-identifier order so that any number of ranks models the same
    detector to the bit."""
    from spread_dials.refine.loader import with_mean_sensor_mu

    mine = [(s.identifier, s.sensor_mu_per_mm) for s in shots.shots] if shots else []
    everyone = sorted((pair for part in comm.allgather(mine) for pair in part), key=lambda pair: pair[0])
    if shots is None:
        return None
    return replace(shots, panels=with_mean_sensor_mu(shots.panels, [mu for _, mu in everyone]))


class StillsProgress:
    """Progress in the log (``dials.spread.refine``): stills done of ``total``, rate and ETA
    (every ~10 %), each line headed by ``label`` (e.g. "stage 1")."""

    def __init__(self, total: int, label: str = "stage 1") -> None:
        self.total, self.t0, self.step, self.label = total, None, max(1, total // 10), label

    def __call__(self, done: int, total: int) -> None:
        """After still ``done`` of ``total``; the clock starts at the first still's end (the rate
        counts the stills after it)."""
        if done == 1 or self.t0 is None:
            self.t0 = time.perf_counter()
            return
        if done % self.step == 0 or done == total:
            rate = (done - 1) / max(time.perf_counter() - self.t0, 1e-9)
            logger.info("  %s: %d/%d stills, %.2f stills/s, ETA %.0f s", self.label, done, total, rate, (total - done) / rate)


def load_checkpoint(path: Path, fingerprint: str) -> dict | None:
    """The checkpoint at ``path`` (None when there is none).

    Raises:
        SpreadError: it was written for other inputs or parameters (``fingerprint``).
    """
    if not path.is_file():
        return None
    saved = torch.load(path, weights_only=False)
    if saved.get("fingerprint") != fingerprint:
        raise SpreadError(f"{path} belongs to another run (other inputs or parameters): remove it or use another output.prefix")
    return saved


def restore_checkpoint(refinement: Refinement, saved: dict, refine_cell: bool, device) -> int:
    """Put a checkpoint's global parameters, per-shot parameters, left-out shoeboxes and history
    into ``refinement`` (whose caches were made at the checkpoint's cache points:
    :func:`saved_cache_points`); returns the macrocycle to resume from."""
    shots = refinement.shots
    refinement.theta = torch.tensor(saved["theta"], dtype=torch.float64)
    refinement.states = saved_states(saved, shots, refine_cell, device)
    rejected = [saved["states"][s.identifier].get("rejected") for s in shots.shots]
    refinement.caches = [replace(c, rejected=None if left is None else torch.tensor(left, device=device))
                         for c, left in zip(refinement.caches, rejected)]  # fmt: skip
    refinement.history = saved["history"]
    return int(saved["macrocycle"])


def checkpoint_saver(path: Path, fingerprint: str, comm) -> Callable[[Refinement], None]:
    """A Refinement.run ``on_macrocycle`` callback that writes the checkpoint (every rank's
    stills, :func:`checkpoint_states`) to ``path`` on the root rank, whole or not at all."""

    def save(r: Refinement) -> None:
        merged = checkpoint_states(r, comm)
        if comm.is_root:
            with atomic_path(path) as tmp:
                torch.save({"fingerprint": fingerprint, "macrocycle": r.history[-1]["macrocycle"], "theta": r.theta.tolist(),
                            "states": merged, "history": r.history}, tmp)  # fmt: skip
        comm.barrier()

    return save


def checkpoint_states(refinement: Refinement, comm) -> dict[str, dict]:
    """Every still's per-shot parameters, cache point and left-out shoeboxes, gathered from all
    ranks (experiment identifier -> lists), as a checkpoint stores them."""
    states = {s.identifier: {"log_scale": float(st.log_scale), "rotation": st.rotation.tolist(),
                             "cell": None if st.cell is None else st.cell.tolist(),
                             "energy_offset": None if st.energy_offset is None else float(st.energy_offset),
                             "background": st.background.tolist(),
                             "rejected": None if c.rejected is None else c.rejected.tolist(),
                             "cache_rotation": c.profiles.rotation.tolist(),
                             "cache_cell": None if c.profiles.cell is None else c.profiles.cell.tolist(),
                             "cache_theta": None if c.profiles.summed_at is None else c.profiles.summed_at.tolist(),
                             "cache_jitter": None if c.profiles.summed_jitter is None else float(c.profiles.summed_jitter)}
              for s, st, c in zip(refinement.shots.shots, refinement.states, refinement.caches)}  # fmt: skip
    return {k: v for part in comm.allgather(states) for k, v in part.items()}


def _saved(saved: dict, shot, key: str, device) -> Tensor:
    return torch.tensor(saved["states"][shot.identifier][key], dtype=torch.float64, device=device)


def saved_cache_points(saved: dict, shots, refine_cell: bool, device) -> tuple[list[Tensor], list[Tensor] | None]:
    """(rotations, cells or None) of the local stills' cache points in a checkpoint
    (:func:`checkpoint_states`)."""
    rotations = [_saved(saved, s, "cache_rotation", device) for s in shots.shots]
    return rotations, [_saved(saved, s, "cache_cell", device) for s in shots.shots] if refine_cell else None


def saved_summed_points(saved: dict, shots) -> list[tuple[Tensor, Tensor | None]] | None:
    """Each local still's (theta0, jitter0) at which its profiles were summed over the channels
    in a checkpoint (:func:`~spread_dials.refine.engine.channel_summer`'s ``points``), or None
    when they were not summed."""
    def point(shot) -> tuple[Tensor, Tensor | None] | None:
        entry = saved["states"][shot.identifier]
        if entry.get("cache_theta") is None:
            return None
        jitter = entry.get("cache_jitter")
        return (torch.tensor(entry["cache_theta"], dtype=torch.float64),
                None if jitter is None else torch.tensor(jitter, dtype=torch.float64))  # fmt: skip

    points = [point(s) for s in shots.shots]
    return None if any(p is None for p in points) else points


def saved_states(saved: dict, shots, refine_cell: bool, device) -> list[ShotState]:
    """The local stills' per-shot parameters in a checkpoint (:func:`checkpoint_states`)."""
    def jitter(shot) -> Tensor | None:
        value = saved["states"][shot.identifier].get("energy_offset")
        return None if value is None else torch.tensor(value, dtype=torch.float64, device=device)

    return [ShotState(_saved(saved, s, "log_scale", device), _saved(saved, s, "rotation", device),
                      _saved(saved, s, "background", device), _saved(saved, s, "cell", device) if refine_cell else None,
                      jitter(s))
            for s in shots.shots]  # fmt: skip


def _report(ctx, refinement: Refinement, refs, prepared, band, n_shots, n_sb, n_px, seconds, file_pairs=None,
            residuals=None) -> dict:  # fmt: skip
    """Uncertainty, per-site and pairwise results, validation against a truth; outputs on rank 0
    (``residuals``: :func:`_residuals`, for the refined stills and their shoeboxes' numbers)."""
    params, comm = ctx.params, ctx.mpi
    sites = refinement.sites
    theta = refinement.theta
    t0 = time.perf_counter()
    cov = curvature(refinement, observed=params.uncertainty.observed_hessian and theta.numel() <= 16)
    draws = bootstrap(refinement, params.uncertainty.bootstrap, params.random.seed)
    logger.info("Uncertainty (curvature + %d bootstrap refits) in %.1f s", draws.shape[0], time.perf_counter() - t0)
    chosen = _reported_covariance(cov, params.uncertainty.sigma, draws)
    names = sites.parameter_names()
    rows, pairs = [], []
    truth_curves = truth_curves_from_record(params.truth, len(prepared.sites)) if params.truth else None
    truth = truth_edge_shifts(truth_curves, refs) if truth_curves else None
    if sites.kind in ("edge_shift", "spline_kk"):
        shifts, jac, boot_shifts = _group_edge_shifts(sites, theta, draws, refs, band)

        def project(c: Tensor | None) -> Tensor | None:
            return None if c is None else jac @ c @ jac.T

        # every covariance carried to the shifts, and the reported one chosen among those as for
        # theta (robust: the largest variance of each shift; identical for edge_shift, J = 1)
        cov_g = replace(cov, profiled=project(cov.profiled), sandwich=project(cov.sandwich),
                        conditional=project(cov.conditional), observed_conditional=project(cov.observed_conditional),
                        sandwich_observed=project(cov.sandwich_observed))  # fmt: skip
        chosen_g = _reported_covariance(cov_g, params.uncertainty.sigma, boot_shifts, quiet=True)
        sigma_boot_g = boot_shifts.std(0) if boot_shifts.shape[0] > 1 else torch.full_like(shifts, float("nan"))

        def sd(c: Tensor | None, g: int) -> float | None:
            """sigma of group g's shift under covariance ``c`` (None when ``c`` is)."""
            return None if c is None else float(c[g, g].clamp(min=0).sqrt())

        for g, label in enumerate(sites.group_labels):
            members = [s for s in range(sites.n_sites) if int(sites.group[s]) == g]
            value, s = float(shifts[g]), sd(chosen_g, g)
            s_fisher, s_sandwich = sd(cov_g.profiled, g), sd(cov_g.sandwich, g)
            state_shifts = refs.state_shifts_eV[members[0]]
            probs = state_probabilities(value, s, state_shifts)
            row = {
                "site": label, "reference": refs.reference[members[0]].label, "edge_shift_eV": value, "sigma_eV": s,
                "sigma_fisher_eV": s_fisher, "sigma_sandwich_eV": s_sandwich,
                "sigma_sandwich_observed_eV": sd(cov_g.sandwich_observed, g),
                "sandwich_over_fisher": None if s_sandwich is None else s_sandwich / s_fisher,
                "sigma_conditional_eV": sd(cov_g.conditional, g),
                "sigma_observed_conditional_eV": sd(cov_g.observed_conditional, g),
                "sigma_bootstrap_eV": float(sigma_boot_g[g]), "bootstrap_over_fisher": float(sigma_boot_g[g]) / s_fisher,
                "interval68_eV": interval(value, s, 0.68), "interval95_eV": interval(value, s, 0.95),
                "state_shifts_eV": {str(k): v for k, v in state_shifts.items()},
                "state_probability": {str(k): v for k, v in probs.items()},
                "oxidation_state": max(probs, key=probs.get) if probs else None,
            }  # fmt: skip
            if truth is not None:
                true = float(np.mean([truth[m] for m in members]))
                row["truth_edge_shift_eV"] = true
                row["error_in_sigma"] = (value - true) / s if s > 0 else None
            rows.append(row)
        for a in range(sites.n_groups):
            for b in range(a + 1, sites.n_groups):
                d = float(shifts[a] - shifts[b])
                v = float(chosen_g[a, a] + chosen_g[b, b] - 2 * chosen_g[a, b])
                pairs.append({"site_a": sites.group_labels[a], "site_b": sites.group_labels[b], "difference_eV": d,
                              "sigma_eV": math.sqrt(max(v, 0.0))})  # fmt: skip
    results = {
        "program": "dials.spread_refine", "model": sites.kind, "stills": n_shots, "shoeboxes": n_sb, "pixels": n_px,
        "spectrum_band_eV": list(band), "parameters": names, "theta": theta.tolist(),
        "sigma_method": params.uncertainty.sigma,
        "covariance": chosen.tolist(), "covariance_fisher": cov.profiled.tolist(),
        "covariance_sandwich": None if cov.sandwich is None else cov.sandwich.tolist(),
        "covariance_conditional": cov.conditional.tolist(),
        "bootstrap_resamples": int(draws.shape[0]), "sites": rows, "pairs": pairs, "history": refinement.history,
        "edge_shift_method": _EDGE_SHIFT_METHOD.get(sites.kind),
        "seconds": seconds + (time.perf_counter() - t0),
        "controls": {"spoil_hkl": bool(params.controls.spoil_hkl), "shuffle_channels": bool(params.controls.shuffle_channels)},
        "uncertainty_method": "fisher: Fisher information of the likelihood over theta and every still's scale, rotation, "
                              "cell lengths (when refined) and background planes; per-shot parameters eliminated by the Schur complement; plus the "
                              "prior's Hessian. sandwich: H^-1 S H^-1 with H that information and S the covariance of the "
                              "stills' scores (honest when the pixel model misfits), also with the observed Hessian as "
                              "bread. robust: per parameter the largest of these and the bootstrap's. "
                              "Bootstrap: refits of theta over resampled stills with per-shot parameters fixed.",
    }  # fmt: skip
    if truth_curves is not None:
        from spread_dials.validation.anomalous import figure9_report

        results["figure9"] = figure9_report(sites, theta, truth_curves, [s.label for s in prepared.sites],
                                            [s.element for s in prepared.sites], refs.reference,
                                            params.validation.window_eV)  # fmt: skip
    summary, stills, panels = residuals if residuals is not None else (None, None, None)
    if summary is not None:
        results["residuals"] = summary
    if stills is not None:
        results["refined_stills"] = [{"identifier": s["identifier"], "scale": s["scale"], "rotation_rad": s["rotation_rad"].tolist(),
                                      "cell_scale": s["cell_scale"].tolist(), "energy_jitter_eV": s["energy_jitter_eV"],
                                      "mosaic_spread_abc_deg": (None if s["mosaic_spread_abc_deg"] is None
                                                                else s["mosaic_spread_abc_deg"].tolist()),
                                      "shoeboxes": int(s["sigma_z"].size), "flagged": int(s["flagged"].sum())}
                                     for s in stills]  # fmt: skip
    if comm.is_root:
        from spread_dials.refine.outputs import write_outputs

        write_outputs(ctx, results, refinement, refs, draws, band, truth_curves, pairs=file_pairs, stills=stills,
                      panels=panels)  # fmt: skip
    _log_table(rows, pairs)
    if "figure9" in results:
        _log_figure9(results["figure9"])
    return results


_EDGE_SHIFT_METHOD = {
    "edge_shift": "the refined parameter: f_s(E) = f_ref,s(E - shift)",
    "spline_kk": (
        "the rigid shift of the reference that best matches the refined f' and f'' over the band (least squares "
        "on a 1 eV grid, as the oxidation states' shifts); sigma from the covariance of the node changes "
        "propagated through its Jacobian (implicit differentiation)"
    ),
}


def _reported_covariance(cov, method: str, draws: Tensor, quiet: bool = False) -> Tensor:
    """The covariance behind the reported sigmas: Fisher, sandwich, or (robust) the sandwich's
    correlations with each variance the largest of Fisher, sandwich, the sandwich with the
    observed Hessian, and the bootstrap (>= 10 resamples) (Fisher alone with < 3 stills)."""
    if method == "fisher" or cov.sandwich is None:
        if method != "fisher" and not quiet:
            logger.info("Fewer than 3 stills: sigma from the Fisher information alone")
        return cov.profiled
    if method == "sandwich":
        return cov.sandwich
    variances = [cov.profiled.diag(), cov.sandwich.diag()]
    if cov.sandwich_observed is not None:
        variances.append(cov.sandwich_observed.diag())
    if draws.shape[0] >= 10:
        variances.append(draws.var(0))
    sd = torch.stack(variances).max(0).values.clamp(min=0).sqrt()
    s = cov.sandwich.diag().clamp(min=1e-300).sqrt()
    return cov.sandwich / (s.unsqueeze(-1) * s) * (sd.unsqueeze(-1) * sd)


def truth_curves_from_record(path, n_sites: int) -> list:
    """The simulated f'/f'' of every site (``images_run.json``: per site and channel) as curves.

    Raises:
        SpreadError: not a run record, or another number of sites than the refinement's.
    """
    from spread_dials.physics.anomalous import TabulatedCurve

    try:
        record = json.loads(Path(path).read_text())
        energies = torch.tensor(record["channels_eV"], dtype=torch.float64)
        truth_sites = record["sites"]
    except (OSError, ValueError, KeyError) as e:
        raise SpreadError(f"truth={path}: not a dials.spread_simulate run record ({e})") from None
    if len(truth_sites) != n_sites:
        raise SpreadError(f"truth={path} has {len(truth_sites)} sites but the refinement {n_sites}")
    return [TabulatedCurve(energies, torch.tensor(site["f_prime"], dtype=torch.float64),
                           torch.tensor(site["f_double_prime"], dtype=torch.float64), "truth") for site in truth_sites]  # fmt: skip


def truth_edge_shifts(curves, refs) -> list[float]:
    """Each site's true edge shift (eV) against its reference: the rigid shift of the simulated
    curve onto the reference over the channels (the outermost channel each side left out)."""
    from spread_dials.refine.references import rigid_shift_eV

    return [rigid_shift_eV(c, refs.reference[s], float(c.energy_eV[1]), float(c.energy_eV[-2])) for s, c in enumerate(curves)]


def _group_edge_shifts(sites, theta: Tensor, draws: Tensor, refs, band) -> tuple[Tensor, Tensor, Tensor]:
    """(edge shift per group (G,), d shift / d theta (G, P), shifts of the bootstrap draws (B, G)).

    edge_shift: the parameters themselves.  spline_kk: the reference's rigid shift that best
    matches each group's refined f' and f'' over the band (1 eV grid;
    :func:`~spread_dials.refine.references.matched_edge_shifts`), its Jacobian by implicit
    differentiation (the covariances are propagated through it)."""
    if sites.kind == "edge_shift":
        return theta.clone(), torch.eye(theta.numel(), dtype=theta.dtype), draws
    low, high = float(math.ceil(band[0])), float(math.floor(band[1]))
    shifts, jac = matched_edge_shifts(sites, theta, refs.reference, low, high)
    boot = [matched_edge_shifts(sites, d, refs.reference, low, high, jacobian=False)[0] for d in draws]
    return shifts, jac, torch.stack(boot) if boot else torch.zeros((0, sites.n_groups), dtype=theta.dtype)


def _log_figure9(figure9: dict[str, dict]) -> None:
    def num(x) -> str:
        return "-" if x is None else f"{x:.3f}"

    for site, r in figure9.items():
        logger.info("Figure 9 (against the truth over %.0f-%.0f eV, %d points) %s: f' CC %s RMSD %s e; f'' CC %s RMSD %s e",
                    *r["window_eV"], r["points"], site, num(r["cc_f_prime"]), num(r["rmsd_f_prime_e"]),
                    num(r["cc_f_double_prime"]), num(r["rmsd_f_double_prime_e"]))  # fmt: skip
        if r["points"] < 31:
            logger.info("  (%d of the window's 31 energies lie outside the truth's channels)", 31 - r["points"])


def _log_table(rows, pairs) -> None:
    if not rows:
        return
    lines = [f"{'site':<22} {'edge shift eV':>13} {'sigma':>7} {'fisher':>7} {'boot':>7} {'95% interval':>18} {'state':>6} {'P':>6}"]
    for r in rows:
        lo, hi = r["interval95_eV"]
        state = r["oxidation_state"]
        p = r["state_probability"].get(str(state)) if state is not None else None
        line = (f"{r['site']:<22} {r['edge_shift_eV']:>13.3f} {r['sigma_eV']:>7.3f} {r['sigma_fisher_eV']:>7.3f} {r['sigma_bootstrap_eV']:>7.3f} "
                f"{f'[{lo:.2f}, {hi:.2f}]':>18} {'-' if state is None else state:>6} {'-' if p is None else f'{p:.3f}':>6}")  # fmt: skip
        if "truth_edge_shift_eV" in r:
            line += f"   truth {r['truth_edge_shift_eV']:.3f} ({r['error_in_sigma']:+.2f} sigma)"
        lines.append(line)
    for p in pairs:
        lines.append(f"{p['site_a']} - {p['site_b']}: {p['difference_eV']:.3f} +- {p['sigma_eV']:.3f} eV")
    logger.info("Summary (edge shifts against each site's reference; sigma: uncertainty.sigma; fisher: the curvature "
                "alone; boot: bootstrap):\n%s", "\n".join(lines))  # fmt: skip
