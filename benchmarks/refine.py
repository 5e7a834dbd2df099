"""Speed of the SPREAD refinement engine (dials.spread_refine): one JSON object per case.

Usage (from the repository root; on the GPU machines, which do not install the package, with
PYTHONPATH=$PWD or as below: the script puts the repository root on sys.path itself):
    python benchmarks/refine.py [--device cuda|cpu] [--data bench_data] [--cases rubredoxin,psii]
                                [--shots-rubredoxin N] [--shots-psii N] [--macrocycles M]
                                [--deadline-s S] [--out DIR] [--threads T] [--profile]

The stills are built in memory with the physics core (spread_dials.refine.synthetic: the sparse
kernel on each still's shoebox windows, Poisson counts, no DIALS), so the benchmark runs on the
GPU machines, which have no DIALS/cctbx.  The structure factors are cctbx's, precomputed by
benchmarks/refine_tables.py into --data (F0 and the per-site bases G, every P1 index to d_min).

Cases (the presets' physical crystal and beam, docs/brightness.md: 4000 A domains, 4 um path,
1e12 photons in a 1 um beam, Ncells and spot scale derived by physics.microcrystal.brightness):
  rubredoxin: built-in 1BRF, one Fe site, 7120 eV, 40 channels of 1 eV, 10 mosaic domains of
    0.05 deg rms, truth Fe(III) (packaged oxidized curve), refined as an edge shift against the
    reduced Fe(II) curve, the Jungfrau 16M, table to the detector's reach (1.69 A).
  psii: psii_oec.pdb, four Mn sites (MN1..MN4, each both monomers), 6550 eV, 100 channels of
    1 eV, 25 domains, truth S1 = Mn(III, IV, IV, III), refined as four edge shifts against
    Mn(III), the Jungfrau 16M, d_min 3.4 A.
Spectra: random (Gamma(2)) channel weights per still.  Background: a flat 6 photons per pixel
(the presets' 5 um water, 1.0e8 photons over the 16.5 M pixels).  Each still's true crystal has
its own random domain draw (as dials.spread_simulate); refinement uses the quadrature domain set
and starts from the true orientation turned by a random rotation of rms angle as measured after
dials.spread_stills_process (median misorientation 0.037 deg rubredoxin, 0.072 deg PSII;
benchmarks/RESULTS.md).

Timing: the engine's own Refinement.stage1 / stage2 driven macrocycle by macrocycle; the
profile recomputation inside stage 1 (engine.stills_profiles, the kernel and its Jacobian in the
crystal offsets) is timed by wrapping that function with device synchronisation, and subtracted from
stage 1.  GPU-seconds per shot per macrocycle = seconds / shots on one GPU.  A deadline ends a
case early (after the current still): the JSON then says how far it got.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root (no install needed)

import spread_dials.refine.engine as engine
import spread_dials.refine.stage1 as stage1
from spread_dials.detectors.jungfrau import jungfrau16m_panel_array
from spread_dials.io.anomalous_tables import read_anomalous_table
from spread_dials.io.builtin_references import builtin_fe_reference_paths
from spread_dials.parallel import Parallel
from spread_dials.physics.anomalous import TabulatedCurve
from spread_dials.physics.crystal import real_space_from_cell
from spread_dials.physics.microcrystal import brightness
from spread_dials.physics.structure_factors import StructureFactors
from spread_dials.refine.engine import Refinement, RefineSettings, make_caches
from spread_dials.refine.profiles import CrystalModel
from spread_dials.refine.sites import EdgeShiftSites
from spread_dials.refine.synthetic import synthetic_shots

PHOTONS = 1e12
BEAM_DIAMETER_UM = 1.0
DOMAIN_SIZE_A = 4000.0
LENGTH_UM = 4.0
BACKGROUND_PHOTONS = 6.0
# median misorientation after stills_process (deg) -> per-axis sigma of synthetic_shots (median of
# a Maxwell distribution is 1.538 sigma)
MISORIENTATION_DEG = {"rubredoxin": 0.037, "psii": 0.072}
# published anchors (SPREAD_NOTES.md, issue 10)
ANCHORS = {
    "diffBragg_per_shot_gpu_s": 5.5,
    "diffBragg_per_shot_polychromatic_gpu_s": 15.0,
    "diffBragg_stage2_per_image_a100_gpu_s": 18.7,
    "ly99_spread_gpu_s_per_lattice": 300.0,
}

TIMERS: dict[str, float] = {}


class Deadline(Exception):
    pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _instrument(device: torch.device) -> None:
    """Time engine.stills_profiles (synchronised; profile_calls counts the stills recomputed)
    and count stage 1's batched NLL evaluations."""
    profiles, nll = engine.stills_profiles, stage1._nll

    def timed_profiles(*a, **k):
        _sync(device)
        t0 = time.perf_counter()
        out = profiles(*a, **k)
        _sync(device)
        TIMERS["profiles_s"] = TIMERS.get("profiles_s", 0.0) + time.perf_counter() - t0
        TIMERS["profile_calls"] = TIMERS.get("profile_calls", 0) + len(out)
        return out

    def counted_nll(*a, **k):
        TIMERS["rate_calls"] = TIMERS.get("rate_calls", 0) + 1
        return nll(*a, **k)

    engine.stills_profiles = timed_profiles
    stage1._nll = counted_nll


def _reset() -> None:
    TIMERS.clear()


def _curve(z, prefix: str, label: str) -> TabulatedCurve:
    return TabulatedCurve(torch.as_tensor(z[f"{prefix}_energy"]), torch.as_tensor(z[f"{prefix}_fp"]),
                          torch.as_tensor(z[f"{prefix}_fdp"]), label)  # fmt: skip


def load_case(name: str, data: Path) -> dict:
    """Everything a case needs, on the CPU."""
    z = np.load(data / f"{name}.npz")
    cell = tuple(float(x) for x in z["cell"])
    hkl = torch.as_tensor(z["miller_index"].astype(np.int64))
    F0 = torch.as_tensor(z["F0"]).to(torch.complex128)
    G = torch.as_tensor(z["G"]).to(torch.complex128)
    if name == "rubredoxin":
        energy = 7120.0 + torch.arange(40, dtype=torch.float64) - 19.5
        paths = builtin_fe_reference_paths()
        reduced, oxidized = read_anomalous_table(paths[2]), read_anomalous_table(paths[3])
        references = [reduced] * G.shape[1]
        truth_curves = [oxidized] * G.shape[1]
        domains, mean_eV = 10, 7120.0
    else:
        energy = 6550.0 + torch.arange(100, dtype=torch.float64) - 49.5
        mn3, mn4 = _curve(z, "mn3", "Mn(III)"), _curve(z, "mn4", "Mn(IV)")
        references = [mn3] * G.shape[1]
        truth_curves = [mn3, mn4, mn4, mn3][: G.shape[1]]  # S1: MN1(III) MN2(IV) MN3(IV) MN4(III)
        domains, mean_eV = 25, 6550.0
    fp = torch.stack([c.at(energy)[0] for c in truth_curves])
    fdp = torch.stack([c.at(energy)[1] for c in truth_curves])
    bright = brightness(cell, DOMAIN_SIZE_A, LENGTH_UM, BEAM_DIAMETER_UM)
    fluence = PHOTONS / (math.pi / 4.0 * (BEAM_DIAMETER_UM * 1e-6) ** 2)
    model = CrystalModel(bright.ncells_abc, 0.05, domains, "gauss", 7, fluence, 1, "quadrature")
    truth_model = CrystalModel(bright.ncells_abc, 0.05, domains, "gauss", 7, fluence, 1, "random")
    return dict(
        name=name, cell=cell, real_space=real_space_from_cell(torch.tensor(cell, dtype=torch.float64)),
        truth=StructureFactors(hkl, F0, G, fp, fdp), table=StructureFactors(hkl, F0, G), energy=energy,
        references=references, truth_curves=truth_curves, labels=[str(x) for x in z["site_labels"]], model=model,
        truth_model=truth_model,
        spot_scale=bright.spot_scale, ncells=bright.ncells_abc, mean_eV=mean_eV,
        panels=jungfrau16m_panel_array(energy_eV=mean_eV),
        orientation_error_deg=MISORIENTATION_DEG[name] / 1.538,
    )  # fmt: skip


def run_case(name: str, args, device: torch.device, deadline: float, emit) -> dict:
    case = load_case(name, Path(args.data))
    n_shots = args.shots_rubredoxin if name == "rubredoxin" else args.shots_psii
    row: dict = {"case": name, "device": _device_name(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                 "threads": torch.get_num_threads(), "dtype": "float64",
                 "channels": int(case["energy"].numel()), "mosaic_domains": case["model"].mosaic_domains,
                 "ncells_abc": case["ncells"], "spot_scale": case["spot_scale"], "background_photons_per_px": BACKGROUND_PHOTONS,
                 "orientation_error_deg_per_axis": case["orientation_error_deg"], "sites": case["labels"],
                 "table_reflections": int(case["table"].n_reflections), "shots_requested": n_shots,
                 "settings": None, "status": "started"}  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # --- build the stills (the kernel on the device), one at a time so the deadline can cut in
    t0 = time.perf_counter()
    shot_list = []
    for i in range(n_shots):
        if time.perf_counter() > deadline - args.reserve_s:
            break
        made, _ = synthetic_shots(case["panels"], case["truth"], case["model"], case["real_space"], case["energy"], 1,
                                      seed=args.seed * 1000 + i, spot_scale=case["spot_scale"],
                                      background_photons=BACKGROUND_PHOTONS,
                                      orientation_error_deg=case["orientation_error_deg"], truth_model=case["truth_model"],
                                      domains_per_still=True, device=device,
                                      cell_error_fraction=args.cell_error)  # fmt: skip
        shot_list.append(made.shots[0])
        if i == 0:
            base = made
        # stop building once the caches would not fit (profile + 3 tangents, float64, x1.5 headroom)
        px = sum(s.shoeboxes.n_pixels for s in shot_list)
        if device.type == "cuda" and px * row["channels"] * 8 * 4 * 1.5 > args.max_cache_gb * 1e9:
            break
    _sync(device)
    row["build_seconds"] = time.perf_counter() - t0
    shots = replace(base, shots=shot_list, sources=[f"synthetic still {i}" for i in range(len(shot_list))]).to(device)
    n = len(shots.shots)
    row["shots"] = n
    row["shoeboxes"] = sum(s.shoeboxes.n_shoeboxes for s in shots.shots)
    row["pixels"] = sum(s.shoeboxes.n_pixels for s in shots.shots)
    row["shoeboxes_per_shot"] = row["shoeboxes"] / max(n, 1)
    row["pixels_per_shot"] = row["pixels"] / max(n, 1)
    row["cache_bytes_per_shot"] = row["pixels_per_shot"] * row["channels"] * 8 * 4
    row["bragg_photons_per_shot"] = (
        float(np.mean([float(s.shoeboxes.counts.sum()) for s in shots.shots])) if n else None
    )
    emit({**row, "status": "built"})
    if n == 0:
        row["status"] = "no stills built before the deadline"
        return row

    # --- caches (the first profiles) and starting states
    _reset()
    t0 = time.perf_counter()
    caches = []
    for i in range(n):
        if time.perf_counter() > deadline - args.reserve_s:
            break
        caches += make_caches(replace(shots, shots=[shots.shots[i]], sources=[""]), case["table"], case["model"],
                              refine_cell=args.cell_error > 0)  # fmt: skip
    _sync(device)
    if len(caches) < n:  # the deadline cut in: refine the stills that have caches
        shots = replace(shots, shots=shots.shots[: len(caches)], sources=shots.sources[: len(caches)])
        n = len(caches)
        row["shots_refined"] = n
    row["initial_profiles_seconds_per_shot"] = TIMERS.get("profiles_s", 0.0) / max(n, 1)
    row["make_caches_seconds"] = time.perf_counter() - t0
    settings = RefineSettings(macrocycles=args.macrocycles, nll_tolerance=0.0, stage1_iterations=args.stage1_iterations,
                              stage2_iterations=args.stage2_iterations, readout_sigma=None, refine_orientation=True,
                              rotation_step_mrad=1.0, relinearisations=args.relinearisations,
                              refine_cell=args.cell_error > 0, stage2=args.stage2)  # fmt: skip
    row["settings"] = {k: getattr(settings, k) for k in ("macrocycles", "stage1_iterations", "stage2_iterations",
                                                        "relinearisations", "rotation_step_mrad", "refine_cell",
                                                        "stage2", "resolution_ramp")}  # fmt: skip
    row["cell_error_fraction"] = args.cell_error
    sites = EdgeShiftSites(case["references"], list(range(len(case["references"]))), case["labels"])
    ref = Refinement(shots, list(range(n)), n, caches, [], sites, sites.initial(), case["model"], Parallel(), settings)
    t0 = time.perf_counter()
    ref.initialise_states()
    _sync(device)
    row["initialise_states_seconds"] = time.perf_counter() - t0
    if device.type == "cuda":
        row["cache_memory_bytes"] = int(torch.cuda.memory_allocated(device))

    # one global value-and-gradient pass over every still: the unit cost of stage 2
    t0 = time.perf_counter()
    ref.global_value_and_grad(ref.theta)
    _sync(device)
    row["stage2_pass_seconds_per_shot"] = (time.perf_counter() - t0) / n

    # --- macrocycles
    value_and_grad = ref.global_value_and_grad
    counter = {"evals": 0}

    def counted(theta):
        if time.perf_counter() > deadline:
            raise Deadline()
        counter["evals"] += 1
        return value_and_grad(theta)

    ref.global_value_and_grad = counted
    cycles = []
    row["status"] = "refining"
    for cycle in range(settings.macrocycles):
        entry: dict = {"macrocycle": cycle + 1}
        shot_times: list[float] = []
        _reset()
        _sync(device)
        t0 = time.perf_counter()

        def progress(done, total, shot_times=shot_times):
            _sync(device)
            shot_times.append(time.perf_counter())
            if time.perf_counter() > deadline - args.reserve_s and done < total:
                raise Deadline()

        try:
            stage1_nll, _ = ref.stage1(progress, ramp=cycle == 0)
            complete1 = True
        except Deadline:
            stage1_nll, complete1 = None, False
        _sync(device)
        t1 = time.perf_counter()
        done = len(shot_times)
        entry.update(stage1_shots=done, stage1_complete=complete1, stage1_nll=stage1_nll,
                     profiles_seconds=TIMERS.get("profiles_s", 0.0), profile_calls=TIMERS.get("profile_calls", 0),
                     stage1_seconds=t1 - t0 - TIMERS.get("profiles_s", 0.0), stage1_rate_evaluations=TIMERS.get("rate_calls", 0))  # fmt: skip
        per = max(done, 1)
        entry.update(stage1_s_per_shot=entry["stage1_seconds"] / per, profiles_s_per_shot=entry["profiles_seconds"] / per,
                     relinearisations_per_shot=entry["profile_calls"] / per,
                     stage1_rate_evaluations_per_shot_pass=entry["stage1_rate_evaluations"] / max(entry["profile_calls"], 1))  # fmt: skip
        if not complete1:
            entry["status"] = "deadline in stage 1"
            cycles.append(entry)
            break
        counter["evals"] = 0
        t0 = time.perf_counter()
        try:
            entry["nll"] = ref.stage2()
            entry["stage2_complete"] = True
        except Deadline:
            entry["stage2_complete"] = False
        _sync(device)
        entry["stage2_seconds"] = time.perf_counter() - t0
        entry["stage2_evaluations"] = counter["evals"]
        entry["stage2_s_per_shot"] = entry["stage2_seconds"] / n
        entry["stage1_plus_stage2_s_per_shot"] = entry["stage1_s_per_shot"] + entry["stage2_s_per_shot"]
        entry["all_s_per_shot"] = entry["stage1_plus_stage2_s_per_shot"] + entry["profiles_s_per_shot"]
        entry["theta"] = [round(float(x), 4) for x in ref.theta]
        cycles.append(entry)
        emit({"case": name, "device": row["device"], "progress": entry})
        if not entry["stage2_complete"]:
            break
    row["macrocycles"] = cycles
    full = [c for c in cycles if c.get("stage2_complete")]
    if full:
        row["per_shot_per_macrocycle"] = {
            k: float(np.mean([c[k] for c in full]))
            for k in ("stage1_s_per_shot", "profiles_s_per_shot", "stage2_s_per_shot", "stage1_plus_stage2_s_per_shot", "all_s_per_shot")
        }  # fmt: skip
        if name == "psii" and device.type == "cuda":
            row["target_stage1_plus_stage2_s"] = 0.2
            row["target_met"] = row["per_shot_per_macrocycle"]["stage1_plus_stage2_s_per_shot"] <= 0.2
    elif cycles:
        c = cycles[0]
        row["per_shot_partial"] = {k: c.get(k) for k in ("stage1_s_per_shot", "profiles_s_per_shot")}
    row["truth_theta_eV"] = "rubredoxin: Fe(III) vs Fe(II) (~+1.9 eV); psii: 0, Mn(IV)-Mn(III), same, 0"
    if device.type == "cuda":
        row["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    row["status"] = "done" if full and len(full) == len(cycles) else "partial (deadline)"
    if args.profile and time.perf_counter() < deadline - 5:
        per_call = sum(c["profiles_seconds"] for c in cycles) / max(sum(c["profile_calls"] for c in cycles), 1)
        row["profile"] = profile_pieces(ref, device, deadline, per_call)
    return row


def profile_pieces(ref: Refinement, device: torch.device, deadline: float, profile_call_s: float) -> dict:
    """torch.profiler over one stage-1 pass, one stage-2 evaluation and (time allowing) one
    profile recomputation of still 0: GPU busy time, kernel launches, the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    i = 0
    cache, state = ref.caches[i], ref.states[i]
    intensity = ref.curves_intensity(i).detach()
    pieces = {
        "stage1_pass": lambda: engine.refine_shot(cache, state, intensity, ref.settings),
        "stage2_eval_one_still": lambda: engine.global_objective(
            ref.theta.clone().requires_grad_(True), [cache], [state], ref.sites, None
        )[0].backward(),  # fmt: skip
        "profile_recompute": lambda: ref.profiles_at(i, state),
    }
    for key, fn in pieces.items():
        need = 3.0 * profile_call_s + 5.0 if key == "profile_recompute" else 5.0
        if time.perf_counter() > deadline - need:
            out[key] = "skipped (deadline)"
            continue
        _sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            fn()
            _sync(device)
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        cuda_total = sum(e.self_device_time_total for e in events) / 1e6
        launches = sum(
            e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        )
        top = sorted(
            [e for e in events if e.self_device_time_total > 0], key=lambda e: e.self_device_time_total, reverse=True
        )[:8]
        out[key] = {"wall_s_profiled": wall, "gpu_busy_s": cuda_total, "kernel_launches": launches,
                    "top_kernels": [{"name": e.key[:80], "count": e.count, "gpu_s": e.self_device_time_total / 1e6} for e in top]}  # fmt: skip
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default="bench_data")
    ap.add_argument("--cases", default="psii,rubredoxin")
    ap.add_argument("--shots-rubredoxin", type=int, default=32)
    ap.add_argument("--shots-psii", type=int, default=8)
    ap.add_argument("--macrocycles", type=int, default=2)
    ap.add_argument("--stage1-iterations", type=int, default=50)
    ap.add_argument("--stage2-iterations", type=int, default=50)
    ap.add_argument("--relinearisations", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cell-error", type=float, default=0.001,
                    help="rms fractional error of each given cell length (0: cell not refined)")
    ap.add_argument("--stage2", default="scoring", choices=("scoring", "lbfgs"))
    ap.add_argument("--deadline-s", type=float, default=3600.0, help="wall-clock budget of the whole run (s)")
    ap.add_argument("--case-share", type=str, default="0.7,0.3", help="share of the deadline for each case")
    ap.add_argument("--reserve-s", type=float, default=5.0)
    ap.add_argument("--max-cache-gb", type=float, default=90.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--profile", action="store_true", help="torch.profiler on one still's stage-1 pass, profiles, stage-2 pass"
    )
    ap.add_argument("--out", default=None, help="also append the JSON lines to OUT/refine_<device>.jsonl")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    _instrument(device)
    start = time.perf_counter()
    log = None
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        log = open(Path(args.out) / f"refine_{device.type}.jsonl", "a")

    def emit(obj: dict) -> None:
        text = json.dumps(obj)
        print(text, flush=True)
        if log:
            log.write(text + "\n")
            log.flush()

    cases = [c for c in args.cases.split(",") if c]
    shares = [float(x) for x in args.case_share.split(",")]
    used = 0.0
    for k, name in enumerate(cases):
        share = shares[k] if k < len(shares) else 1.0
        used += share
        deadline = start + args.deadline_s * min(used, 1.0)
        try:
            row = run_case(name, args, device, deadline, emit)
        except Exception as e:  # noqa: BLE001  report and go on to the next case
            import traceback

            row = {"case": name, "device": _device_name(device), "status": f"error: {type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
        row["elapsed_s"] = time.perf_counter() - start
        row["anchors"] = ANCHORS
        emit({"result": row})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
