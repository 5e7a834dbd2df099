"""Structure-factor tables for benchmarks/refine.py, made with cctbx on a machine that has it.

The GPU machines have no cctbx: this script computes, once, F0 and the per-site bases G of the
refinement's structure-factor assembly F(h, E) = F0 + sum_s (f'_s + i f''_s) G_s (the same
adapters dials.spread_refine uses: adapters.structure_factors.load_model / select_sites /
prepare_structure_factors) and the reference curves the sites need, and saves them as .npz:

  rubredoxin.npz  the built-in rubredoxin (1BRF), Fe sites, to the Jungfrau 16M's reach at 7120 eV
                  (rubredoxin.phil: d_min = None is the detector's reach)
  psii.npz        psii_oec.pdb, Mn sites grouped by atom name (MN1..MN4 of both monomers),
                  d_min 3.4 A (psii.phil), plus the Mn(III) and Mn(IV) curves (free-atom Mn moved
                  to each state's edge, physics.oxidation_states) on a 0.1 eV grid
  ferredoxin.npz  1m2a.pdb (Sauter 2020), Fe sites grouped by atom name: FE1 and FE2 of the
                  [2Fe-2S] clusters of both chains (2 atoms each), to the Jungfrau 16M's reach
                  at 7120 eV, as rubredoxin
  tiny.npz        the built-in rubredoxin to --tiny-d-min (3.5 A): the CI smoke case
                  (phil/campaign/ci_smoke.phil; about a second to make)

Every Miller index to d_min in P1 (Friedel mates distinct), stored as int16 indices and
complex64 F0, G (to stay inside the device tool's 64 MiB working tree); benchmarks/refine.py
promotes them to complex128.

    .venv/bin/python benchmarks/refine_tables.py --out bench_data --psii-model ../shared/data/models/psii_oec.pdb
    .venv/bin/python benchmarks/refine_tables.py --out bench_data --cases ferredoxin
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def _save(path: Path, prepared, extra: dict) -> None:
    hkl = np.asarray(prepared.miller_index)
    assert np.abs(hkl).max() < 2**15
    np.savez(path, miller_index=hkl.astype(np.int16), F0=np.asarray(prepared.F0).astype(np.complex64),
             G=np.asarray(prepared.G).astype(np.complex64),
             site_labels=np.array([s.label for s in prepared.sites]), **extra)  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_data")
    ap.add_argument("--psii-model", default="../shared/data/models/psii_oec.pdb")
    ap.add_argument("--psii-d-min", type=float, default=3.4)
    ap.add_argument("--skip-psii", action="store_true")
    ap.add_argument("--ferredoxin-model", default="../shared/data/models/1m2a.pdb")
    ap.add_argument("--ferredoxin-d-min", type=float, default=None, help="A (default: the Jungfrau 16M's reach)")
    ap.add_argument("--tiny-d-min", type=float, default=3.5)
    ap.add_argument("--cases", default="rubredoxin,psii", help="comma-separated: rubredoxin, psii, ferredoxin, tiny")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c and not (c == "psii" and args.skip_psii)]
    unknown = set(cases) - {"rubredoxin", "psii", "ferredoxin", "tiny"}
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}")

    from spread_dials.adapters.free_atom import free_atom_curve
    from spread_dials.adapters.structure_factors import (
        default_model_path,
        load_model,
        prepare_structure_factors,
        select_sites,
    )
    from spread_dials.detectors.jungfrau import jungfrau16m_panel_array
    from spread_dials.physics.oxidation_states import mn_oxidation_state_curves
    from spread_dials.physics.sparse import detector_d_min

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # rubredoxin and ferredoxin: the Jungfrau 16M's reach at the top of the 40-channel band around 7120 eV
    panels = jungfrau16m_panel_array(energy_eV=7120.0)
    wavenumber_max = (7120.0 + 20.0) / 12398.419843320026
    reach = detector_d_min(panels, torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64), wavenumber_max)
    fe_cases = {"rubredoxin": (default_model_path(), "atom", reach), "tiny": (default_model_path(), "atom", args.tiny_d_min),
                "ferredoxin": (Path(args.ferredoxin_model), "name", args.ferredoxin_d_min or reach)}  # fmt: skip
    for name in [c for c in cases if c in fe_cases]:
        t0 = time.perf_counter()
        path, group_by, d_min = fe_cases[name]
        xrs, hierarchy = load_model(path)
        sites = select_sites(hierarchy, element="Fe", group_by=group_by)
        prepared = prepare_structure_factors(xrs, sites, d_min=d_min, mean_energy_eV=7120.0)
        _save(out / f"{name}.npz", prepared, {"d_min": d_min, "cell": np.array(xrs.unit_cell().parameters())})
        print(f"{name}: {len(sites)} sites {[s.label for s in sites]}, {prepared.F0.shape[0]} reflections to "
              f"{d_min:.3f} A, {time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip

    if "psii" in cases:
        t0 = time.perf_counter()
        xrs, hierarchy = load_model(args.psii_model)
        sites = select_sites(hierarchy, element="Mn", group_by="name")
        prepared = prepare_structure_factors(xrs, sites, d_min=args.psii_d_min, mean_energy_eV=6550.0)
        grid = np.arange(6200.0, 6900.0, 0.1)
        states = mn_oxidation_state_curves(free_atom_curve("Mn", grid, "sasaki"), (3, 4))
        curves = {f"mn{s}_{k}": getattr(states[s], a).numpy() for s in (3, 4)
                  for k, a in (("energy", "energy_eV"), ("fp", "f_prime"), ("fdp", "f_double_prime"))}  # fmt: skip
        _save(
            out / "psii.npz",
            prepared,
            {"d_min": args.psii_d_min, "cell": np.array(xrs.unit_cell().parameters()), **curves},
        )
        print(f"psii: {len(sites)} sites {[s.label for s in sites]}, {prepared.F0.shape[0]} reflections to "
              f"{args.psii_d_min} A, {time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
