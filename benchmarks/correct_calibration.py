"""Calibration of dials.spread_correct's posterior over replicate data sets (issue 13): coverage of
the 50/68/90/95 % intervals and SBC ranks of the corrected edge shifts, beside physics only.

Usage (repository root; CPU, one core, ~30 s per replicate):
    OMP_NUM_THREADS=1 python benchmarks/correct_calibration.py --replicates 100 --out results
    python benchmarks/correct_calibration.py --summarise results/correct_calibration_toy*.jsonl --plots docs/images

Design: the toy of tests/correct/toy.py (two sites of random phase, a 2 x 2-panel detector,
8 channels of 4 eV, 6 mosaic domains; --n stills of spot scale --spot-scale), every replicate
with new stills, new noise and a new truth: each site's edge shift drawn from N(0, --prior-sigma
eV) and the refinement's edge-shift prior set to the same N(0, --prior-sigma^2) (SBC needs the
truth drawn from the fit's own prior).  A Gaussian PSF of --psf px FWHM the physics does not
know is injected (--jitter: a per-still energy jitter of that rms too, the cell then refined in
both arms, and with --jitter-sigma the corrected arm refines each still's jitter under that
prior; --pixgain: a per-pixel flat-field gain error; --aniso: an anisotropic mosaic spread;
--mosaic-latent: the physics and corrected arms refine each still's mosaic spreads about a, b, c;
--panel-gain: a per-panel gain error drawn per data set, and --gain the correction's gain on;
--charge-rms and --readout: a charge-integrating detector, each photon's charge spread by that
fraction and a Gaussian readout of that many photons added, every arm told the readout
(likelihood gaussian_readout) but not the charge spread; --noise-flow: the corrected arm learns
the pixel noise, spread_dials.correct.noise_flow);
the correction is dials.spread_correct's stencil (gain off unless --gain; --head: its head too), fitted
until converged (at most --epochs epochs) after the physics arm converged.  Each line: the truth, both arms'
estimates and sigmas (the corrected one with the correction's weights profiled: the joint
sigma), and seconds.  --summarise: per arm and site and for the difference A - B, the coverage
and the PIT's KS test (spread_dials.validation.calibration) and, with --plots, the coverage
curve and rank histograms (PNG).  Resumable: a replicate already in the file is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import linregress

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import append_record, read_records

from spread_dials.correct.context import pixel_context
from spread_dials.correct.correction import CorrectionSettings, PixelCorrection
from spread_dials.correct.fit import CorrectedModel, CorrectSettings, feature_statistics
from spread_dials.refine.synthetic import InjectedErrors, anisotropic_spreads, flat_field_error, oracle_profile_map
from spread_dials.refine.uncertainty import curvature
from spread_dials.validation.calibration import calibration_summary, gaussian_pit
from tests.correct.toy import (  # the toy design lives with its tests
    DETECTOR_SHAPE,
    MOSAIC_SPREAD_DEG,
    NOMINAL_EV,
    toy_refinement,
)


def run_one(replicate: int, args) -> dict:
    """Both arms on one replicate data set (module docstring)."""
    rng = np.random.default_rng(np.random.SeedSequence([args.seed, replicate]))
    truth = rng.normal(0.0, args.prior_sigma, size=2)
    t0 = time.perf_counter()
    pixel_gain = None if args.pixgain <= 0 else flat_field_error(DETECTOR_SHAPE, args.pixgain)
    gain_rng = np.random.default_rng(np.random.SeedSequence([args.seed, replicate, 0x9A1E]))  # (the stills stay those of --seed)
    panel_gain = None if args.panel_gain <= 0 else torch.as_tensor(1.0 + args.panel_gain * gain_rng.normal(size=DETECTOR_SHAPE[0]))
    aniso = None if args.aniso == 1 else anisotropic_spreads(MOSAIC_SPREAD_DEG, args.aniso)
    errors = InjectedErrors(psf_fwhm_px=args.psf, energy_jitter_eV=args.jitter, pixel_gain=pixel_gain, panel_gain=panel_gain, mosaic_spread_abc_deg=aniso,
                            photon_charge_rms=args.charge_rms, readout_sigma_photons=args.readout)  # fmt: skip
    design = dict(seed=int(rng.integers(2**31)), shifts=tuple(truth.tolist()), n_stills=args.n, spot_scale=args.spot_scale,
                  errors=errors, macrocycles=4, prior_sigma_eV=args.prior_sigma, refine_cell=args.jitter > 0,
                  refine_mosaic=args.mosaic_latent)  # fmt: skip
    oracle = {}

    def refinement(**extra):
        made = toy_refinement(**{**design, **extra})
        made.settings = replace(made.settings, model_error_fraction=args.model_error, readout_sigma=args.readout or None)
        return made

    if args.oracle:  # physics told the error: the stills' mosaic, the PSF and gains on the profiles
        o = refinement(anisotropic_spread_deg=aniso, refine_mosaic=False)
        profile_map = oracle_profile_map(o.shots, errors)
        if profile_map is not None:
            o.map_profiles(profile_map)
            o.initialise_states()
        o.run()
        oracle = {"oracle_theta": o.theta.tolist(), "oracle_covariance": curvature(o, observed=False).profiled.tolist()}
    r = refinement()
    r.run()
    physics_cov = curvature(r, observed=False).profiled
    physics = r.theta.tolist()
    if args.jitter_sigma is not None:  # the corrected arm refines each still's energy jitter
        r.settings = replace(r.settings, energy_jitter_sigma_eV=args.jitter_sigma)
    contexts = [pixel_context(r.shots, s, NOMINAL_EV, args.stencil_radius) for s in r.shots.shots]
    wanted = CorrectionSettings(gain=args.gain, head=args.head, stencil_radius=args.stencil_radius, stencil_symmetry=args.stencil_symmetry)
    correction = PixelCorrection(r.shots.panels.n_panels, wanted, feature_statistics(r, contexts))
    model = CorrectedModel(r, correction, contexts, CorrectSettings(epochs=args.epochs, noise_flow=args.noise_flow))
    model.run()
    joint, _, _ = model.covariance()
    return {
        "replicate": replicate, "seed": args.seed, "n": args.n, "psf_fwhm_px": args.psf, "prior_sigma_eV": args.prior_sigma,
        "jitter_eV": args.jitter, "jitter_sigma_eV": args.jitter_sigma, "pixel_gain_rms": args.pixgain, "aniso": args.aniso,
        "head": args.head, "stencil_radius": args.stencil_radius, "stencil_symmetry": args.stencil_symmetry,
        "model_error_fraction": args.model_error, "mosaic_latent": args.mosaic_latent, "charge_rms": args.charge_rms,
        "readout_photons": args.readout, "noise_flow": args.noise_flow, "panel_gain_rms": args.panel_gain, "gain": args.gain,
        "anchor_beta": model.settings.anchor_beta,
        "panel_gain": None if panel_gain is None else panel_gain.tolist(),
        "shoeboxes_per_panel": sum(s.shoeboxes.n_shoeboxes for s in r.shots.shots) / DETECTOR_SHAPE[0],
        "truth": truth.tolist(), "physics_theta": physics, "physics_covariance": physics_cov.tolist(),
        "theta": r.theta.tolist(), "covariance": joint[:2, :2].tolist(), "epochs": len(model.history), "converged": model.converged,
        "noise_flow_fits": [h["noise_flow"] for h in model.history if "noise_flow" in h],
        **oracle, "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def summarise(paths: list[Path]) -> dict:
    """Per arm (physics, corrected) and quantity (site A, site B, A - B): calibration_summary of
    the Gaussian PITs of the truth over the lines of ``paths`` (e.g. the shards), and the
    injection-recovery slope of the estimates on the truths (scipy.stats.linregress) beside the
    slope a calibrated posterior mean has under the prior's shrinkage, 1 - sigma^2 / tau^2 (tau^2
    the prior variance of the quantity: the sites' prior_sigma_eV^2, twice that for A - B)."""
    rows = [r for path in paths for r in read_records(path)]
    out: dict = {"replicates": len(rows), "converged": sum(bool(r.get("converged")) for r in rows),
                 "epochs_mean": round(float(np.mean([r["epochs"] for r in rows])), 2)}  # fmt: skip
    contrast = np.array([1.0, -1.0])
    prior_var = float(np.mean([r["prior_sigma_eV"] for r in rows])) ** 2
    arms = [("physics", "physics_theta", "physics_covariance"), ("corrected", "theta", "covariance")]
    if all("oracle_theta" in r for r in rows):
        arms.append(("oracle", "oracle_theta", "oracle_covariance"))
    for arm, theta_key, cov_key in arms:
        theta = np.array([r[theta_key][:2] for r in rows])
        cov = np.array([np.array(r[cov_key])[:2, :2] for r in rows])
        truth = np.array([r["truth"] for r in rows])
        entries = {}
        for k, name in enumerate(("A", "B")):
            entries[name] = (theta[:, k], np.sqrt(cov[:, k, k]), truth[:, k])
        entries["A - B"] = (theta @ contrast, np.sqrt(np.einsum("i,rij,j->r", contrast, cov, contrast)), truth @ contrast)
        out[arm] = {}
        for name, (est, sigma, true) in entries.items():
            pit = gaussian_pit(est, sigma, true)
            error = est - true
            fit = linregress(true, est)
            tau2 = prior_var * (2.0 if name == "A - B" else 1.0)
            out[arm][name] = {**calibration_summary(pit), "mean_error_eV": round(float(error.mean()), 4),
                              "rms_z": round(float(np.sqrt(np.mean((error / sigma) ** 2))), 3),
                              "mean_sigma_eV": round(float(sigma.mean()), 4),
                              "recovery_slope": round(float(fit.slope), 4), "recovery_slope_se": round(float(fit.stderr), 4),
                              "recovery_intercept_eV": round(float(fit.intercept), 4),
                              "shrinkage_slope": round(1.0 - float(np.mean(sigma**2)) / tau2, 4), "pit": pit.tolist()}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicates", type=int, default=100)
    ap.add_argument("--n", type=int, default=3, help="stills per data set")
    ap.add_argument("--spot-scale", type=float, default=4000.0)
    ap.add_argument("--psf", type=float, default=1.5, help="injected PSF FWHM (px)")
    ap.add_argument("--prior-sigma", type=float, default=1.0, help="truth ~ N(0, this) and the fit's prior (eV)")
    ap.add_argument("--jitter", type=float, default=0.0, help="injected per-still energy jitter rms (eV; > 0: the cell is refined)")
    ap.add_argument("--pixgain", type=float, default=0.0, help="injected per-pixel flat-field gain error rms (fraction; one map)")
    ap.add_argument("--panel-gain", type=float, default=0.0, help="injected per-panel gain error rms (fraction; drawn per data set)")
    ap.add_argument("--gain", action="store_true", help="the correction's smooth gain per panel on (off by default here: 3 stills give ~25 shoeboxes per panel)")
    ap.add_argument("--aniso", type=float, default=1.0, help="injected anisotropic mosaic: spreads about a, b, c F, 1, 1/F times the model's (1: off)")
    ap.add_argument("--model-error", type=float, default=0.0, help="every arm's refinement.model_error_fraction (Gaussian pixel variance lambda + (f lambda)^2)")
    ap.add_argument("--mosaic-latent", action="store_true", help="the physics and corrected arms refine each still's mosaic spreads (refinement.refine_mosaic)")
    ap.add_argument("--charge-rms", type=float, default=0.0, help="injected charge spread per photon (fraction; a charge-integrating detector)")
    ap.add_argument("--readout", type=float, default=0.0, help="injected Gaussian readout (photons), told to every arm (likelihood gaussian_readout)")
    ap.add_argument("--noise-flow", action="store_true", help="the corrected arm learns the pixel noise (correct.noise_flow)")
    ap.add_argument("--oracle", action="store_true", help="also the oracle arm: physics told the injected mosaic, PSF and gains (not the jitter)")
    ap.add_argument("--head", action="store_true", help="the correction's head on too (off by default, as in the program)")
    ap.add_argument("--stencil-radius", type=int, default=CorrectionSettings.stencil_radius, help="half-width (px) of the correction's redistribution stencil")
    ap.add_argument("--stencil-symmetry", choices=("none", "d4"), default=CorrectionSettings.stencil_symmetry, help="a weight per offset, or per orbit of the square's symmetries")
    ap.add_argument("--jitter-sigma", type=float, default=None, help="the corrected arm refines each still's jitter under N(0, this^2) (eV)")
    ap.add_argument("--epochs", type=int, default=15, help="the most epochs (the fit stops once converged)")
    ap.add_argument("--shards", type=int, default=1, help="split the replicates round-robin over this many processes")
    ap.add_argument("--shard", type=int, default=0, help="which of them this process runs (its own output file)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="results")
    ap.add_argument("--summarise", nargs="+", default=None, help="files of lines: print the summary and stop")
    ap.add_argument("--plots", default=None, help="with --summarise: write the coverage and rank PNGs here")
    ap.add_argument("--plot-stem", default="correct_calibration", help="their names: <stem>_coverage.png, <stem>_sbc.png")
    args = ap.parse_args(argv)
    if args.noise_flow and not (args.readout > 0 or args.model_error > 0):
        raise SystemExit("Sorry: --noise-flow needs a Gaussian likelihood: give --readout or --model-error")
    if args.oracle and args.jitter > 0:
        raise SystemExit("Sorry: --oracle is not told the stills' energy jitter: leave out --jitter or --oracle")
    if args.summarise:
        summary = summarise([Path(p) for p in args.summarise])
        if args.plots:
            from spread_dials.plots.calibration import plot_coverage, plot_rank_histograms

            pits = {f"{arm} {name}": np.array(v["pit"]) for arm in ("physics", "corrected") for name, v in summary[arm].items()}
            rows = [r for p in args.summarise for r in read_records(Path(p))]
            errors = [f"a {rows[0]['psf_fwhm_px']:g} px PSF"] if rows[0]["psf_fwhm_px"] else []
            if rows[0].get("jitter_eV"):
                errors.append(f"a {rows[0]['jitter_eV']:g} eV jitter" + (" (refined)" if rows[0].get("jitter_sigma_eV") else ""))
            if rows[0].get("charge_rms"):
                errors.append(f"a {rows[0]['charge_rms']:.0%} charge spread per photon" + (" (noise flow)" if rows[0].get("noise_flow") else ""))
            if rows[0].get("aniso", 1.0) != 1.0:
                errors.append(f"a {rows[0]['aniso']:g}:1:{1 / rows[0]['aniso']:g} mosaic spread"
                              + (" (latent)" if rows[0].get("mosaic_latent") else ""))  # fmt: skip
            if rows[0].get("panel_gain_rms"):
                errors.append(f"a {rows[0]['panel_gain_rms']:.0%} gain error per panel" + (" (gain learned)" if rows[0].get("gain") else ""))
            title = f"dials.spread_correct, toy, {' and '.join(errors) or 'no error'} ({summary['replicates']} data sets)"
            plot_coverage(pits, Path(args.plots) / f"{args.plot_stem}_coverage.png", title=title)
            plot_rank_histograms(pits, Path(args.plots) / f"{args.plot_stem}_sbc.png", title=title)
        for arm in ("physics", "corrected"):
            for v in summary[arm].values():
                v.pop("pit")
        print(json.dumps(summary, indent=1))
        return 0
    torch.manual_seed(args.seed)
    out = Path(args.out) / ("correct_calibration_toy.jsonl" if args.shards == 1 else f"correct_calibration_toy.shard{args.shard}of{args.shards}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {r["replicate"] for r in read_records(out, repair=True)}
    work = [k for k in range(args.replicates) if k % args.shards == args.shard and k not in done]
    t0 = time.perf_counter()
    for count, replicate in enumerate(work, 1):
        line = run_one(replicate, args)
        append_record(out, line)
        rate = count / (time.perf_counter() - t0)
        print(f"replicate {replicate}: truth {np.round(line['truth'], 3).tolist()} physics {np.round(line['physics_theta'][:2], 3).tolist()} "
              f"corrected {np.round(line['theta'][:2], 3).tolist()} ({line['seconds']:.0f} s; {count}/{len(work)}, "
              f"ETA {(len(work) - count) / rate:.0f} s)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
