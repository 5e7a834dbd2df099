"""How far the refinement's reported sigma is from the spread of its estimates, and why.

In-memory rubredoxin-like stills (pure torch, runs on the GPU machines): the Fe site's truth is
the packaged reduced curve shifted by ``--truth-shift`` eV; each replicate draws new stills and
noise from its own seed and refines the edge shift from 0 with the engine of dials.spread_refine.
The stills' crystals can differ from what refinement assumes (``--truth-domains``,
``--domains-per-still``: each still draws its own mosaic domains, as dials.spread_simulate does;
``--orientation-error-deg``: the error indexing leaves).  Prints one JSON line per replicate and a
summary: mean error, spread of the estimates, mean reported sigmas (Fisher profiled, sandwich).

    python benchmarks/refine_misfit.py --device cuda --replicates 8 --stills 16 --domains-per-still
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch

from spread_dials.detectors.layout import panel_array_from_layout
from spread_dials.detectors.simple import simple_detector
from spread_dials.io.anomalous_tables import read_anomalous_table
from spread_dials.io.builtin_references import builtin_fe_reference_paths
from spread_dials.parallel import Parallel
from spread_dials.physics.crystal import real_space_from_cell
from spread_dials.physics.sparse import miller_indices_within
from spread_dials.physics.structure_factors import StructureFactors
from spread_dials.refine.engine import Refinement, RefineSettings, make_caches
from spread_dials.refine.profiles import CrystalModel
from spread_dials.refine.sites import EdgeShiftSites
from spread_dials.refine.synthetic import synthetic_shots
from spread_dials.refine.uncertainty import curvature

CELL = (34.1, 34.9, 43.7, 90.0, 90.0, 90.0)  # rubredoxin P2_1 2_1 2_1 (A, deg)


def wilson_table(cell: torch.Tensor, d_min: float, seed: int, f0_rms: float = 120.0, b_iso: float = 15.0):
    """Acentric Wilson F0 (rms ``f0_rms`` e at low resolution, B ``b_iso`` A^2) and one Fe site
    basis exp(2 pi i h.x - B s^2 / 4) at a random position: (hkl, F0, G)."""
    hkl = miller_indices_within(cell, d_min)
    gen = torch.Generator().manual_seed(seed)
    s2 = ((hkl.double() @ torch.linalg.inv(cell).T) ** 2).sum(-1)  # 1/d^2
    fall = torch.exp(-b_iso * s2 / 4)
    F0 = torch.complex(torch.randn(len(hkl), generator=gen, dtype=torch.float64),
                       torch.randn(len(hkl), generator=gen, dtype=torch.float64)) * (f0_rms / math.sqrt(2)) * fall
    x = torch.rand(3, generator=gen, dtype=torch.float64)
    G = torch.polar(fall, 2 * math.pi * (hkl.double() @ x)).unsqueeze(-1)
    return hkl, F0, G


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--replicates", type=int, default=4)
    ap.add_argument("--stills", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--truth-shift", type=float, default=2.0)
    ap.add_argument("--ncells", type=float, default=30.0)
    ap.add_argument("--mosaic-deg", type=float, default=0.05)
    ap.add_argument("--domains", type=int, default=10, help="domains of the refinement's model")
    ap.add_argument("--truth-domains", type=int, default=None, help="domains of the stills (default --domains)")
    ap.add_argument("--domains-per-still", action="store_true")
    ap.add_argument("--domain-set", default="quadrature", choices=["quadrature", "random"], help="the model's domains")
    ap.add_argument("--truth-domain-set", default="random", choices=["quadrature", "random"])
    ap.add_argument("--relinearisations", type=int, default=3)
    ap.add_argument("--rotation-step-mrad", type=float, default=1.0)
    ap.add_argument("--orientation-error-deg", type=float, default=0.0)
    ap.add_argument("--spot-scale", type=float, default=100.0)
    ap.add_argument("--background", type=float, default=0.5, help="photons per pixel")
    ap.add_argument("--macrocycles", type=int, default=3)
    ap.add_argument("--no-orientation", action="store_true", help="refine only scale and background in stage 1")
    ap.add_argument("--channels", type=int, default=40)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    red = read_anomalous_table(builtin_fe_reference_paths()[2])
    cell = real_space_from_cell(torch.tensor(CELL, dtype=torch.float64))
    energy = 7100.0 + torch.arange(args.channels, dtype=torch.float64)
    fp, fdp = red.at(energy, args.truth_shift)
    hkl, F0, G = wilson_table(cell, 1.9, args.seed)
    truth = StructureFactors(hkl, F0, G, fp.unsqueeze(0), fdp.unsqueeze(0))
    table = StructureFactors(hkl, F0, G)
    panels = panel_array_from_layout(simple_detector(256, 256, 0.1, 45.0, 2, 2, gap_mm=0.5))
    model = CrystalModel((args.ncells,) * 3, args.mosaic_deg, args.domains, seed=7, domain_set=args.domain_set)
    truth_model = CrystalModel((args.ncells,) * 3, args.mosaic_deg, args.truth_domains or args.domains, seed=7,
                               domain_set=args.truth_domain_set)  # fmt: skip
    settings = RefineSettings(args.macrocycles, 1e-9, 50, 50, None, not args.no_orientation, args.rotation_step_mrad,
                              args.relinearisations, parameter_tolerance=0.0)  # fmt: skip
    rows = []
    for r in range(args.replicates):
        t0 = time.perf_counter()
        shots, made = synthetic_shots(panels, truth, model, cell, energy, args.stills, seed=args.seed * 1000 + r,
                                      spot_scale=args.spot_scale, background_photons=args.background,
                                      orientation_error_deg=args.orientation_error_deg, truth_model=truth_model,
                                      domains_per_still=args.domains_per_still, device=device)  # fmt: skip
        shots = shots.to(device)
        sites = EdgeShiftSites([red], [0], ["Fe"], [0.0])
        caches = make_caches(shots, table, model)
        ref = Refinement(shots, list(range(len(shots.shots))), len(shots.shots), caches, [], sites, sites.initial(), model,
                         Parallel(), settings)  # fmt: skip
        ref.initialise_states()
        ref.run()
        cov = curvature(ref, observed=False)
        est = float(ref.theta[0])
        row = {"replicate": r, "estimate_eV": est, "error_eV": est - args.truth_shift,
               "sigma_profiled_eV": math.sqrt(float(cov.profiled[0, 0])),
               "sigma_sandwich_eV": math.sqrt(float(cov.sandwich[0, 0])) if cov.sandwich is not None else None,
               "shoeboxes": sum(s.shoeboxes.n_shoeboxes for s in shots.shots),
               "pixels": sum(s.shoeboxes.n_pixels for s in shots.shots),
               "scales": [round(float(torch.exp(s.log_scale)), 2) for s in ref.states],
               "rotation_deg": [round(math.degrees(float(s.rotation.norm())), 4) for s in ref.states],
               "nll": [h["nll"] for h in ref.history], "seconds": time.perf_counter() - t0}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    est = np.array([r["estimate_eV"] for r in rows])
    summary = {"args": vars(args), "device": str(device), "replicates": len(rows),
               "mean_error_eV": float(est.mean() - args.truth_shift),
               "spread_eV": float(est.std(ddof=1)) if len(rows) > 1 else None,
               "mean_sigma_profiled_eV": float(np.mean([r["sigma_profiled_eV"] for r in rows])),
               "mean_sigma_sandwich_eV": float(np.mean([r["sigma_sandwich_eV"] or np.nan for r in rows]))}  # fmt: skip
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
