"""dials.spread_correct's job: load as dials.spread_refine does, warm-start from its results, fit
the corrected model (checkpoint per epoch), report per-site posteriors and write the outputs.

Rank 0 writes every shared output; the stills are striped over the ranks (by file pair, or by
experiment inside one file: dials.spread_refine writes one .expt/.refl pair).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from spread_dials.correct.context import pixel_context
from spread_dials.correct.correction import CorrectionSettings, PixelCorrection, within_capacity
from spread_dials.correct.fit import CorrectedModel, CorrectSettings, feature_statistics
from spread_dials.correct.predictive import PredictiveCheck
from spread_dials.correct.residual_maps import model_residual_sums, summarise_maps
from spread_dials.correct.spectrometer import SpectrometerSites
from spread_dials.refine.run import (
    checkpoint_states,
    has_cell_vector,
    load_checkpoint,
    load_setup,
    make_refinement,
    refined_residuals,
    saved_cache_points,
    saved_states,
    truth_curves_from_record,
    truth_edge_shifts,
)
from spread_dials.refine.uncertainty import state_probabilities
from spread_dials.util.atomic import atomic_path, write_text_atomic
from spread_dials.util.errors import SpreadError

__all__ = ["run_correction", "read_warm_start"]

logger = logging.getLogger("dials.spread.correct")

#: posterior quantiles reported per site (csv) and per energy (h5 bands)
QUANTILES = (0.025, 0.16, 0.5, 0.84, 0.975)


def read_warm_start(path: str | Path) -> dict:
    """dials.spread_refine's ``<prefix>.h5``: theta (P,), parameter names, covariance (P, P),
    site labels.

    Raises:
        SpreadError: missing or not a dials.spread_refine edge-shift result.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as h:
            if h.attrs.get("program") != "dials.spread_refine":
                raise SpreadError(f"{path} is not a dials.spread_refine result (.h5)")
            if h.attrs.get("model") != "edge_shift":
                raise SpreadError(f"{path} holds a {h.attrs.get('model')} refinement: dials.spread_correct needs "
                                  "model.anomalous=edge_shift")  # fmt: skip
            return {"theta": torch.as_tensor(h["theta"][()], dtype=torch.float64),
                    "names": [n.decode() for n in h["parameter_names"][()]],
                    "covariance": torch.as_tensor(h["covariance"][()], dtype=torch.float64),
                    "labels": [n.decode() for n in h["site_labels"][()]]}  # fmt: skip
    except (OSError, KeyError) as e:
        raise SpreadError(f"cannot read the warm start {path}: {e}") from None


def _fingerprint(params, pairs, warm: Path) -> str:
    """What a checkpoint must match: inputs, the warm start, every modelling parameter."""
    text = json.dumps([str(p.resolve()) for pair in pairs for p in pair] + [str(warm.resolve())])
    for scope in ("input", "structure", "reference", "model", "crystal", "beam", "likelihood", "refinement", "correct", "random"):
        text += json.dumps(_plain(getattr(params, scope, None)), sort_keys=True, default=str)
    text = "\n".join(line for line in text.split(",") if "epochs" not in line and "resume" not in line)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(scope) -> object:
    if scope is None or isinstance(scope, (str, int, float, bool)):
        return scope
    if isinstance(scope, (list, tuple)):
        return [_plain(x) for x in scope]
    if hasattr(scope, "__dict__"):
        return {k: _plain(v) for k, v in vars(scope).items() if not k.startswith("_")}
    return str(scope)


def _correction_settings(params) -> CorrectionSettings:
    c = params.correct.correction
    return CorrectionSettings(gain=c.gain, gain_nodes=c.gain_nodes, gain_prior_sigma=c.gain_prior_sigma,
                              redistribution=c.redistribution, stencil_radius=c.stencil_radius,
                              stencil_prior_sigma=c.stencil_prior_sigma, stencil_symmetry=c.stencil_symmetry,
                              shoebox_boundary=c.shoebox_boundary, head=c.head,
                              head_prior_sigma=c.head_prior_sigma)  # fmt: skip


def run_correction(ctx, experiments, reflections, warm_start) -> dict:
    """The whole job for ``ctx.params`` (see command_line/correct.py)."""
    params, comm = ctx.params, ctx.mpi
    t0 = time.perf_counter()
    if params.model.anomalous != "edge_shift":
        raise SpreadError("dials.spread_correct refines edge shifts: use model.anomalous=edge_shift")
    if warm_start is None:
        raise SpreadError("give dials.spread_refine's .h5 (the warm start): dials.spread_correct spread_refine.expt "
                          "spread_refine.refl spread_refine.h5")  # fmt: skip
    warm_path = Path(warm_start)
    warm = read_warm_start(warm_path)
    setup = load_setup(ctx, experiments, reflections)
    if params.truth:  # refused before the fit, not after it
        truth_curves_from_record(params.truth, len(setup.prepared.sites))
    if setup.settings.sum_channels:
        logger.info("refinement.sum_channels ignored: the correction works on the per-channel profiles")
        setup = replace(setup, settings=replace(setup.settings, sum_channels=False))
    if warm["names"] != setup.sites.parameter_names():
        raise SpreadError(f"{warm_path} refined {warm['names']} but these inputs and parameters give "
                          f"{setup.sites.parameter_names()}: give the .phil of the dials.spread_refine run")  # fmt: skip
    hit = torch.zeros(setup.shots.panels.n_panels, dtype=torch.bool)
    for s in setup.shots.shots:
        hit[s.shoeboxes.panel.cpu()] = True
    n_hit = int(torch.stack(comm.allgather(hit)).any(0).sum())
    nominal = params.correct.nominal_energy_eV or 0.5 * (setup.band[0] + setup.band[1])
    spectrometer = params.correct.spectrometer
    try:
        sites = SpectrometerSites(setup.sites, nominal, spectrometer.offset_sigma_eV, spectrometer.dispersion_sigma)
    except ValueError as e:
        raise SpreadError(str(e)) from None
    correction_settings, notes = within_capacity(_correction_settings(params), setup.n_shoeboxes, n_hit,
                                                 params.correct.min_shoeboxes_per_weight)  # fmt: skip
    for note in notes:
        logger.info(note)
    if not (correction_settings.gain or correction_settings.redistribution or correction_settings.head):
        raise SpreadError(f"{setup.n_shoeboxes} shoeboxes cannot pin down any part of the correction "
                          f"(correct.min_shoeboxes_per_weight = {params.correct.min_shoeboxes_per_weight:g}): give more stills")  # fmt: skip
    flow = params.correct.noise_flow
    if flow.enable and setup.settings.readout_sigma is None and setup.settings.model_error_fraction == 0:
        raise SpreadError("correct.noise_flow.enable=True needs a Gaussian likelihood: likelihood=gaussian_readout "
                          "(with readout_sigma_photons) or likelihood.model_error_fraction > 0; photon-counting "
                          "pixels are Poisson")  # fmt: skip
    checkpoint = ctx.output_path(f"{params.output.prefix}.checkpoint.pt")
    fingerprint = _fingerprint(params, setup.pairs, warm_path)
    saved = load_checkpoint(checkpoint, fingerprint) if params.correct.resume else None
    ctx.accept_inputs()
    shots = setup.shots
    with_cell = has_cell_vector(params)
    rotations, cells = saved_cache_points(saved, shots, with_cell, ctx.device) if saved is not None else (None, None)
    refinement = make_refinement(ctx, replace(setup, sites=sites), rotations, cells)
    refinement.theta = sites.extend(warm["theta"])
    refinement.initialise_states()
    # the warm start's .expt carries each still's refined crystal but not its scale, backgrounds, energy
    # jitter or mosaic factors: one stage 1 of the physics at the warm theta fits them as dials.spread_refine
    # had; the "before" residual maps are of that fit (from initial_state's guesses a panel's mean z was 8.5
    # where dials.spread_refine's sigma_Z were 0.86-1.11), and a fresh fit starts there (the warm-up holds
    # the latents)
    nll, _ = refinement.stage1()
    logger.info("Per-shot parameters fitted at the warm start (stage 1 NLL %.3f)", nll)
    predictive = params.correct.predictive
    check = PredictiveCheck(refinement, predictive.held_out_fraction, predictive.panel_groups, predictive.resolution_shells,
                            int(params.random.seed))  # fmt: skip
    radius = params.correct.correction.stencil_radius
    contexts = [pixel_context(shots, s, nominal, radius) for s in shots.shots]
    correction = PixelCorrection(shots.panels.n_panels, correction_settings, feature_statistics(refinement, contexts))
    correction = correction.to(ctx.device)
    settings = CorrectSettings(epochs=params.correct.epochs, warmup_epochs=params.correct.warmup_epochs,
                               anchor_beta=params.correct.anchor_beta, theta_tolerance=params.correct.theta_tolerance_eV,
                               phi_tolerance=params.correct.phi_tolerance, noise_flow=flow.enable, flow_epochs=flow.epochs, flow_beta=flow.beta,
                               flow_steps=flow.steps, flow_pixels=flow.pixels, flow_seed=int(params.random.seed),
                               flow_significance=flow.significance)  # fmt: skip
    model = CorrectedModel(refinement, correction, contexts, settings)
    check.measure("before")  # the physics at the warm start (the correction is 0), per-shot parameters fitted
    maps = {"before": _residual_maps(model, comm, physics=True)}
    if saved is not None:
        refinement.theta = torch.tensor(saved["theta"], dtype=torch.float64)
        model.set_phi(torch.tensor(saved["phi"], dtype=torch.float64))
        refinement.states = saved_states(saved, shots, with_cell, ctx.device)
        model.history = saved["history"]
        if model.noise_flow is not None:
            model.noise_flow.load_state_dict(saved["noise_flow"])
            logger.info("Noise flow from the checkpoint: precision factor %.4f-%.4f over the rates",
                        float(model.noise_flow.precision_table.min()), float(model.noise_flow.precision_table.max()))  # fmt: skip
        logger.info("Resuming after epoch %d (%s)", len(model.history), checkpoint.name)
    if sites.latents:
        logger.info("Spectrometer latents: %s (calibration prior sd)", ", ".join(f"{n} {s:g}" for n, s in sites.latents))
    logger.info("Correction: %d weights (gain %s, redistribution %s, head %s); anchor beta %g; nominal energy %.1f eV",
                model.phi.numel(), correction.settings.gain, correction.settings.redistribution, correction.settings.head,
                settings.anchor_beta, nominal)  # fmt: skip
    t_fit = time.perf_counter()
    start_epoch = len(model.history)

    def save(m: CorrectedModel) -> None:
        done = len(m.history)
        rate = (done - start_epoch) / max(time.perf_counter() - t_fit, 1e-9)
        logger.info("  epoch %d/%d done, %.3f epochs/s, ETA %.0f s", done, settings.epochs, rate,
                    (settings.epochs - done) / max(rate, 1e-12))  # fmt: skip
        r = m.refinement
        merged = checkpoint_states(r, comm)
        if comm.is_root:
            with atomic_path(checkpoint) as tmp:
                torch.save({"fingerprint": fingerprint, "theta": r.theta.tolist(), "phi": m.phi.tolist(),
                            "states": merged, "history": m.history,
                            "noise_flow": None if m.noise_flow is None else m.noise_flow.state_dict()}, tmp)  # fmt: skip
        comm.barrier()

    model.run(on_epoch=save)
    moved = model.history[-1]["moved"] if model.history else {"theta": math.nan, "phi": math.nan}
    if model.converged:
        logger.info("Converged after epoch %d (it moved the edge shifts by <= %.2g eV, the correction by <= %.2g)",
                    len(model.history), moved["theta"], moved["phi"])  # fmt: skip
    else:
        logger.warning("Not converged after %d epochs (the last moved an edge shift by %.3g eV, a correction weight by "
                       "%.3g): rerun with more correct.epochs, it resumes", len(model.history), moved["theta"], moved["phi"])  # fmt: skip
    check.measure("after")
    joint, conditional, calibrated = model.covariance(held=sites.latent_indices)
    results = _results(ctx, model, setup, warm, joint, conditional, calibrated, time.perf_counter() - t0)
    results["posterior_predictive"] = check.report()
    maps["after"] = _residual_maps(model, comm)
    results["residual_maps"] = maps
    _log_maps(maps)
    residuals = refined_residuals(refinement, comm, setup.settings.readout_sigma, params.refinement.flag_sigma_z)
    physics_photons = _physics_photons(model)
    gathered = {k: v for part in comm.allgather(physics_photons) for k, v in part.items()}
    if comm.is_root:
        _write(ctx, model, setup, results, joint, residuals, gathered)
    comm.barrier()
    return results


def _residual_maps(model: CorrectedModel, comm, physics: bool = False) -> dict:
    """The fitted stills' residual maps (:mod:`spread_dials.correct.residual_maps`) over all ranks."""
    parts = comm.allgather(model_residual_sums(model, physics=physics))
    return summarise_maps(sum(p for p, _ in parts), sum(f for _, f in parts))


def _log_maps(maps: dict) -> None:
    """One line per residual map: the spot centre's mean z, the rms of the frame's mean z, the
    panel mean farthest from 0, before and after."""

    def numbers(m: dict) -> tuple[float, float, float]:
        frame, radius = m["frame"], m["frame"]["radius"]
        means = [x for row in frame["mean"] for x in row if x is not None]
        panels = [p["mean"] for p in m["panels"] if p["mean"] is not None]
        centre = frame["mean"][radius][radius]
        return (math.nan if centre is None else centre, float(np.sqrt(np.mean(np.square(means)))) if means else math.nan,
                max(panels, key=abs) if panels else math.nan)  # fmt: skip

    before, after = numbers(maps["before"]), numbers(maps["after"])
    logger.info("Residual maps of the fitted stills (z, physics at the warm start -> corrected): spot centre mean %.3f -> %.3f, "
                "rms of the shoebox frame's means %.3f -> %.3f, panel mean farthest from 0 %.3f -> %.3f",
                before[0], after[0], before[1], after[1], before[2], after[2])  # fmt: skip


def _physics_photons(model: CorrectedModel) -> dict[str, np.ndarray]:
    """Per local still: each shoebox's Bragg photons under the physics model alone (identifier
    -> (B,))."""
    out = {}
    r = model.refinement
    for i, shot in enumerate(r.shots.shots):
        with torch.no_grad():
            _, physics = model.bragg(i)
            photons = torch.exp(r.states[i].log_scale) * physics
            per_box = torch.zeros(shot.shoeboxes.n_shoeboxes, dtype=photons.dtype, device=photons.device)
            per_box.index_add_(0, r.caches[i].pixel_shoebox, photons)
        out[shot.identifier] = per_box.cpu().numpy()
    return out


def _results(ctx, model: CorrectedModel, setup, warm: dict, joint: Tensor, conditional: Tensor, calibrated: Tensor,
             seconds: float) -> dict:  # fmt: skip
    """Per site and site pair: the physics-only (warm start) and corrected edge shifts, sigmas,
    quantiles, oxidation-state probabilities and, with truth=, errors."""
    params = ctx.params
    r = model.refinement
    sites, refs = setup.sites, setup.refs
    theta = r.theta.detach()
    truth = None
    if params.truth:
        truth = truth_edge_shifts(truth_curves_from_record(params.truth, len(setup.prepared.sites)), refs)
    rows, pairs = [], []
    physics, physics_cov = warm["theta"], warm["covariance"]
    for g, label in enumerate(sites.group_labels):
        members = [s for s in range(sites.n_sites) if int(sites.group[s]) == g]
        value, sd = float(theta[g]), float(joint[g, g].clamp(min=0).sqrt())
        state_shifts = refs.state_shifts_eV[members[0]]
        probs = state_probabilities(value, sd, state_shifts)
        row = {"site": label, "reference": refs.reference[members[0]].label, "edge_shift_eV": value, "sigma_eV": sd,
               "sigma_conditional_eV": float(conditional[g, g].clamp(min=0).sqrt()),
               "sigma_given_calibration_eV": float(calibrated[g, g].clamp(min=0).sqrt()),
               "physics_edge_shift_eV": float(physics[g]), "physics_sigma_eV": float(physics_cov[g, g].clamp(min=0).sqrt()),
               "quantiles_eV": {str(q): value + sd * _normal_quantile(q) for q in QUANTILES},
               "state_probability": {str(k): v for k, v in probs.items()},
               "oxidation_state": max(probs, key=probs.get) if probs else None}  # fmt: skip
        if truth is not None:
            true = float(np.mean([truth[m] for m in members]))
            row["truth_edge_shift_eV"] = true
            row["error_in_sigma"] = (value - true) / sd if sd > 0 else None
            row["physics_error_in_sigma"] = (row["physics_edge_shift_eV"] - true) / row["physics_sigma_eV"]
        rows.append(row)
    for a in range(sites.n_groups):
        for b in range(a + 1, sites.n_groups):
            var = float(joint[a, a] + joint[b, b] - 2 * joint[a, b])
            pvar = float(physics_cov[a, a] + physics_cov[b, b] - 2 * physics_cov[a, b])
            pairs.append({"site_a": sites.group_labels[a], "site_b": sites.group_labels[b],
                          "difference_eV": float(theta[a] - theta[b]), "sigma_eV": math.sqrt(max(var, 0.0)),
                          "physics_difference_eV": float(physics[a] - physics[b]), "physics_sigma_eV": math.sqrt(max(pvar, 0.0))})  # fmt: skip
    for row in rows:
        logger.info("%s: edge shift %.3f +- %.3f eV corrected (+- %.3f given the spectrometer's calibration; physics "
                    "only %.3f +- %.3f); P(state) %s%s", row["site"], row["edge_shift_eV"], row["sigma_eV"],
                    row["sigma_given_calibration_eV"], row["physics_edge_shift_eV"], row["physics_sigma_eV"],
                    {k: round(v, 3) for k, v in row["state_probability"].items()},
                    f"; truth {row['truth_edge_shift_eV']:.3f} ({row['error_in_sigma']:+.2f} sigma; physics "
                    f"{row['physics_error_in_sigma']:+.2f})" if "truth_edge_shift_eV" in row else "")  # fmt: skip
    for pair in pairs:
        logger.info("%s - %s: %.3f +- %.3f eV (physics only %.3f +- %.3f)", pair["site_a"], pair["site_b"],
                    pair["difference_eV"], pair["sigma_eV"], pair["physics_difference_eV"], pair["physics_sigma_eV"])  # fmt: skip
    logger.info("Inter-site differences are the headline: a spectrometer offset moves every edge shift alike and no "
                "correction can tell it from a common shift")  # fmt: skip
    return {"program": "dials.spread_correct", "stills": setup.n_shots, "shoeboxes": setup.n_shoeboxes,
            "pixels": setup.n_pixels, "parameters": r.sites.parameter_names(), "theta": theta.tolist(),
            "spectrometer": _spectrometer(r.sites, theta, joint),
            "covariance": joint.tolist(), "covariance_conditional": conditional.tolist(), "sites": rows, "pairs": pairs,
            "history": model.history, "converged": model.converged, "seconds": seconds,
            "correction": {"weights": model.phi.numel(), "head_slope_bound": model.correction.head_slope_bound(),
                           **asdict(model.correction.settings)},
            "uncertainty_method": "Laplace: the inverse of the Fisher information of the edge shifts and the "
                                  "correction's weights (every still's scale, crystal offsets and background planes "
                                  "profiled out) plus the priors' curvature; sigma_eV with the correction's weights "
                                  "profiled out (its uncertainty included), sigma_conditional_eV with them held, "
                                  "sigma_given_calibration_eV with the spectrometer's offset and dispersion held (the "
                                  "data's sigma for a perfectly calibrated spectrometer)"}  # fmt: skip


def _spectrometer(sites: SpectrometerSites, theta: Tensor, joint: Tensor) -> dict:
    """Each spectrometer latent switched on: its estimate, posterior sd and calibration prior sd."""
    _, latent = sites.split(theta)
    return {name: {"value": float(latent[name]), "sigma": float(joint[j, j].clamp(min=0).sqrt()), "prior_sigma": prior}
            for (name, prior), j in zip(sites.latents, sites.latent_indices)}  # fmt: skip


def _normal_quantile(q: float) -> float:
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(q, dtype=torch.float64)))


def _write(ctx, model: CorrectedModel, setup, results: dict, joint: Tensor, residuals, physics_photons: dict) -> None:
    """Every shared output, each under a temporary name and renamed (rank 0)."""
    from spread_dials.refine.outputs import curve_draws, gaussian_draws, site_curve_rows, write_refined_stills

    params = ctx.params
    prefix = params.output.prefix
    sites = setup.sites
    theta = model.refinement.theta.detach()
    write_text_atomic(ctx.output_path(f"{prefix}.json"), json.dumps(results, indent=1))
    _write_csv(ctx.output_path("spread_posterior.csv"), results)
    draws = gaussian_draws(theta, joint, params.correct.posterior_draws, params.random.seed)
    energy = torch.arange(math.floor(setup.band[0]), math.ceil(setup.band[1]) + 1e-9, 1.0, dtype=torch.float64)
    n_site = model.refinement.sites.n_site_parameters
    curves = curve_draws(sites, draws[:, :n_site], energy)  # (n, 2, S, E), true energies
    bands = torch.quantile(curves, torch.tensor(QUANTILES, dtype=torch.float64), dim=0)  # (Q, 2, S, E)
    with atomic_path(ctx.output_path("spread_posterior.h5")) as tmp:
        with h5py.File(tmp, "w") as h:
            h.attrs["program"] = "dials.spread_correct"
            h.attrs["correction_settings"] = json.dumps(asdict(model.correction.settings))
            h["theta"] = theta.numpy()
            h["parameter_names"] = np.array(model.refinement.sites.parameter_names(), dtype="S")
            h["site_labels"] = np.array([s.encode() for s in sites.group_labels])
            h["covariance"] = joint.numpy()
            h["covariance_conditional"] = np.array(results["covariance_conditional"])
            h["draws"] = draws.numpy()
            h["energy_eV"] = energy.numpy()
            h["quantiles"] = np.array(QUANTILES)
            h["f_prime_quantiles"] = bands[:, 0].numpy()
            h["f_double_prime_quantiles"] = bands[:, 1].numpy()
            h["correction_weights"] = model.phi.numpy()
            h["correction_weight_names"] = np.array([f"{n}[{k}]" for n, p in zip(model._names, model._parameters())
                                                     for k in range(p.numel())], dtype="S")  # fmt: skip
            h["history"] = json.dumps(model.history)
            if model.noise_flow is not None:
                h["noise_flow_precision"] = model.noise_flow.precision_table.cpu().numpy()
                h["noise_flow_context_range"] = model.noise_flow.context_range.cpu().numpy()
    summary, stills, _ = residuals
    if stills is not None:
        for still in stills:
            still["bragg_photons_physics"] = physics_photons[still["identifier"]]
        write_refined_stills(ctx.output_path(f"{prefix}.expt"), ctx.output_path(f"{prefix}.refl"), setup.pairs, stills)
    if params.plots:
        from spread_dials.plots.correct import (
            plot_correction,
            plot_edge_shift_arms,
            plot_loss,
            plot_noise_flow,
            plot_predictive,
            plot_residual_maps,
        )
        from spread_dials.plots.refine import plot_site_curves

        plot_edge_shift_arms(results["sites"], results["pairs"], ctx.output_path(f"{prefix}_edge_shifts.png"))
        plot_loss(model.history, ctx.output_path(f"{prefix}_loss.png"))
        plot_correction(model.correction, ctx.output_path(f"{prefix}_correction.png"))
        if model.noise_flow is not None:
            plot_noise_flow(model.noise_flow, ctx.output_path(f"{prefix}_noise_flow.png"))
        if results.get("posterior_predictive"):
            plot_predictive(results["posterior_predictive"], ctx.output_path(f"{prefix}_predictive.png"))
        plot_residual_maps(results["residual_maps"], ctx.output_path(f"{prefix}_residual_maps.png"))
        q = {x: k for k, x in enumerate(QUANTILES)}
        fp, fdp = sites.curves(theta[:n_site], energy)
        truth_curves = truth_curves_from_record(params.truth, len(setup.prepared.sites)) if params.truth else None
        rows = site_curve_rows(sites, fp, fdp, bands[[q[0.16], q[0.84]]], bands[[q[0.025], q[0.975]]], setup.refs, energy, truth_curves)
        plot_site_curves(energy.numpy(), rows, ctx.output_path(f"{prefix}_fp_fdp.png"))
    logger.info("Wrote %s.json, spread_posterior.csv/.h5, %s.expt/.refl%s in %s", prefix, prefix,
                " and PNGs" if params.plots else "", ctx.output_dir)  # fmt: skip


def _write_csv(path: Path, results: dict) -> None:
    import csv
    import io

    keys = ["site", "reference", "edge_shift_eV", "sigma_eV", "sigma_conditional_eV", "sigma_given_calibration_eV",
            "physics_edge_shift_eV",
            "physics_sigma_eV", *[f"q{q}" for q in QUANTILES], "oxidation_state", "state_probability",
            "truth_edge_shift_eV", "error_in_sigma", "physics_error_in_sigma", "site_b", "difference_eV",
            "physics_difference_eV"]  # fmt: skip
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for row in results["sites"]:
        out = dict(row, **{f"q{q}": v for q, v in zip(QUANTILES, row["quantiles_eV"].values())})
        out["state_probability"] = json.dumps(row["state_probability"])
        writer.writerow(out)
    for pair in results["pairs"]:
        writer.writerow({"site": pair["site_a"], "site_b": pair["site_b"], "difference_eV": pair["difference_eV"],
                         "sigma_eV": pair["sigma_eV"], "physics_difference_eV": pair["physics_difference_eV"],
                         "physics_sigma_eV": pair["physics_sigma_eV"]})  # fmt: skip
    write_text_atomic(path, buffer.getvalue())
