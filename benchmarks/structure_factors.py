"""Time and memory to prepare F0(h) and G_s(h) for a model: one JSON object on stdout.

Usage:
    python benchmarks/structure_factors.py [--model PATH] [--d-min 3.4] [--element Mn]
                                           [--energy-eV 6550] [--algorithm auto|direct|fft]
                                           [--check N] [--channels 100]

Default: the PSII model of shared/data/models/psii_oec.pdb (52,542 atoms) to 3.4 A, one
site per Mn atom (8), non-site atoms at 6550 eV (Sasaki).  ``--check N`` compares F0 with
cctbx direct summation at N random Miller indices (relative error: max, median, mean, and
max |dF| / rms |F|).  ``--channels C`` also times the dense assembly F[h, c] (complex64) for C
channels with Mn(III)/(IV) edge-shifted free-atom curves.  Memory is the process's peak
resident set size (ru_maxrss), read after each stage.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO.parent / "shared" / "data" / "models" / "psii_oec.pdb"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--d-min", type=float, default=3.4)
    parser.add_argument("--element", default="Mn")
    parser.add_argument("--energy-eV", type=float, default=6550.0)
    parser.add_argument("--algorithm", default="auto", choices=["auto", "direct", "fft"])
    parser.add_argument("--check", type=int, default=100)
    parser.add_argument("--channels", type=int, default=100)
    args = parser.parse_args()

    from cctbx import miller
    from cctbx.array_family import flex

    from spread_dials.adapters.free_atom import free_atom_curve
    from spread_dials.adapters.structure_factors import load_model, prepare_structure_factors, select_sites
    from spread_dials.physics.anomalous import EdgeShiftModel
    from spread_dials.physics.assembly import assemble_structure_factors
    from spread_dials.physics.constants import HC_EV_A
    from spread_dials.physics.oxidation_states import DEFAULT_OEC_S1_STATES, mn_oxidation_state_curves

    result: dict = {
        "benchmark": "structure_factors",
        "model": Path(args.model).name,
        "d_min_A": args.d_min,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    xrs, hierarchy = load_model(args.model)
    t1 = time.perf_counter()
    sites = select_sites(hierarchy, element=args.element)
    prepared = prepare_structure_factors(xrs, sites, d_min=args.d_min, mean_energy_eV=args.energy_eV, algorithm=args.algorithm)
    t2 = time.perf_counter()
    tensor_mb = sum(t.numel() * t.element_size() for t in (prepared.miller_index, prepared.F0, prepared.G)) / 2**20
    result.update(
        n_atoms=prepared.n_atoms,
        n_sites=len(sites),
        n_miller_indices_p1=int(prepared.miller_index.shape[0]),
        algorithm=prepared.algorithm,
        load_model_s=round(t1 - t0, 2),
        prepare_s=round(t2 - t1, 2),
        total_s=round(t2 - t0, 2),
        peak_rss_mb_before=round(rss0, 1),
        peak_rss_mb_after_prepare=round(peak_rss_mb(), 1),
        tensors_mb=round(tensor_mb, 1),
    )
    if args.check:
        flex.set_random_seed(0)
        pick = np.array(flex.random_permutation(prepared.miller_index.shape[0])[: args.check])
        reference = xrs.deep_copy_scatterers()
        reference.scattering_type_registry(table="n_gaussian")
        reference.set_inelastic_form_factors(photon=HC_EV_A / args.energy_eV, table="sasaki")
        for site in sites:
            for i in site.atom_indices:
                reference.scatterers()[i].fp = 0.0
                reference.scatterers()[i].fdp = 0.0
        idx = flex.miller_index([tuple(int(v) for v in h) for h in prepared.miller_index.numpy()[pick]])
        t3 = time.perf_counter()
        mset = miller.set(xrs.crystal_symmetry(), idx, anomalous_flag=True)
        F_ref = np.array(mset.structure_factors_from_scatterers(reference, algorithm="direct").f_calc().data())
        t4 = time.perf_counter()
        F = prepared.F0.numpy()[pick]
        strong = np.abs(F_ref) > 0
        rel = np.abs(F - F_ref)[strong] / np.abs(F_ref)[strong]
        rms = float(np.sqrt(np.mean(np.abs(prepared.F0.numpy()) ** 2)))
        result["check_vs_direct"] = {
            "n": int(strong.sum()),
            "relative_error_max": float(rel.max()),
            "relative_error_median": float(np.median(rel)),
            "relative_error_mean": float(rel.mean()),
            "abs_error_max_over_rms_F": float(np.abs(F - F_ref).max() / rms),
            "direct_s_for_these": round(t4 - t3, 2),
        }
    if args.channels and args.element == "Mn":
        energy = torch.arange(args.energy_eV - 300, args.energy_eV + 300, 0.1, dtype=torch.float64)
        states = mn_oxidation_state_curves(free_atom_curve("Mn", energy.numpy()), (3, 4))
        refs = [states[DEFAULT_OEC_S1_STATES.get(s.label.split("/")[-1], 3)] for s in sites]
        channels = args.energy_eV + torch.arange(args.channels, dtype=torch.float64) - (args.channels - 1) / 2
        fp, fdp = EdgeShiftModel(refs, refine=False)(channels)
        F0, G = prepared.F0.to(torch.complex64), prepared.G.to(torch.complex64)
        t5 = time.perf_counter()
        F = assemble_structure_factors(F0, G, fp.float(), fdp.float())
        t6 = time.perf_counter()
        result["dense_assembly"] = {
            "channels": args.channels,
            "dtype": "complex64",
            "seconds": round(t6 - t5, 3),
            "table_mb": round(F.numel() * F.element_size() / 2**20, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
