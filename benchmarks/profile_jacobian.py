"""Speed of the profiles' Jacobian in the crystal offsets: two reverse passes
(spread_dials.refine.derivatives.value_and_jacobian, what stills_profiles uses) against the
baseline torch.func.jacfwd (forward mode, what it used before session 11), on the same kernel
blocks of the same stills, in one run; one JSON object.

Usage (repository root; on the GPU machines with PYTHONPATH=$PWD and bench_data carried):
    python benchmarks/profile_jacobian.py --case rubredoxin --stills 4 --repeats 3 [--device cuda] [--out DIR]

Stills: benchmarks/refine.py's case (synthetic_shots, the Jungfrau 16M, the preset brightness);
profiles at zero offsets with the cell refined (3 + k tangents).  Each method: the mean wall
time of --repeats calls after one warm-up, per still; the largest difference of the Jacobians
relative to their largest entry; peak GPU memory of each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from refine import BACKGROUND_PHOTONS, load_case

from spread_dials.refine.derivatives import value_and_jacobian
from spread_dials.refine.profiles import _domains_per_call, _group_profile, _still_bytes, stills_profiles
from spread_dials.refine.synthetic import synthetic_shots


def forward_mode(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: value and Jacobian in one vectorised forward-mode pass."""

    def with_value(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = fn(v)
        return out, out

    jacobian, value = torch.func.jacfwd(with_value, has_aux=True)(x)
    return value, jacobian


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="rubredoxin", choices=("rubredoxin", "psii"))
    ap.add_argument("--data", default="bench_data")
    ap.add_argument("--stills", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="directory for profile_jacobian_<case>.json (else stdout only)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    case = load_case(args.case, Path(args.data))
    model = case["model"]
    stills, made = [], None
    for i in range(args.stills):
        made, _ = synthetic_shots(case["panels"], case["truth"], model, case["real_space"], case["energy"], 1,
                                  seed=args.seed * 1000 + i, spot_scale=case["spot_scale"], background_photons=BACKGROUND_PHOTONS,
                                  orientation_error_deg=case["orientation_error_deg"], device=device)  # fmt: skip
        stills.append(made.to(device).shots[0])
    shots = made.to(device)
    n_cell = model.n_cell_parameters
    zero = torch.zeros(3 + n_cell, dtype=torch.float64, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def by(method) -> list[torch.Tensor]:
        """Each still's Jacobian (pixels, C, 3 + k), its domains one kernel block at a time as stills_profiles makes them."""
        out = []
        for still in stills:
            per_call = _domains_per_call(model, device, 1, _still_bytes(still, model, 3 + n_cell))
            block, starts = _group_profile(shots, [still], model, zero.unsqueeze(0), True, per_call)
            out.append(sum(method(partial(block, d0=d0), zero)[1] for d0 in starts))
        return out

    result = {"case": args.case, "stills": args.stills, "tangents": 3 + n_cell, "channels": int(case["energy"].numel()),
              "domains": model.mosaic_domains, "pixels_per_still": [int(s.shoeboxes.n_pixels) for s in stills],
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    jacobians = {}
    for name, method in (("forward_mode_baseline", forward_mode), ("two_reverse_passes", value_and_jacobian)):
        jacobians[name] = by(method)  # warm-up
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            by(method)
        sync()
        result[f"{name}_seconds_per_still"] = (time.perf_counter() - t0) / (args.repeats * args.stills)
        result[f"{name}_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    scale = max(float(j.abs().max()) for j in jacobians["forward_mode_baseline"])
    result["largest_relative_difference"] = max(float((a - b).abs().max()) for a, b in
                                                zip(jacobians["forward_mode_baseline"], jacobians["two_reverse_passes"])) / scale  # fmt: skip
    result["speedup"] = result["forward_mode_baseline_seconds_per_still"] / result["two_reverse_passes_seconds_per_still"]
    sync()
    t0 = time.perf_counter()
    stills_profiles(shots, stills, model, [zero[:3]] * len(stills), [zero[3:]] * len(stills))
    sync()
    result["stills_profiles_seconds_per_still"] = (time.perf_counter() - t0) / args.stills
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        path = Path(args.out) / f"profile_jacobian_{args.case}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
