"""Is the refinement engine's Fisher sigma the sampling sd of its estimate?  The profiled linear
score at the truth over photon-noise draws of one data set (issue 13's calibration at scale).

With each still's crystal fixed at the truth and the oracle's profiles (benchmarks/correct.py's
oracle arm: the exact injected PSF and gains), the model is the simulator: lambda equals the
noise-free stills' expected photons (checked, printed).  The edge shift's score at the truth
with every still's scale and background planes profiled out is linear in the counts,

    z = sum_p w_p (k_p - lambda_p) / sqrt(I),   w_p = (d_theta lambda_p - X_p beta) / lambda_p,

(X the nuisance derivatives, beta their weighted least-squares fit to d_theta lambda, I =
sum_p w_p^2 lambda_p the profiled information); for Poisson counts it is N(0, 1) exactly, and
the fitted estimate's z equals it to first order.  Its spread over --draws noise draws of the
pipeline's own stills (synthetic_shots(noise_seed=K), K = 1 ... draws) is then the engine's
calibration given the stills, free of any fit.  One JSON line per run.

    python benchmarks/oracle_linear_score.py --errors none --seed 133 --draws 12 --out results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from correct import make_stills, shifted_case
from records import append_record

from spread_dials.parallel import Parallel
from spread_dials.refine.engine import Refinement, RefineSettings, make_caches
from spread_dials.refine.model import pixel_rate
from spread_dials.refine.sites import EdgeShiftSites
from spread_dials.refine.synthetic import oracle_profile_map


def profiled_weights(r: Refinement, theta: torch.Tensor, h: float = 1e-4) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Per still the rates lambda (N,) at ``theta`` (photons) and the score weights w (N,) with
    the still's scale and background planes projected out, and the profiled information I
    (1/eV^2), from the refinement's current per-shot parameters (theta's derivative by central
    differences of step ``h`` eV: the reference curves are cubic, smooth in the shift)."""
    lams, weights, information = [], [], 0.0
    for i, (cache, state) in enumerate(zip(r.caches, r.states)):
        lam, bragg = (t.detach().cpu().numpy() for t in pixel_rate(cache, state, r.curves_intensity(i, theta=theta, state=state)))
        up, down = (pixel_rate(cache, state, r.curves_intensity(i, theta=theta + s, state=state))[0].detach().cpu().numpy() for s in (h, -h))
        d_theta = (up - down) / (2 * h)
        shoebox = cache.pixel_shoebox.cpu().numpy()
        rows = np.arange(lam.size)
        nuisance = np.zeros((lam.size, 1 + 3 * (int(shoebox.max()) + 1)))
        nuisance[:, 0] = float(torch.exp(state.log_scale)) * bragg
        for k, column in enumerate((np.ones(lam.size), cache.fast.cpu().numpy(), cache.slow.cpu().numpy())):
            nuisance[rows, 1 + k + 3 * shoebox] = column
        weighted = nuisance.T / lam
        beta = np.linalg.lstsq(weighted @ nuisance, weighted @ d_theta, rcond=None)[0]
        profiled = d_theta - nuisance @ beta
        information += float((profiled**2 / lam).sum())
        lams.append(lam)
        weights.append(profiled / lam)
    return lams, weights, information


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="rubredoxin", choices=("rubredoxin", "psii"))
    ap.add_argument("--data", default="bench_data")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--errors", default="none", help="one error family of benchmarks/correct.py (none, psf1.5, ...)")
    ap.add_argument("--seed", type=int, default=1, help="the data set's stills (benchmarks/correct.py's --seed)")
    ap.add_argument("--draws", type=int, default=12, help="noise draws K = 1 ... draws")
    ap.add_argument("--truth-shift", type=float, default=2.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    if args.n < 1 or args.draws < 1:
        raise SystemExit("Sorry: --n and --draws must be >= 1")
    device = torch.device(args.device)
    case = shifted_case(args.case, Path(args.data), args.truth_shift)
    t0 = time.perf_counter()
    settings = argparse.Namespace(seed=args.seed, noise_seed=None, readout=0.0)
    clean, errors = make_stills(case, args.errors, args.n, 0, settings, device, true_crystals=True, poisson=False)
    sites = EdgeShiftSites(case["references"], list(range(len(case["references"]))), case["labels"])
    truth = torch.full((len(case["labels"]),), args.truth_shift, dtype=torch.float64)
    if truth.numel() != 1:
        raise SystemExit(f"Sorry: the linear score is for one site; case {args.case!r} has {truth.numel()}")
    caches = make_caches(clean, case["table"], case["model"], refine_cell=False)
    r = Refinement(clean, list(range(args.n)), args.n, caches, [], sites, truth.clone(), case["model"], Parallel(),
                   RefineSettings(macrocycles=6, refine_cell=False, refine_orientation=False))  # fmt: skip
    profile_map = oracle_profile_map(clean, errors)
    if profile_map is not None:
        r.map_profiles(profile_map)
    r.initialise_states()
    r.run()
    noise_free_theta = float(r.theta[0])
    r.states = [state for state, _ in r.refit_shots(truth)]  # the nuisance at the truth, noise-free
    lams, weights, information = profiled_weights(r, truth)
    misfit = max(float(np.abs(lam - c.counts.cpu().numpy()).max()) for lam, c in zip(lams, r.caches))
    print(f"noise-free fit {noise_free_theta:.6f} eV; |lambda - expected photons| <= {misfit:.3g}; sigma {information ** -0.5:.5f} eV "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    z = []
    t1 = time.perf_counter()
    for k in range(1, args.draws + 1):
        settings.noise_seed = k
        noisy, _ = make_stills(case, args.errors, args.n, 0, settings, device, true_crystals=True)
        score = sum(float((w * (s.shoeboxes.counts.cpu().numpy() - lam)).sum()) for w, lam, s in zip(weights, lams, noisy.shots))
        z.append(score / information**0.5)
        rate = k / (time.perf_counter() - t1)
        print(f"draw {k}: z {z[-1]:+.3f} ({k}/{args.draws}, ETA {(args.draws - k) / rate:.0f} s)", flush=True)
    zs = np.array(z)
    record = {"case": args.case, "error": args.errors, "n": args.n, "seed": args.seed, "draws": args.draws, "noise_free_theta": noise_free_theta,
              "largest_misfit_photons": misfit, "sigma": information**-0.5, "z_linear": z, "mean": float(zs.mean()),
              "sd": float(zs.std(ddof=1)) if zs.size > 1 else None, "beyond_2": float((np.abs(zs) > 2).mean()),
              "beyond_3": float((np.abs(zs) > 3).mean()), "seconds": time.perf_counter() - t0,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    out = Path(args.out) / f"oracle_linear_score_{args.case}_{args.errors}_s{args.seed}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    append_record(out, record)
    print(json.dumps({k: v for k, v in record.items() if k != "z_linear"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
