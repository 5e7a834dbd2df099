"""Speed of the profiles' Jacobian in the crystal offsets: closed form in the kernel's own pass
(spread_dials.refine.profiles.stills_profiles, fused by torch.compile on a GPU; session 14)
against the baseline of sessions 11-13, two reverse passes of autograd through the eager kernel
(spread_dials.refine.derivatives.value_and_jacobian), on the same stills, in one run; one JSON object.

Usage (repository root; on the GPU machines with PYTHONPATH=$PWD and bench_data carried):
    python benchmarks/profile_jacobian.py --case rubredoxin --stills 4 --repeats 3 [--device cuda] [--out DIR]

Stills: benchmarks/refine.py's case (synthetic_shots, the Jungfrau 16M, the preset brightness);
profiles at zero offsets with the cell refined (3 + k tangents).  Each method: the mean wall
time of --repeats calls after one warm-up (which holds torch.compile's compilation), per still;
the largest difference of the profiles and of the Jacobians relative to their largest entry;
peak GPU memory of each.  Also the profiles alone (no Jacobian) and all stills made together.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from refine import BACKGROUND_PHOTONS, load_case

from spread_dials.physics.sparse import window_channel_profiles
from spread_dials.refine.derivatives import value_and_jacobian
from spread_dials.refine.profiles import (
    _domains_per_call,
    _still_bytes,
    crystal_real_space,
    shoebox_windows,
    shot_scene,
    stills_profiles,
)
from spread_dials.refine.synthetic import synthetic_shots


def reverse_passes(shots, still, model, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: one still's (pixels, C) profiles and (pixels, C, 3 + k) Jacobian by two
    reverse passes through the eager kernel, one block of mosaic domains at a time (the code of
    sessions 11-13)."""
    device = x0.device
    per_call = _domains_per_call(model, device, 1, _still_bytes(still, model, x0.numel()))
    n_boxes, n_pixels = int(still.shoeboxes.n_shoeboxes), int(still.shoeboxes.n_pixels)
    windows = shoebox_windows(still, per_call)
    scale = still.weight.to(x0) * (still.weight.numel() / still.weight.to(x0).sum())
    scene = shot_scene(shots, replace(still, weight=torch.ones_like(still.weight)), model, x0[:3], x0[3:])
    rotations = model.domain_rotations(dtype=x0.dtype).to(device)
    chunk = (1 << 25) if device.type == "cuda" else None
    value = jacobian = 0
    for d0 in range(0, model.mosaic_domains, per_call):
        size = min(per_call, model.mosaic_domains - d0)
        selected = windows.select(torch.arange(size * n_boxes, device=device))

        def block(x: torch.Tensor, d0: int = d0, size: int = size, selected=selected) -> torch.Tensor:
            real = crystal_real_space(still.real_space.to(x), x[:3], x[3:], model.cell_ties) @ rotations[d0 : d0 + size].transpose(-1, -2)
            return window_channel_profiles(scene, selected, chunk, real)[0].view(size, n_pixels, -1).sum(0) * scale

        v, j = value_and_jacobian(block, x0)
        value, jacobian = value + v, jacobian + j
    return value, jacobian


def closed_form(shots, still, model, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The product path: stills_profiles of one still."""
    made = stills_profiles(shots, [still], model, [x0[:3]], [x0[3:]])[0]
    return made.profile, made.jacobian


def trace(run, device: torch.device) -> list[dict]:
    """The 25 operations of ``run()`` with the most device time (CPU time on the CPU), by
    torch.profiler: name, calls, total milliseconds."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:25]
    return [{"name": e.key, "calls": e.count, "ms": getattr(e, key) / 1e3} for e in events]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="rubredoxin", choices=("rubredoxin", "psii"))
    ap.add_argument("--data", default="bench_data")
    ap.add_argument("--stills", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="directory for profile_jacobian_<case>.json (else stdout only)")
    ap.add_argument("--trace", action="store_true",
                    help="also run torch.profiler over one closed-form call (after the timings) and record its 25 costliest operations")  # fmt: skip
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

    def timed(name: str, run) -> object:
        """run() once to warm up, then --repeats times timed; seconds per still and peak memory into result."""
        t0 = time.perf_counter()
        out = run()
        sync()
        result[f"{name}_first_call_seconds"] = time.perf_counter() - t0  # holds torch.compile's compilation
        print(f"{name}: first call {result[f'{name}_first_call_seconds']:.1f} s", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            run()
        sync()
        result[f"{name}_seconds_per_still"] = (time.perf_counter() - t0) / (args.repeats * args.stills)
        result[f"{name}_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        print(f"{name}: {result[f'{name}_seconds_per_still']:.4f} s per still", file=sys.stderr, flush=True)
        return out

    result = {"case": args.case, "stills": args.stills, "tangents": 3 + n_cell, "channels": int(case["energy"].numel()),
              "domains": model.mosaic_domains, "pixels_per_still": [int(s.shoeboxes.n_pixels) for s in stills],
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}  # fmt: skip
    made = {name: timed(name, lambda method=method: [method(shots, still, model, zero) for still in stills])
            for name, method in (("closed_form", closed_form), ("two_reverse_passes_baseline", reverse_passes))}  # fmt: skip
    for i, what in enumerate(("profile", "jacobian")):
        scale = max(float(m[i].abs().max()) for m in made["two_reverse_passes_baseline"])
        result[f"largest_relative_difference_{what}"] = max(
            float((a[i] - b[i]).abs().max()) for a, b in zip(made["closed_form"], made["two_reverse_passes_baseline"])) / scale
    result["speedup"] = result["two_reverse_passes_baseline_seconds_per_still"] / result["closed_form_seconds_per_still"]
    offsets = ([zero[:3]] * len(stills), [zero[3:]] * len(stills))
    timed("profiles_only", lambda: stills_profiles(shots, stills, model, *offsets, jacobian=False, together=False))
    timed("closed_form_together", lambda: stills_profiles(shots, stills, model, *offsets))
    if args.trace:
        result["trace"] = trace(lambda: closed_form(shots, stills[0], model, zero), device)
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
