"""SPREAD campaign harness (first step of the SPREAD-at-scale issue): replicate refinements of N
in-memory stills with a known truth, one JSON line per (case, N, replicate).

Usage (repository root; on the GPU machines with PYTHONPATH=$PWD, bench_data carried):
    python benchmarks/spread_campaign.py --case rubredoxin --n 30,100 --replicates 4 --out campaign
    mpirun -n 8 python benchmarks/spread_campaign.py ... --mpi      (stills striped over ranks,
                                                                    one GPU per rank)
    python benchmarks/spread_campaign.py --summarise campaign/campaign_rubredoxin.jsonl

The stills come from the physics core in memory (spread_dials.refine.synthetic, the simulator's
sparse kernel; no DIALS): the cases of benchmarks/refine.py (cctbx F0/G from bench_data, the
presets' brightness, the Jungfrau 16M), each still's crystal drawn from the SAME domain set as
the refinement's model (quadrature: so that the spread measures the statistics, not a domain
misfit), handed on with the orientation and cell errors that dials.spread_stills_process leaves
(orientation: benchmarks/refine.py's measured medians; cell: --cell-error rms).  Every draw comes
from --seed, N and the replicate.  Refinement: the engine of dials.spread_refine with its
defaults (cell refined, resolution ramp, Gauss-Newton stage 1, scoring stage 2).

Each line: the estimates theta (eV), the truth (rigid shift of each site's true curve onto its
reference over the band, as dials.spread_refine's truth= report), the profiled Fisher sigma at the
optimum (the Cramer-Rao bound of these pixels when the model is right), the sandwich sigma,
optionally a bootstrap sigma, shoeboxes, pixels, seconds and device.  Resumable: a (case, N,
replicate, seed) already in the file is skipped.  Not yet (issue 12): the PHIL front end, the
precision ladder's plot, calibration (SBC), PSII at 20k stills, the conventional route.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root (no install needed)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from refine import BACKGROUND_PHOTONS, load_case

from spread_dials.parallel import Parallel, mpi_context
from spread_dials.physics.structure_factors import StructureFactors
from spread_dials.refine.engine import Refinement, RefineSettings, make_caches
from spread_dials.refine.references import rigid_shift_eV
from spread_dials.refine.shots import ShotSet
from spread_dials.refine.sites import EdgeShiftSites
from spread_dials.refine.synthetic import synthetic_shots
from spread_dials.refine.uncertainty import bootstrap, curvature
from spread_dials.util.device import select_device


def _still_seed(seed: int, n: int, replicate: int, index: int) -> int:
    """A reproducible seed per still, distinct across (seed, N, replicate, still)."""
    return int(np.random.SeedSequence([seed, n, replicate, index]).generate_state(1)[0])


def run_replicate(case: dict, n: int, replicate: int, args, comm: Parallel, device: torch.device) -> dict | None:
    """Refine one replicate of ``n`` stills (this rank's share); the record on the root rank."""
    t0 = time.perf_counter()
    mine = list(range(comm.rank, n, comm.size))
    model = case["model"]
    shots = []
    for i in mine:
        made, _ = synthetic_shots(case["panels"], case["truth"], model, case["real_space"], case["energy"], 1,
                                  seed=_still_seed(args.seed, n, replicate, i), spot_scale=case["spot_scale"],
                                  background_photons=BACKGROUND_PHOTONS, orientation_error_deg=case["orientation_error_deg"],
                                  cell_error_fraction=args.cell_error, device=device)  # fmt: skip
        shots.append(made.shots[0])
        base = made
    shot_set = ShotSet(base.panels, base.beam_direction, base.e_vector, base.polarization_fraction, shots,
                       [f"still {i}" for i in mine]).to(device)  # fmt: skip
    caches = make_caches(shot_set, case["table"], model, refine_cell=args.cell_error > 0)
    sites = EdgeShiftSites(case["references"], list(range(len(case["references"]))), case["labels"])
    settings = RefineSettings(macrocycles=args.macrocycles, refine_cell=args.cell_error > 0)
    refinement = Refinement(shot_set, mine, n, caches, [], sites, sites.initial(), model, comm, settings)
    refinement.initialise_states()
    refinement.run()
    cov = curvature(refinement, observed=False)
    draws = bootstrap(refinement, args.bootstrap, args.seed) if args.bootstrap else None
    if not comm.is_root:
        return None
    band = (float(case["energy"][1]), float(case["energy"][-2]))
    truth = [rigid_shift_eV(c, r, *band) for c, r in zip(case["truth_curves"], case["references"])]
    sigma = lambda m: None if m is None else m.diag().clamp(min=0).sqrt().tolist()  # noqa: E731
    return {
        "case": case["name"], "n": n, "replicate": replicate, "seed": args.seed, "sites": case["labels"],
        "theta": refinement.theta.tolist(), "truth": truth, "sigma_fisher": sigma(cov.profiled),
        "sigma_sandwich": sigma(cov.sandwich),
        "sigma_bootstrap": None if draws is None or draws.shape[0] < 2 else draws.std(0).tolist(),
        "macrocycles": len(refinement.history), "ranks": comm.size, "device": str(device),
        "cell_error": args.cell_error, "truth_shift": args.truth_shift, "seconds": time.perf_counter() - t0,
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def summarise(path: Path) -> dict:
    """Per (case, N): replicates, bias and spread of each site's estimate, mean Fisher and
    sandwich sigma, the spread over the mean Fisher sigma, and the fraction of |z| < 1, 2."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = {}
    for key in sorted({(r["case"], r["n"]) for r in rows}):
        group = [r for r in rows if (r["case"], r["n"]) == key]
        theta = np.array([r["theta"] for r in group])
        truth = np.array([r["truth"] for r in group])
        fisher = np.array([r["sigma_fisher"] for r in group])
        error = theta - truth
        spread = error.std(0, ddof=1) if len(group) > 1 else np.full(theta.shape[1], np.nan)
        z = error / fisher
        out[f"{key[0]} N={key[1]}"] = {
            "replicates": len(group), "bias_eV": error.mean(0).round(4).tolist(), "spread_eV": spread.round(4).tolist(),
            "sigma_fisher_eV": fisher.mean(0).round(4).tolist(), "spread_over_fisher": (spread / fisher.mean(0)).round(3).tolist(),
            "within_1_fisher_sigma": (np.abs(z) < 1).mean(0).round(3).tolist(),
            "within_2_fisher_sigma": (np.abs(z) < 2).mean(0).round(3).tolist(),
        }  # fmt: skip
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="rubredoxin", choices=("rubredoxin", "psii"))
    ap.add_argument("--data", default="bench_data", help="cctbx tables from benchmarks/refine_tables.py")
    ap.add_argument("--n", default="30", help="comma-separated numbers of stills")
    ap.add_argument("--replicates", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--macrocycles", type=int, default=6)
    ap.add_argument("--bootstrap", type=int, default=0)
    ap.add_argument("--cell-error", type=float, default=0.001, help="rms fractional error of each given cell length")
    ap.add_argument("--truth-shift", type=float, default=None,
                    help="eV: every site's truth is its reference moved by this (default: the case's true states)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mpi", action="store_true", help="ranks of mpirun share each replicate's stills")
    ap.add_argument("--out", default="campaign")
    ap.add_argument("--summarise", default=None, help="print the summary of a campaign file and stop")
    args = ap.parse_args(argv)
    if args.summarise:
        print(json.dumps(summarise(Path(args.summarise)), indent=1))
        return 0
    comm = mpi_context("mpi" if args.mpi else "serial")
    device = select_device(args.device, rank=comm.rank)
    case = load_case(args.case, Path(args.data))  # stills drawn from case["model"]: the refinement's own domain set
    if args.truth_shift is not None:  # each site's truth: its reference moved by exactly this (the model is exact)
        case["truth_curves"] = [r.shifted(args.truth_shift) for r in case["references"]]
        fp, fdp = zip(*(c.at(case["energy"]) for c in case["truth_curves"]))
        table = case["table"]
        case["truth"] = StructureFactors(table.miller_index, table.F0, table.G, torch.stack(fp), torch.stack(fdp))
    out = Path(args.out) / f"campaign_{args.case}.jsonl"
    done = set()
    if out.exists():
        done = {(r["n"], r["replicate"], r["seed"]) for r in map(json.loads, out.read_text().splitlines()) if r}
    if comm.is_root:
        out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    work = [(int(n), r) for n in args.n.split(",") for r in range(args.replicates) if (int(n), r, args.seed) not in done]
    for k, (n, replicate) in enumerate(work):
        record = run_replicate(case, n, replicate, args, comm, device)
        if record is not None:
            with out.open("a") as f:  # one whole line per write: a killed run leaves complete lines
                f.write(json.dumps(record) + "\n")
            rate = (k + 1) / (time.perf_counter() - t_start)
            print(f"N={n} replicate {replicate}: theta {np.round(record['theta'], 3).tolist()} truth "
                  f"{np.round(record['truth'], 3).tolist()} fisher {np.round(record['sigma_fisher'], 3).tolist()} "
                  f"({record['seconds']:.1f} s; {k + 1}/{len(work)}, ETA {(len(work) - k - 1) / rate:.0f} s)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
