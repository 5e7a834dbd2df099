"""dials.spread_correct at scale: speed and the arms physics-only vs corrected on in-memory stills
with injected model errors (issue 13), one JSON line per (case, error, N, replicate).

Usage (repository root; on the GPU machines with PYTHONPATH=$PWD and bench_data carried):
    python benchmarks/correct.py --case rubredoxin --n 20 --errors none,psf1.5,gain0.05,offset1,jitter0.5 \\
        --replicates 1 --out results
    python benchmarks/correct.py --summarise results/correct_rubredoxin*.jsonl [--plots docs/images]
    python benchmarks/correct.py --errors psf1.5 --oracle-only --seed 133 --noise-seed K   # K = 1, 2, ...
    python benchmarks/correct.py --summarise results/correct_rubredoxin*.jsonl --conditional
    python benchmarks/correct.py --errors psf1.5 --seed 111 --truth-shift T --tag _tT   # T = -2, -1, 0, 1, 2
    python benchmarks/correct.py --summarise results/correct_rubredoxin_t*.jsonl --recovery   # slope per arm; the leak's absorption

Stills: benchmarks/refine.py's case (cctbx F0/G from bench_data, the preset's brightness, the
Jungfrau 16M), drawn from the model's own domain set (so that without an injected error the
physics model is exact), each site's truth its reference moved by exactly --truth-shift eV (no
rigid-fit definition of the truth), the orientation errors stills_process leaves and 0.1 %
cell errors.  Injected (spread_dials.refine.synthetic.InjectedErrors; the refinement is not
told): psfF (Gaussian PSF of FWHM F px), gainR (per-panel gain, rms R), pixgainR (per-pixel
flat-field gain, rms R, one map for every still and replicate), anisoF (the stills' mosaic
spread about a, b, c F, 1 and 1/F times the model's), offsetE (spectrometer
offset, eV), jitterE (per-still energy jitter rms, eV), chargeR (a charge-integrating detector:
each photon's charge spread by the fraction R; with --readout R a Gaussian readout of R photons
on every pixel, which every arm is told: likelihood gaussian_readout).

Arms on the same stills: physics (the refine engine's defaults but --macrocycles, 6 against
dials.spread_refine's 5; under a PSF most fits stop there unconverged, the last step 0.01-1.5 eV), corrected
(dials.spread_correct's model warm-started from it: CorrectSettings defaults, --parts of the
correction kept by the capacity guard at 50 shoeboxes per weight, the spectrometer's offset and
dispersion latents at --offset-sigma / --dispersion-sigma, with --jitter-sigma each still's energy
jitter under that prior) and, with --oracle, the oracle
(physics told the error: synthetic.oracle_profile_map and the true energies, fitted as the
physics arm; for anisoF the model's mosaic spread made anisotropic as the stills').  Each
line: estimates, Fisher sigma (physics, oracle), the corrected model's sigma with everything profiled, with the correction held and with the calibration held, the
parts kept, the learned stencil and head,
seconds (physics, correction), seconds per epoch, GPU-seconds per still per epoch and the peak
GPU memory.  --mosaic-latent: the physics and corrected arms refine each still's mosaic
spreads (the oracle is told them instead).  --noise-flow: the corrected arm learns the pixel
noise (correct.noise_flow; the oracle is not told the charge spread).  --model-error F gives every arm the engine's Gaussian likelihood with a fractional
model error F (refinement.model_error_fraction).  --held-out-fraction F: the posterior
predictive check (correct.predictive) on that fraction of the stills, out of the corrected arm's
fit, before and after it (the physics arm, its warm start, fits every still, as dials.spread_refine
before dials.spread_correct).  --leaky-degree D: also the leaky arm (issue 13's proof that the
guards have power): the corrected arm's parts times a free factor per Miller index, a degree-D
Legendre polynomial in the channel (correction.LeakyCorrection; --leaky-basis edge: the sites'
edge-shift derivatives of f', f'' times those polynomials, correction.edge_shift_basis), no
anchor, a broad prior on it (--leaky-prior-sigma, log intensity; --leaky-hold-spectrometer: without the spectrometer's latents,
whose dispersion ran to 80 prior sd beside the free factors and stalled the fit).  --anchor-beta B: the corrected arm's anchor weight
(correct.anchor_beta; give each value its own --tag).  --noise-seed K: the same stills as --seed
makes (orientations, spectra, boxes, starting crystals) with their photon noise drawn from K, a
parametric bootstrap of one data set (summarise with --conditional: each arm's spread over the
noise draws against its sigma, and its mean against the truth); --oracle-only runs only the
oracle arm (with --held-out-fraction on the stills the corrected arm fits).  Resumable: a (case, error, N, replicate, seed, noise seed) already in the file is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import append_record, gpu_peak_bytes, read_records, reset_gpu_peak
from refine import BACKGROUND_PHOTONS, load_case

from spread_dials.correct.context import pixel_context
from spread_dials.correct.correction import (
    CorrectionSettings,
    LeakyCorrection,
    PixelCorrection,
    energy_basis,
    within_capacity,
)
from spread_dials.correct.fit import CorrectedModel, CorrectSettings, feature_statistics
from spread_dials.correct.predictive import PredictiveCheck, held_out_stills, pool_reports
from spread_dials.correct.spectrometer import SpectrometerSites
from spread_dials.parallel import Parallel
from spread_dials.physics.geometry import PanelArray
from spread_dials.physics.structure_factors import StructureFactors
from spread_dials.refine.engine import Refinement, RefineSettings, make_caches
from spread_dials.refine.profiles import ShotProfiles
from spread_dials.refine.shots import ShotSet
from spread_dials.refine.sites import EdgeShiftSites
from spread_dials.refine.synthetic import (
    InjectedErrors,
    anisotropic_spreads,
    flat_field_error,
    oracle_profile_map,
    synthetic_shots,
)
from spread_dials.refine.uncertainty import curvature
from spread_dials.validation.calibration import calibration_summary, gaussian_pit


def parse_error(text: str, panels: PanelArray, seed: int, spread_deg: float) -> InjectedErrors:
    """``none``, ``psfF``, ``gainR``, ``pixgainR``, ``offsetE``, ``jitterE``, ``anisoF``, ``chargeR`` (joined
    by ``+``) as InjectedErrors on ``panels`` for a model of mosaic spread ``spread_deg``."""
    fields = {}
    for part in text.split("+"):
        if part == "none":
            continue
        for key, name in (("psf", "psf_fwhm_px"), ("gain", "panel_gain"), ("pixgain", "pixel_gain"),
                          ("offset", "spectrometer_offset_eV"), ("jitter", "energy_jitter_eV"),
                          ("aniso", "mosaic_spread_abc_deg"), ("charge", "photon_charge_rms")):  # fmt: skip
            if part.startswith(key):
                try:
                    value = float(part[len(key) :])
                except ValueError:
                    raise SystemExit(f"Sorry: {part!r} needs a number after {key!r}") from None
                if key == "gain":
                    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9A1E]))
                    fields[name] = torch.as_tensor(1.0 + value * rng.normal(size=panels.n_panels))
                elif key == "pixgain":  # the flat-field error is the detector's: one map per run
                    shape = (panels.n_panels, panels.n_slow, panels.n_fast)
                    fields[name] = flat_field_error(shape, value)
                elif key == "aniso":
                    if value <= 0:
                        raise SystemExit(f"Sorry: {part!r}: the anisotropy factor must be > 0")
                    fields[name] = anisotropic_spreads(spread_deg, value)
                else:
                    fields[name] = value
                break
        else:
            raise SystemExit(f"Sorry: unknown error {part!r} (none, psfF, gainR, pixgainR, offsetE, jitterE, anisoF, chargeR)")
    return InjectedErrors(**fields)


def fit_physics(shot_set: ShotSet, case: dict, model, sites, settings: RefineSettings,
                profile_map: Callable[[int, ShotProfiles], ShotProfiles] | None = None) -> tuple[Refinement, list[float]]:
    """dials.spread_refine's engine from the given crystals and the sites' initial edge shifts,
    on profiles through ``profile_map`` when given (the oracle); returns the refinement and the
    edge shifts' Fisher sigma."""
    n = len(shot_set.shots)
    caches = make_caches(shot_set, case["table"], model, refine_cell=True)
    r = Refinement(shot_set, list(range(n)), n, caches, [], sites, sites.initial(), model, Parallel(), settings)
    if profile_map is not None:
        r.map_profiles(profile_map)
    r.initialise_states()
    r.run()
    return r, curvature(r, observed=False).profiled.diag().sqrt().tolist()


def oracle_arm(shot_set: ShotSet, case: dict, errors: InjectedErrors, model, sites,
               settings: RefineSettings) -> tuple[Refinement, list[float]]:  # fmt: skip
    """Physics given the true error family and its values, run as the physics arm: the recorded
    spectra's true energies, every channel's profile (and its Jacobian) blurred inside its box
    by the true PSF as the stills were (``synthetic.blur_boxes``), times the true panel and
    pixel gain, with the stills' anisotropic mosaic spread."""
    shots = replace(shot_set, shots=[replace(s, energy_eV=case["energy"].to(s.energy_eV)) for s in shot_set.shots])
    if errors.mosaic_spread_abc_deg is not None:
        model = replace(model, anisotropic_spread_deg=errors.mosaic_spread_abc_deg)
    return fit_physics(shots, case, model, sites, settings, oracle_profile_map(shots, errors))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_refinement(shot_set: ShotSet, case: dict, model, settings: RefineSettings, physics: Refinement, sites,
                    args, spectrometer_latents: bool = True) -> tuple[Refinement, SpectrometerSites]:  # fmt: skip
    """A refinement for a corrected (or leaky) arm: caches at the physics fit's crystals, its
    per-shot parameters initialised, theta the physics fit's edge shifts extended by the
    spectrometer's offset and dispersion latents (priors --offset-sigma, --dispersion-sigma;
    without ``spectrometer_latents`` none: the spectrometer held at its calibration)."""
    n = len(shot_set.shots)
    caches = make_caches(shot_set, case["table"], model, [s.rotation for s in physics.states], refine_cell=True,
                         cells=[s.cell for s in physics.states])  # fmt: skip
    sigmas = (args.offset_sigma, args.dispersion_sigma) if spectrometer_latents else (None, None)
    spectrometer = SpectrometerSites(sites, float(case["energy"].mean()), *sigmas)
    r = Refinement(shot_set, list(range(n)), n, caches, [], spectrometer, spectrometer.extend(physics.theta), model,
                   Parallel(), replace(settings, energy_jitter_sigma_eV=args.jitter_sigma))  # fmt: skip
    r.initialise_states()
    return r, spectrometer


def leaky_basis(shot_set: ShotSet, case: dict, args) -> torch.Tensor:
    """The leaky arm's energy basis (K, C): --leaky-basis polynomial, the Legendre polynomials of
    degree --leaky-degree in the channel; edge, the sites' edge-shift derivatives of f', f'' at
    the first still's channel energies times those polynomials (correction.edge_shift_basis)."""
    return energy_basis(args.leaky_basis, args.leaky_degree, case["references"], shot_set.shots[0].energy_eV.detach().cpu().double())


def leaky_arm(shot_set: ShotSet, case: dict, model, settings: RefineSettings, physics: Refinement, sites,
              kept: CorrectionSettings, contexts: list, args, device: torch.device,
              parts: PixelCorrection | None = None) -> dict:  # fmt: skip
    """The leaky arm on the same stills (issue 13's proof that the guards have power): the
    corrected arm's parts times a free factor per Miller index, a function of the channel
    (--leaky-basis, --leaky-degree: LeakyCorrection), no anchor, a prior on the factors
    (--leaky-prior-sigma), on the corrected arm's pixel ``contexts``; the parts start from
    ``parts`` (the corrected arm's fit; with --leaky-start corrected), else from the identity;
    the edge shifts from the physics fit; with
    --leaky-hold-spectrometer without the spectrometer's latents.  Its parameters, estimates,
    the sigmas given the spectrometer and with everything profiled, those with all its weights
    (factors and parts) held at their fit (against which the first shows how much information
    the leak absorbs where the fit sits), weights, the epochs' history (its NLL, a superset of
    the corrected arm's model, must end at or below that arm's), seconds."""
    t0 = time.perf_counter()
    r, spectrometer = warm_refinement(shot_set, case, model, settings, physics, sites, args, not args.leaky_hold_spectrometer)
    hkl = torch.cat([s.shoeboxes.miller_index for s in shot_set.shots])
    n_channels = shot_set.shots[0].energy_eV.numel()
    correction = LeakyCorrection(shot_set.panels.n_panels, kept, feature_statistics(r, contexts), hkl, n_channels,
                                 energy_basis=leaky_basis(shot_set, case, args),
                                 prior_sigma=args.leaky_prior_sigma).to(device)  # fmt: skip
    if parts is not None:
        correction.take_parts(parts)
    fit = CorrectedModel(r, correction, contexts, CorrectSettings(epochs=args.epochs, anchor_beta=0.0))
    fit.run()
    joint, correction_held, calibrated = fit.covariance(held=spectrometer.latent_indices)
    _sync(device)
    return {"parameters": r.sites.parameter_names(), "theta": r.theta.tolist(), "sigma_joint": joint.diag().sqrt().tolist(),
            "sigma_given_calibration": calibrated.diag().sqrt().tolist(), "sigma_correction_held": correction_held.diag().sqrt().tolist(), "basis": args.leaky_basis, "degree": args.leaky_degree, "prior_sigma": args.leaky_prior_sigma, "start": "identity" if parts is None else "corrected",
            "weights": fit.phi.numel(), "reflections": correction.miller_index.shape[0],
            "epochs": len(fit.history), "history": fit.history, "converged": fit.converged, "seconds": time.perf_counter() - t0}  # fmt: skip


def shifted_case(name: str, data: Path, truth_shift: float) -> dict:
    """benchmarks/refine.py's case ``name`` from ``data`` with every site's truth its reference
    moved by ``truth_shift`` (eV)."""
    case = load_case(name, data)
    case["truth_curves"] = [r.shifted(truth_shift) for r in case["references"]]
    fp, fdp = zip(*(c.at(case["energy"]) for c in case["truth_curves"]))
    table = case["table"]
    case["truth"] = StructureFactors(table.miller_index, table.F0, table.G, torch.stack(fp), torch.stack(fdp))
    return case


def make_stills(case: dict, error: str, n: int, replicate: int, args, device: torch.device, true_crystals: bool = False,
                poisson: bool = True) -> tuple[ShotSet, InjectedErrors]:  # fmt: skip
    """The data set of (``error``, ``n`` stills, ``replicate``) from --seed (its photon noise from
    --noise-seed when given), on ``device``, and the errors it carries; with ``true_crystals``
    each still's crystal is the true one instead of the one stills_process would hand on, and
    without ``poisson`` the counts are the expected photons."""
    seed = int(np.random.SeedSequence([args.seed, n, replicate]).generate_state(1)[0])
    errors = replace(parse_error(error, case["panels"], seed, case["model"].mosaic_spread_deg), readout_sigma_photons=args.readout)
    shots = []
    for i in range(n):
        made, truth = synthetic_shots(case["panels"], case["truth"], case["model"], case["real_space"], case["energy"], 1,
                                      seed=seed + i, spot_scale=case["spot_scale"], background_photons=BACKGROUND_PHOTONS,
                                      orientation_error_deg=case["orientation_error_deg"], cell_error_fraction=0.001,
                                      device=device, errors=errors, noise_seed=args.noise_seed, poisson=poisson)  # fmt: skip
        shots.append(replace(made.shots[0], real_space=truth.real_space[0]) if true_crystals else made.shots[0])
    shot_set = ShotSet(made.panels, made.beam_direction, made.e_vector, made.polarization_fraction, shots,
                       [f"still {i}" for i in range(n)]).to(device)  # fmt: skip
    return shot_set, errors


def run_one(case: dict, error: str, n: int, replicate: int, args, device: torch.device) -> dict:
    shot_set, errors = make_stills(case, error, n, replicate, args, device)
    model = case["model"]
    sites = EdgeShiftSites(case["references"], list(range(len(case["references"]))), case["labels"])
    settings = RefineSettings(macrocycles=args.macrocycles, refine_cell=True, model_error_fraction=args.model_error,
                              readout_sigma=args.readout or None)  # fmt: skip
    oracle_model, oracle_settings = model, settings  # (the oracle is told the spreads: no latent)
    identity = {"case": case["name"], "error": error, "n": n, "replicate": replicate, "seed": args.seed, "noise_seed": args.noise_seed,
                "sites": case["labels"], "truth": [args.truth_shift] * len(case["labels"])}  # fmt: skip
    if args.oracle_only:
        held = held_out_stills(n, args.held_out_fraction, args.seed)  # out of the fit, as the corrected arm's
        fitted = shot_set.select([k for k in range(n) if k not in held])
        n_sb = sum(s.shoeboxes.n_shoeboxes for s in fitted.shots)
        reset_gpu_peak(device)
        t0 = time.perf_counter()
        oracle, oracle_sigma = oracle_arm(fitted, case, errors, oracle_model, sites, oracle_settings)
        _sync(device)
        print(f"{error} N={n} r{replicate} noise seed {args.noise_seed}: oracle {np.round(oracle.theta.tolist(), 4).tolist()} +- "
              f"{np.round(oracle_sigma, 4).tolist()} ({time.perf_counter() - t0:.0f} s; {n_sb} shoeboxes)", flush=True)  # fmt: skip
        return {**identity, "held_out_stills": held, "oracle_theta": oracle.theta.tolist(), "oracle_sigma": oracle_sigma, "oracle_seconds": time.perf_counter() - t0,
                "oracle_history": oracle.history, "shoeboxes": n_sb,
                "peak_memory_gb": None if gpu_peak_bytes(device) is None else gpu_peak_bytes(device) / 2**30,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    n_sb = sum(s.shoeboxes.n_shoeboxes for s in shot_set.shots)
    panel_shoeboxes = torch.bincount(torch.cat([s.shoeboxes.panel.cpu() for s in shot_set.shots]), minlength=shot_set.panels.n_panels)
    hit = int((panel_shoeboxes > 0).sum())
    parts = set(args.parts.split(","))
    wanted = CorrectionSettings(stencil_radius=args.stencil_radius, stencil_symmetry=args.stencil_symmetry,
                                gain="gain" in parts, gain_nodes=args.gain_nodes,
                                redistribution="redistribution" in parts, head="head" in parts)  # fmt: skip
    kept, notes = within_capacity(wanted, n_sb, hit, args.per_weight)
    if not (kept.gain or kept.redistribution or kept.head):  # as dials.spread_correct: nothing to learn (the oracle above learns nothing)
        raise SystemExit(f"Sorry: {n_sb} shoeboxes of {n} stills cannot pin down any part of the correction "
                         f"(--per-weight {args.per_weight:g}: {'; '.join(notes)}): give more stills")  # fmt: skip
    if args.mosaic_latent:
        model, settings = replace(model, mosaic_latent=True), replace(settings, refine_mosaic=True)
    reset_gpu_peak(device)
    t0 = time.perf_counter()
    physics, physics_sigma = fit_physics(shot_set, case, model, sites, settings)
    _sync(device)
    t_physics = time.perf_counter() - t0
    print(f"{error} N={n} r{replicate}: physics {np.round(physics.theta.tolist(), 4).tolist()} +- "
          f"{np.round(physics_sigma, 4).tolist()} ({t_physics:.0f} s; {n_sb} shoeboxes on {hit} panels)", flush=True)  # fmt: skip
    oracle_theta = oracle_sigma = oracle_history = None
    t0 = time.perf_counter()
    if args.oracle:
        oracle, oracle_sigma = oracle_arm(shot_set, case, errors, oracle_model, sites, oracle_settings)
        oracle_theta, oracle_history = oracle.theta.tolist(), oracle.history
    t_oracle = time.perf_counter() - t0
    if args.oracle:
        print(f"{error} N={n} r{replicate}: oracle {np.round(oracle_theta, 4).tolist()} +- {np.round(oracle_sigma, 4).tolist()} "
              f"({t_oracle:.0f} s)", flush=True)  # fmt: skip
    # the corrected arm: caches at the physics fit's crystals, theta from it
    t0 = time.perf_counter()
    nominal = float(case["energy"].mean())
    r, corrected_sites = warm_refinement(shot_set, case, model, settings, physics, sites, args)
    check = PredictiveCheck(r, args.held_out_fraction, args.panel_groups, args.resolution_shells, args.seed)
    contexts = [pixel_context(shot_set, s, nominal, args.stencil_radius) for s in shot_set.shots]
    correction = PixelCorrection(shot_set.panels.n_panels, kept, feature_statistics(r, contexts)).to(device)
    corrected = CorrectedModel(r, correction, contexts, CorrectSettings(epochs=args.epochs, noise_flow=args.noise_flow,
                                                                         anchor_beta=args.anchor_beta))
    check.measure("before")
    corrected.run()
    check.measure("after")
    joint, conditional, calibrated = corrected.covariance(held=corrected_sites.latent_indices)
    robust = corrected.robust_covariance(held=corrected_sites.latent_indices)
    _sync(device)
    t_correct = time.perf_counter() - t0
    leaky = (leaky_arm(shot_set, case, model, settings, physics, sites, kept, contexts, args, device,
                       correction if args.leaky_start == "corrected" else None)
             if args.leaky_degree is not None else None)  # fmt: skip
    if leaky is not None:
        print(f"{error} N={n} r{replicate}: leaky {np.round(leaky['theta'], 3).tolist()} +- {np.round(leaky['sigma_given_calibration'], 3).tolist()} "
              f"given the spectrometer ({leaky['weights']} weights, {leaky['seconds']:.0f} s)", flush=True)  # fmt: skip
    predictive = check.report()
    if predictive is not None:
        print(f"{error} N={n} r{replicate}: held-out z sd per resolution shell, physics -> corrected: " + ", ".join(
            f"{b['sd']:.3f} -> {a['sd']:.3f}" for b, a in zip(predictive["before"]["resolution_shells"], predictive["after"]["resolution_shells"])
            if a["sd"] is not None), flush=True)  # fmt: skip
    epoch_s = [h["seconds"] for h in corrected.history]
    return {
        **identity,
        "physics_theta": physics.theta.tolist(), "physics_sigma": physics_sigma,
        "theta": r.theta.tolist(), "sigma_joint": joint.diag().sqrt().tolist(), "parameters": corrected_sites.parameter_names(),
        "sigma_conditional": conditional.diag().sqrt().tolist(), "sigma_given_calibration": calibrated.diag().sqrt().tolist(),
        "sigma_robust_given_calibration": robust.diag().clamp(min=0).sqrt().tolist(), "covariance_joint": joint.tolist(),
        "oracle_theta": oracle_theta, "oracle_sigma": oracle_sigma, "oracle_seconds": t_oracle,
        "anchor_beta": args.anchor_beta, "jitter_sigma": args.jitter_sigma, "model_error_fraction": args.model_error, "mosaic_latent": args.mosaic_latent,
        "readout_photons": args.readout, "noise_flow": args.noise_flow,
        "noise_flow_fits": [h["noise_flow"] for h in corrected.history if "noise_flow" in h],
        "mosaic_spread_abc_deg": ([model.mosaic_spreads_deg(s.cell.detach().cpu()[-3:]).tolist() for s in r.states]
                                  if args.mosaic_latent else None),
        "recorded_minus_true_eV": [float(s.energy_eV[0].cpu() - case["energy"][0]) for s in shot_set.shots],
        "jitter_found_eV": None if args.jitter_sigma is None else [float(s.energy_offset) for s in r.states],
        "oracle_history": oracle_history, "physics_history": physics.history,
        "head_weights": correction.head_weights.detach().cpu().tolist(), "head_slope_bound": correction.head_slope_bound(), "parts_asked": sorted(parts),
        "parts": {"gain": kept.gain, "redistribution": kept.redistribution, "head": kept.head}, "capacity_notes": notes,
        "correction_settings": asdict(kept),
        "stencil": correction.coefficients().detach().cpu().tolist(),
        "log_gain_nodes": correction.node_log_gains().detach().cpu().flatten().tolist(),
        "true_panel_gain": None if errors.panel_gain is None else errors.panel_gain.tolist(),
        "panel_shoeboxes": panel_shoeboxes.tolist(), "shoeboxes": n_sb, "weights": corrected.phi.numel(),
        "physics_seconds": t_physics, "correct_seconds": t_correct, "seconds_per_epoch": float(np.mean(epoch_s)),
        "gpu_seconds_per_still_per_epoch": float(np.mean(epoch_s)) / n,
        "peak_memory_gb": None if gpu_peak_bytes(device) is None else gpu_peak_bytes(device) / 2**30,
        "history": corrected.history, "converged": corrected.converged, "settings": asdict(corrected.settings),
        "posterior_predictive": predictive, "leaky": leaky,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def common_shift(record: dict, arm: str | None = None, sigma: str = "sigma_given_calibration") -> tuple[np.ndarray, np.ndarray]:
    """The corrected arm's (or with ``arm`` "leaky" that arm's) per-site common shift, edge shift +
    spectrometer offset (eV), and its sigma given the spectrometer (eV; the record's ``sigma``,
    e.g. "sigma_robust_given_calibration", the sandwich's), both (sites,): what the data
    measure, the offset and a shift common to every site being indistinguishable (the offset
    takes its prior's share of it); an arm without an offset latent (the leaky arm with
    --leaky-hold-spectrometer) its edge shifts."""
    k = len(record["sites"])
    fit = record if arm is None else record[arm]
    names = fit.get("parameters", record["parameters"])
    offset = fit["theta"][names.index("spectrometer_offset_eV")] if "spectrometer_offset_eV" in names else 0.0
    return np.array(fit["theta"][:k]) + offset, np.array(fit[sigma][:k])


def _oracle_only(record: dict) -> bool:
    """A record of --oracle-only (the oracle arm alone: no physics or corrected arm)."""
    return "physics_theta" not in record


def arm_estimates(group: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per arm (physics, corrected: the common shift, and where every record has one the
    corrected common shift with the sandwich sigma, oracle and leaky; for a group of
    --oracle-only records the oracle alone): the (R, sites) estimates, sigmas and truths of the
    records of ``group`` (eV)."""
    truth = np.array([r["truth"] for r in group])
    oracle = (np.array([r["oracle_theta"] for r in group]), np.array([r["oracle_sigma"] for r in group]), truth) \
        if all(r.get("oracle_theta") for r in group) else None  # fmt: skip
    if all(_oracle_only(r) for r in group):
        return {"oracle": oracle}

    def shifts(arm: str | None, sigma: str = "sigma_given_calibration") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        estimates, sigmas = zip(*(common_shift(r, arm, sigma) for r in group))
        return np.array(estimates), np.array(sigmas), truth

    arms = {"physics": (np.array([r["physics_theta"] for r in group]), np.array([r["physics_sigma"] for r in group]), truth),
            "corrected": shifts(None)}
    if all(r.get("sigma_robust_given_calibration") for r in group):
        arms["corrected_sandwich"] = shifts(None, "sigma_robust_given_calibration")
    if oracle is not None:
        arms["oracle"] = oracle
    if all(r.get("leaky") for r in group):
        arms["leaky"] = shifts("leaky")
    return arms


def site_summary(estimate: np.ndarray, sigma: np.ndarray, truth: np.ndarray) -> dict:
    """One arm's one site over R data sets, all (R,) in eV: bias in eV and in sigmas, rms z, mean
    sigma, calibration_summary of the Gaussian PITs and the PITs themselves ("pit")."""
    z = (estimate - truth) / sigma
    pit = gaussian_pit(estimate, sigma, truth)
    return {"bias_eV": round(float((estimate - truth).mean()), 4), "bias_sigma": round(float(z.mean()), 3),
            "rms_z": round(float(np.sqrt(np.mean(z**2))), 3), "mean_sigma_eV": round(float(sigma.mean()), 4),
            **calibration_summary(pit), "pit": pit.tolist()}  # fmt: skip


def _grouped(rows: list[dict], key: Callable[[dict], tuple]) -> list[tuple[tuple, list[dict]]]:
    """The records of ``rows`` grouped by ``key``: (key, records in file order) per key, sorted."""
    return [(k, [r for r in rows if key(r) == k]) for k in sorted({key(r) for r in rows})]


def _data_set(record: dict) -> tuple:
    """A record's data set's stills: (case, error, N, seed)."""
    return record["case"], record["error"], record["n"], record["seed"]


def summarise(paths: list[Path]) -> dict[str, dict]:
    """Per (case, error, N) over the records of ``paths`` (e.g. one file per process): per arm
    (arm_estimates; the corrected arm's common shift) and site the bias in eV and in its own
    sigmas, the rms z, the mean sigma and the interval calibration (calibration_summary of the
    Gaussian PITs, with the PITs under "pit"); the corrected arm's joint sigma (the spectrometer
    profiled: prior-dominated for an absolute shift), how far the corrected common shift is from
    the physics estimate in physics sigmas (largest and rms: the no-harm target), the seconds per
    epoch and, where the records have a posterior predictive check (--held-out-fraction), the
    held-out z pooled over the data sets (pool_reports).  --oracle-only records form groups of
    their own ("... oracle only"), with the oracle arm alone."""
    rows = []
    for path in paths:
        records = read_records(path)
        rows += records
        if any("parameters" not in r and not _oracle_only(r) for r in records):
            raise SystemExit(f"Sorry: {path} holds records from before the spectrometer latents (no 'parameters'); "
                             "summarise them with the code of their session")  # fmt: skip
    out = {}
    for key, group in _grouped(rows, lambda r: (r["case"], r["error"], r["n"], _oracle_only(r))):
        entry: dict = {"case": key[0], "error": key[1], "n": key[2], "replicates": len(group), "seeds": sorted({r["seed"] for r in group})}
        if key[3]:  # --oracle-only records: a group of their own, the oracle arm alone
            entry["oracle_only"] = True
        else:
            entry |= {"corrected_sigma_joint": np.mean([r["sigma_joint"][: len(r["sites"])] for r in group], 0).round(4).tolist(),
                      "seconds_per_epoch": round(float(np.mean([r["seconds_per_epoch"] for r in group])), 2)}  # fmt: skip
        arms = arm_estimates(group)
        for arm, (estimate, sigma, truth) in arms.items():
            entry[arm] = {label: site_summary(estimate[:, k], sigma[:, k], truth[:, k]) for k, label in enumerate(group[0]["sites"])}
        if key[3]:
            out[f"{key[0]} {key[1]} N={key[2]} oracle only"] = entry
            continue
        # issue 13's no-harm target (no injected error): the correction moves no site by more than 0.25 sigma
        moved = (arms["corrected"][0] - arms["physics"][0]) / arms["physics"][1]
        entry["corrected_minus_physics_sigma"] = {label: {"max_abs": round(float(np.abs(moved[:, k]).max()), 3),
                                                          "rms": round(float(np.sqrt(np.mean(moved[:, k] ** 2))), 3)}
                                                  for k, label in enumerate(group[0]["sites"])}  # fmt: skip
        checks = [r["posterior_predictive"] for r in group if r.get("posterior_predictive")]
        if checks:
            entry["predictive"] = pool_reports(checks)
        out[f"{key[0]} {key[1]} N={key[2]}"] = entry
    return out


def conditional_summary(paths: list[Path]) -> dict[str, dict]:
    """The parametric bootstrap (--noise-seed): per (case, error, N, seed), i.e. per data set's
    stills, and per arm the records hold (oracle; physics and corrected, the common shift, when
    run) and site over the R noise draws: the mean error against the truth (eV, its standard
    error, and in the mean sigma), the estimates' sd, the mean sigma and their ratio sd / sigma
    with its 95 % chi-square interval (R - 1 degrees of freedom).  A ratio above 1 is scatter the
    sigma misses given the stills; a mean off the truth, an error of the data set's stills that
    no noise draw averages out.

    Raises:
        SystemExit: a record without a noise seed (a "Sorry:" line).
    """
    from scipy import stats

    rows = [r for path in paths for r in read_records(path)]
    if any(r.get("noise_seed") is None for r in rows):
        raise SystemExit("Sorry: --conditional summarises records made with --noise-seed only")
    out = {}
    for key, group in _grouped(rows, _data_set):
        truth = np.array([r["truth"] for r in group])
        arms = arm_estimates(group)
        entry: dict = {"case": key[0], "error": key[1], "n": key[2], "seed": key[3], "noise_draws": len(group)}
        dof = len(group) - 1
        for arm, (estimate, sigma, *_) in arms.items():
            entry[arm] = {}
            for k, label in enumerate(group[0]["sites"]):
                error, sd, mean_sigma = estimate[:, k] - truth[:, k], float(estimate[:, k].std(ddof=1)), float(sigma[:, k].mean())
                low, high = (np.sqrt(dof / stats.chi2.ppf([0.975, 0.025], dof)) * sd / mean_sigma).tolist()
                entry[arm][label] = {"mean_error_eV": round(float(error.mean()), 4), "mean_error_se_eV": round(sd / np.sqrt(len(group)), 4),
                                     "mean_error_sigma": round(float(error.mean()) / mean_sigma, 3), "sd_eV": round(sd, 4),
                                     "mean_sigma_eV": round(mean_sigma, 4), "sd_over_sigma": round(sd / mean_sigma, 3),
                                     "sd_over_sigma_95": [round(low, 3), round(high, 3)]}  # fmt: skip
        out[f"{key[0]} {key[1]} N={key[2]} seed {key[3]}"] = entry
    return out


def recovery_summary(paths: list[Path]) -> dict[str, dict]:
    """Injection-recovery (issue 13's slope): per (case, error, N, seed), i.e. one data set's
    stills with the edge shift injected at several truths (--truth-shift), and per arm
    (arm_estimates) and site, the least-squares line of the estimate on the truth
    (scipy.stats.linregress): slope, intercept (eV), the slope's standard error from the
    residuals (None with two truths) and from the arm's own sigmas as if the points were
    independent (sqrt(sum_i w_i^2 sigma_i^2), w_i = (T_i - mean T) / S_TT; the points share the
    stills, so this is a yardstick, not an exact error), and the (truth, estimate, sigma) points.

    Raises:
        SystemExit: a data set with fewer than two distinct truths, or two records of one truth
        (a "Sorry:" line).
    """
    from scipy import stats

    rows = [r for path in paths for r in read_records(path)]
    out = {}
    for key, group in _grouped(rows, _data_set):
        group = sorted(group, key=lambda r: r["truth"])
        truths = [tuple(r["truth"]) for r in group]
        if len(set(truths)) < 2 or len(set(truths)) < len(truths):
            raise SystemExit(f"Sorry: injection-recovery needs one record per truth and at least two truths; "
                             f"{key[0]} {key[1]} N={key[2]} seed {key[3]} has truths {[list(t) for t in truths]}")  # fmt: skip
        entry: dict = {"case": key[0], "error": key[1], "n": key[2], "seed": key[3], "truths": len(group)}
        for arm, (estimate, sigma, truth) in arm_estimates(group).items():
            entry[arm] = {}
            for k, label in enumerate(group[0]["sites"]):
                t, e, s = truth[:, k], estimate[:, k], sigma[:, k]
                fit = stats.linregress(t, e)
                w = (t - t.mean()) / np.sum((t - t.mean()) ** 2)
                entry[arm][label] = {"slope": round(float(fit.slope), 4), "intercept_eV": round(float(fit.intercept), 4),
                                     "slope_se_residuals": round(float(fit.stderr), 4) if len(t) > 2 else None,
                                     "slope_sd_from_sigmas": round(float(np.sqrt(np.sum(w**2 * s**2))), 4),
                                     "points": [[float(a), round(float(b), 4), round(float(c), 4)] for a, b, c in zip(t, e, s)]}  # fmt: skip
        absorbed = leak_absorption(group)
        if absorbed is not None:
            entry["leak_absorption"] = absorbed
        out[f"{key[0]} {key[1]} N={key[2]} seed {key[3]}"] = entry
    return out


def leak_absorption(group: list[dict]) -> dict | None:
    """How much of the edge-shift signal the leaky arm took, over one data set's truths (records
    of session 30 on: with the leaky ``history`` and ``sigma_correction_held``; else None): per
    site the [smallest, largest] ratio of its sigma to its sigma with the correction's weights
    held (the information the leak absorbed, as a sigma factor), the [smallest, largest] final
    NLL below the corrected arm's (nats; >= 0 where the fit reached the model it contains),
    the largest |estimate - truth| over the corrected arm's sigma given the spectrometer (how far
    off the truth the leak lets the edge shift sit), and how many fits met their tolerances."""
    leaky = [r.get("leaky") for r in group]
    if any(not entry or "sigma_correction_held" not in entry or not entry.get("history") for entry in leaky):
        return None
    below = [r["history"][-1]["nll"] - entry["history"][-1]["nll"] for r, entry in zip(group, leaky)]
    out: dict = {"nll_below_corrected_nats": [round(min(below), 1), round(max(below), 1)],
                 "converged": f"{sum(bool(entry.get('converged')) for entry in leaky)} of {len(leaky)}"}  # fmt: skip
    for k, label in enumerate(group[0]["sites"]):
        ratio = [entry["sigma_given_calibration"][k] / entry["sigma_correction_held"][k] for entry in leaky]
        off = [abs(entry["theta"][k] - r["truth"][k]) / r["sigma_given_calibration"][k] for r, entry in zip(group, leaky)]
        out[label] = {"sigma_ratio": [round(min(ratio), 2), round(max(ratio), 2)], "largest_error_over_corrected_sigma": round(max(off), 1)}
    return out


ARM_LABELS = {"physics": "physics", "corrected": "corrected (edge shift + offset)",
              "corrected_sandwich": "corrected, sandwich sigma", "oracle": "oracle", "leaky": "leaky (edge shift + offset)"}  # the arms of a summary (arm_estimates) and their plot labels


def plot_summary(summary: dict[str, dict], directory: Path, stem: str) -> list[Path]:
    """Per group and site of ``summary``: the coverage curve and the SBC rank histograms of every
    arm (spread_dials.plots.calibration), as <stem>_<error>_<site>_{coverage,sbc}.png (an oracle-only
    group: <stem>_<error>_oracle_only_<site>_...), and per group
    with a pooled posterior predictive check its picture, <stem>_<error>_predictive.png."""
    from spread_dials.plots.calibration import plot_coverage, plot_rank_histograms
    from spread_dials.plots.correct import plot_predictive

    written = []
    for entry in summary.values():
        only = " (oracle only)" if entry.get("oracle_only") else ""
        for site in entry["oracle" if only else "physics"]:
            pits = {label: np.array(entry[arm][site]["pit"]) for arm, label in ARM_LABELS.items() if arm in entry}
            title = f"{entry['case']} N={entry['n']}, {entry['error']}{only}, {site}: {entry['replicates']} data sets"
            name = f"{stem}_{entry['error']}{'_oracle_only' if only else ''}_{site.replace('/', '_')}".replace("+", "_")
            written += [plot_coverage(pits, directory / f"{name}_coverage.png", title=title),
                        plot_rank_histograms(pits, directory / f"{name}_sbc.png", title=title)]  # fmt: skip
        if "predictive" in entry:
            written.append(plot_predictive(entry["predictive"], directory / f"{stem}_{entry['error'].replace('+', '_')}_predictive.png"))
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="rubredoxin", choices=("rubredoxin", "psii"))
    ap.add_argument("--data", default="bench_data")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--errors", default="none,psf1.5")
    ap.add_argument("--replicates", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--macrocycles", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=8, help="the most epochs (the fit stops once converged)")
    ap.add_argument("--per-weight", type=float, default=50.0, help="capacity guard: shoeboxes per weight")
    ap.add_argument("--parts", default="gain,redistribution", help="parts of the correction asked for (the guard may drop some; the head is off by default, as in the program)")
    ap.add_argument("--oracle", action="store_true", help="also the oracle arm: physics given the true error")
    ap.add_argument("--oracle-only", action="store_true", help="only the oracle arm (e.g. its parametric bootstrap with --noise-seed)")
    ap.add_argument("--noise-seed", type=int, default=None,
                    help="the photon noise of --seed's stills drawn from this seed instead (a parametric bootstrap of one data set)")
    ap.add_argument("--tag", default="", help="suffix of the output file (e.g. one per process)")
    ap.add_argument("--anchor-beta", type=float, default=CorrectSettings.anchor_beta,
                    help="the corrected arm's weight of the Poisson KL anchor to the physics rate (correct.anchor_beta)")
    ap.add_argument("--offset-sigma", type=float, default=1.0, help="the correction's spectrometer offset prior sd (eV)")
    ap.add_argument("--dispersion-sigma", type=float, default=0.005, help="its dispersion error prior sd")
    ap.add_argument("--jitter-sigma", type=float, default=None, help="the correction's per-still energy-jitter prior sd (eV; refinement.energy_jitter_sigma_eV; default: no jitter latent)")
    ap.add_argument("--mosaic-latent", action="store_true",
                    help="the physics and corrected arms refine each still's mosaic spreads about a, b, c (refinement.refine_mosaic)")
    ap.add_argument("--model-error", type=float, default=0.0,
                    help="every arm's refinement.model_error_fraction (Gaussian pixel variance lambda + (f lambda)^2)")
    ap.add_argument("--gain-nodes", type=int, default=CorrectionSettings.gain_nodes,
                    help="the gain field's nodes per panel edge (1: one gain per panel; the guard then needs 50 shoeboxes per panel)")
    ap.add_argument("--stencil-radius", type=int, default=CorrectionSettings.stencil_radius, help="half-width (px) of the redistribution stencil")
    ap.add_argument("--stencil-symmetry", choices=("none", "d4"), default=CorrectionSettings.stencil_symmetry, help="a weight per offset, or per orbit of the square's symmetries")
    ap.add_argument("--readout", type=float, default=0.0,
                    help="injected Gaussian readout (photons) on every pixel, told to every arm (likelihood gaussian_readout)")
    ap.add_argument("--noise-flow", action="store_true", help="the corrected arm learns the pixel noise (correct.noise_flow)")
    ap.add_argument("--held-out-fraction", type=float, default=0.0,
                    help="the posterior predictive check: this fraction of the stills (drawn from --seed) out of the corrected arm's fit, "
                         "their residuals before and after (correct.predictive; the physics arm, the warm start, fits every still)")
    ap.add_argument("--panel-groups", type=int, default=4, help="the check's contiguous panel groups")
    ap.add_argument("--resolution-shells", type=int, default=4, help="the check's resolution shells of equal shoebox counts")
    ap.add_argument("--leaky-degree", type=int, default=None,
                    help="also the leaky arm: the correction times a free factor per Miller index, a polynomial of this degree in the channel, no anchor")
    ap.add_argument("--leaky-basis", choices=("polynomial", "edge"), default="polynomial",
                    help="the leaky factors' functions of the channel: Legendre polynomials of degree --leaky-degree, or the "
                         "sites' edge-shift derivatives of f', f'' times them (a leak of exactly the edge-shift signal)")
    ap.add_argument("--leaky-prior-sigma", type=float, default=1.0,
                    help="the leaky arm's Gaussian prior width on its factors (log intensity; keeps reflections the data barely see in place)")
    ap.add_argument("--leaky-start", choices=("identity", "corrected"), default="identity",
                    help="where the leaky arm's parts (PSF stencil, gain) start: the identity, or the corrected arm's fit "
                         "(its factors at 0, so its first steps need not relearn the parts; from the identity the first joint "
                         "step threw the factors to ~10 prior sd on 10 stills, H200 session 30)")
    ap.add_argument("--leaky-hold-spectrometer", action="store_true",
                    help="the leaky arm without the spectrometer's offset and dispersion latents (held at the calibration)")
    ap.add_argument("--truth-shift", type=float, default=2.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="results")
    ap.add_argument("--summarise", nargs="+", default=None, help="files of records: print the summary per (case, error, N) and stop")
    ap.add_argument("--conditional", action="store_true",
                    help="with --summarise: the parametric bootstrap's summary per data set's stills (records made with --noise-seed)")
    ap.add_argument("--recovery", action="store_true",
                    help="with --summarise: the injection-recovery slope per data set's stills over records of several --truth-shift values, and the leaky arm's absorption (leak_absorption)")
    ap.add_argument("--plots", default=None, help="with --summarise: write each group's coverage and rank PNGs here")
    ap.add_argument("--plot-stem", default="correct_scale", help="their names: <stem>_<error>_<site>_{coverage,sbc}.png")
    args = ap.parse_args(argv)
    if args.n < 1 or args.replicates < 1 or args.epochs < 1:
        raise SystemExit("Sorry: --n, --replicates and --epochs must be >= 1")
    if args.noise_flow and not (args.readout > 0 or args.model_error > 0):
        raise SystemExit("Sorry: --noise-flow needs a Gaussian likelihood: give --readout or --model-error")
    if not args.anchor_beta >= 0:
        raise SystemExit("Sorry: --anchor-beta must be >= 0")
    if (args.leaky_degree is not None and args.leaky_degree < 0) or not args.leaky_prior_sigma > 0:
        raise SystemExit("Sorry: --leaky-degree must be >= 0 and --leaky-prior-sigma > 0")
    if not 0.0 <= args.held_out_fraction < 1.0 or args.panel_groups < 1 or args.resolution_shells < 1:
        raise SystemExit("Sorry: --held-out-fraction must be in [0, 1), --panel-groups and --resolution-shells >= 1")
    if args.conditional and args.recovery:
        raise SystemExit("Sorry: give --conditional or --recovery, not both")
    if (args.conditional or args.recovery) and not args.summarise:
        raise SystemExit("Sorry: --conditional and --recovery summarise records: give them with --summarise FILES")
    if args.summarise and args.recovery:
        print(json.dumps(recovery_summary([Path(p) for p in args.summarise]), indent=1))
        return 0
    if args.summarise and args.conditional:
        print(json.dumps(conditional_summary([Path(p) for p in args.summarise]), indent=1))
        return 0
    if args.summarise:
        summary = summarise([Path(p) for p in args.summarise])
        if args.plots:
            plot_summary(summary, Path(args.plots), args.plot_stem)
        for entry in summary.values():
            for arm in ARM_LABELS:
                for site in entry.get(arm, {}).values():
                    site.pop("pit")
        print(json.dumps(summary, indent=1))
        return 0
    device = torch.device(args.device)
    case = shifted_case(args.case, Path(args.data), args.truth_shift)
    out = Path(args.out) / f"correct_{args.case}{args.tag}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["error"], r["n"], r["replicate"], r["seed"], r.get("noise_seed")) for r in read_records(out, repair=True)}
    work = [(e, r) for e in args.errors.split(",") for r in range(args.replicates)
            if (e, args.n, r, args.seed, args.noise_seed) not in done]
    t_start = time.perf_counter()
    for k, (error, replicate) in enumerate(work):
        record = run_one(case, error, args.n, replicate, args, device)
        append_record(out, record)
        rate = (k + 1) / (time.perf_counter() - t_start)
        if args.oracle_only:
            print(f"{k + 1}/{len(work)}, ETA {(len(work) - k - 1) / rate:.0f} s", flush=True)
            continue
        print(f"{error} N={args.n} r{replicate}: physics {np.round(record['physics_theta'], 3).tolist()} +- "
              f"{np.round(record['physics_sigma'], 3).tolist()}, corrected {np.round(record['theta'], 3).tolist()} +- "
              f"{np.round(record['sigma_joint'], 3).tolist()} (parts {record['parts']}; {record['physics_seconds']:.0f} + "
              f"{record['correct_seconds']:.0f} s; {k + 1}/{len(work)}, ETA {(len(work) - k - 1) / rate:.0f} s)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
