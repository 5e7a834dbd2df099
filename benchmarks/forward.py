"""Forward-model throughput: one JSON object per (case, kernel) on stdout.

Usage:
    python benchmarks/forward.py [--case psii_jungfrau16m|small_cpu|all] [--kernel sparse|dense|both]
                                 [--device auto|cpu|cuda] [--dtype float32|float64] [--repeats N]

Cases:
  psii_jungfrau16m: PSII P212121 117.585 223.068 309.977 A, d_min 3.4 A, F0 from a Wilson draw
    on the model's absolute scale (below), 6550 eV, 100 channels of 1 eV (Gaussian, FWHM 25 eV),
    25 mosaic domains (0.05 deg rms), gauss shape, the crystal and beam of psii.phil (4000 A
    domains, 4 um path, 1e12 photons in a 1 um beam: Ncells and spot scale derived as
    dials.spread_simulate derives them), the ideal Jungfrau 16M built in code (256 panels of
    254 x 254, 0.075 mm, 0.32 mm Si, 1 layer), 5 um water + 1 mm air background, Poisson noise +
    readout noise + calibration error.
  small_cpu: rubredoxin-sized cell (34.1 x 34.9 x 43.7 A), 2 x 2 panels of 256 x 256 at 0.1 mm,
    20 channels, 5 domains; everything else as above.
Wilson draw: |F|^2 ~ Exp(mean) with mean = K * sum_cell Z^2 * exp(-2 B s^2), s = sin(theta)/lambda,
random phases.  sum_cell Z^2 is over the atoms of the model times the asymmetric units (psii_oec.pdb:
52,542 atoms x 4 = 9.33e6 e^2; the built-in rubredoxin 1BRF, hydrogens included: 975 x 4 = 1.28e5);
K = 0.81 and B = 34 A^2 fit cctbx's |F_calc|^2 of psii_oec.pdb (n_gaussian form factors, no bulk
solvent) in 9 shells from 9.7 to 3.4 A to within 30 % (the shell beyond 9.7 A is 5.7x brighter).
Timings exclude building the scene (structure factors, geometry), which a run does once.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch

from spread_dials.detectors.jungfrau import jungfrau16m_layout
from spread_dials.detectors.layout import DetectorLayout, panel_array_from_layout, silicon_mu_per_mm
from spread_dials.detectors.simple import simple_detector
from spread_dials.physics import (
    Crystal,
    Scene,
    StructureFactors,
    gaussian_spectrum,
    make_sources,
    mosaic_domain_rotations,
    real_space_from_cell,
    rotation_from_vector,
)
from spread_dials.physics.background import AIR_F_BG, WATER_F_BG, background_photons
from spread_dials.physics.detector_response import calibration_gain_map
from spread_dials.physics.microcrystal import brightness
from spread_dials.physics.sparse import miller_indices_within, predict_windows
from spread_dials.physics.still import AmorphousMaterial, DetectorResponse, detector_counts, expected_photons

CASES = {
    "psii_jungfrau16m": dict(
        cell=(117.585, 223.068, 309.977, 90.0, 90.0, 90.0), d_min=3.4, n_channels=100, n_domains=25,
        sum_z2_cell=9.33e6, detector="jungfrau16m",
    ),
    "small_cpu": dict(
        cell=(34.1, 34.9, 43.7, 90.0, 90.0, 90.0), d_min=2.0, n_channels=20, n_domains=5,
        sum_z2_cell=1.28e5, detector="simple",
    ),
}  # fmt: skip
MEAN_EV = 6550.0
PHOTONS = 1e12
BEAM_DIAMETER_UM = 1.0
DOMAIN_SIZE_A = 4000.0
CRYSTAL_LENGTH_UM = 4.0
WILSON_K = 0.81
WILSON_B_A2 = 34.0


def wilson_structure_factors(cell, d_min: float, sum_z2_cell: float, seed: int, dtype) -> StructureFactors:
    """|F| from a Wilson (acentric) draw of mean WILSON_K * sum_z2_cell * exp(-2 B s^2) (e^2) and
    random phases, every h to d_min (see the module text)."""
    real_space = real_space_from_cell(torch.tensor(cell, dtype=torch.float64))
    hkl = miller_indices_within(real_space, d_min)
    q = hkl.double() @ torch.linalg.inv(real_space).T
    stol2 = (q * q).sum(-1) / 4.0
    gen = torch.Generator().manual_seed(seed)
    intensity = -torch.log1p(-torch.rand(hkl.shape[0], generator=gen, dtype=torch.float64))  # Exp(1)
    amp = (intensity * WILSON_K * sum_z2_cell).sqrt() * torch.exp(-WILSON_B_A2 * stol2)
    phase = 2 * math.pi * torch.rand(hkl.shape[0], generator=gen, dtype=torch.float64)
    F = torch.polar(amp.double(), phase).to(torch.complex64 if dtype == torch.float32 else torch.complex128)
    return StructureFactors(miller_index=hkl, F0=F)


def case_layout(case: str) -> DetectorLayout:
    """The detector of a case."""
    if CASES[case]["detector"] == "jungfrau16m":
        return jungfrau16m_layout()
    return simple_detector(256, 256, 0.1, 100.0, 2, 2, gap_mm=1.0, thickness_mm=0.32,
                           mu_per_mm=silicon_mu_per_mm(MEAN_EV))  # fmt: skip


def build_scene(case: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Scene:
    spec = CASES[case]
    panels = panel_array_from_layout(case_layout(case), n_layers=1, dtype=dtype)
    energy, weight = gaussian_spectrum(MEAN_EV, 25.0, spec["n_channels"], 1.0)
    sources = make_sources(energy, weight, PHOTONS / (math.pi / 4.0 * (BEAM_DIAMETER_UM * 1e-6) ** 2))
    bright = brightness(spec["cell"], DOMAIN_SIZE_A, CRYSTAL_LENGTH_UM, BEAM_DIAMETER_UM)
    gen = torch.Generator().manual_seed(seed)
    rotvec = torch.randn(3, generator=gen, dtype=torch.float64)
    crystal = Crystal(
        real_space=real_space_from_cell(torch.tensor(spec["cell"], dtype=torch.float64), rotation_from_vector(rotvec)),
        ncells_abc=torch.tensor(bright.ncells_abc, dtype=torch.float64),
        domain_rotations=mosaic_domain_rotations(0.05, spec["n_domains"], seed=seed + 1),
        shape="gauss",
        spot_scale=bright.spot_scale,
    )
    sf = wilson_structure_factors(spec["cell"], spec["d_min"], spec["sum_z2_cell"], seed, dtype)
    return Scene(panels, sources, crystal, sf, oversample=1).to(device=device, dtype=dtype)


def materials() -> tuple[AmorphousMaterial, ...]:
    return (
        AmorphousMaterial(torch.tensor(WATER_F_BG), 0.005, 1.0, 18.0),
        AmorphousMaterial(torch.tensor(AIR_F_BG), 1.0, 1.2e-3, 28.96),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(
    case: str, kernel: str, device: torch.device, dtype: torch.dtype, repeats: int, tolerance: float, compiled: bool,
    background: str = "per-image", max_terms_per_chunk: int | None = None,
) -> dict:
    scene = build_scene(case, device, dtype)
    panels = scene.panels
    shape = (panels.n_panels, panels.n_slow, panels.n_fast)
    response = DetectorResponse(
        calibration_gain=calibration_gain_map(shape, 0.03, seed=7, device=device, dtype=dtype), readout_noise_adu=0.1
    )
    mats = materials()
    run_background = 0.0
    if background == "per-run":  # as dials.spread_simulate does: once per run, scaled per shot
        with torch.no_grad():
            run_background = background_photons(panels, scene.sources.collapsed(), mats, PHOTONS, compiled=compiled)
        mats = ()
    gen = torch.Generator(device=device).manual_seed(1)
    timings = []
    result = None
    for i in range(repeats + 1):  # the first run warms up (and compiles)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            if kernel == "sparse":
                predict_windows(scene, tolerance, compiled=compiled)  # timed alone (counted once below)
                _sync(device)
                t_pred = time.perf_counter() - t0
            result = expected_photons(scene, mats, PHOTONS, kernel=kernel, tolerance=tolerance, compiled=compiled,
                                      max_terms_per_chunk=max_terms_per_chunk)  # fmt: skip
            _sync(device)
            t1 = time.perf_counter()
            counts = detector_counts(result.total + run_background, response, gen)
        _sync(device)
        t2 = time.perf_counter()
        if i > 0:
            # expected_photons predicts the windows again: count that once
            predict = t_pred if kernel == "sparse" else 0.0
            timings.append((t1 - t0 - predict, t2 - t1, t2 - t0 - predict, predict))
    total = statistics.median(t[2] for t in timings)
    return {
        "case": case,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "kernel": kernel,
        "dtype": str(dtype).replace("torch.", ""),
        "seconds_per_image": total,
        "seconds_physics": statistics.median(t[0] for t in timings),
        "seconds_noise": statistics.median(t[1] for t in timings),
        "seconds_predict": statistics.median(t[3] for t in timings),
        "background": background,
        "tolerance": tolerance if kernel == "sparse" else None,
        "compiled": compiled if kernel == "sparse" else None,
        "max_terms_per_chunk": max_terms_per_chunk,
        "pixels": int(counts.numel()),
        "bragg_windows": result.windows.n_windows if result.windows is not None else None,
        "terms_evaluated": _terms(scene, result),
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "bragg_photons": float(result.bragg.sum()),
        "background_photons": float((result.background + run_background).sum()),
        "repeats": repeats,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def _terms(scene: Scene, result) -> int:
    per_pixel = scene.oversample**2 * scene.panels.n_layers
    if result.windows is None:
        p = scene.panels
        return p.n_panels * p.n_slow * p.n_fast * per_pixel * scene.sources.n_sources * scene.crystal.n_domains
    w = result.windows  # every window pixel sums every source
    return int((w.n_fast * w.n_slow).sum()) * per_pixel * scene.sources.n_sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="all", choices=["all", *CASES])
    parser.add_argument("--kernel", default="both", choices=["sparse", "dense", "both"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=1e-6, help="sparse kernel per-term tolerance")
    parser.add_argument("--compile", default="auto", choices=["auto", "yes", "no"],
                        help="fuse the sparse kernel with torch.compile (auto: on CUDA)")
    parser.add_argument("--background", default="per-image", choices=["per-image", "per-run"],
                        help="compute the background for every image, or once per run as dials.spread_simulate does")
    parser.add_argument("--chunk-log2", type=int, default=None,
                        help="sparse kernel: at most 2^N terms per evaluated chunk (default: the kernel's)")
    parser.add_argument("--compare", action="store_true",
                        help="also report the sparse kernel's max pixel error and total vs the dense kernel")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    dtype = getattr(torch, args.dtype)
    cases = list(CASES) if args.case == "all" else [args.case]
    kernels = ["sparse", "dense"] if args.kernel == "both" else [args.kernel]
    compiled = args.compile == "yes" or (args.compile == "auto" and device.type == "cuda")
    for case in cases:
        for kernel in kernels:
            repeats = 1 if kernel == "dense" else args.repeats
            chunk = None if args.chunk_log2 is None else 1 << args.chunk_log2
            result = run_case(case, kernel, device, dtype, repeats, args.tolerance, compiled, args.background, chunk)
            print(json.dumps(result), flush=True)
        if args.compare:
            print(json.dumps(compare_kernels(case, device, dtype, args.tolerance, compiled)), flush=True)


def compare_kernels(case: str, device: torch.device, dtype: torch.dtype, tolerance: float, compiled: bool) -> dict:
    """Sparse vs dense expected Bragg photons on the same scene (the issue's accuracy criterion)."""
    scene = build_scene(case, device, dtype)
    with torch.no_grad():
        sparse = expected_photons(scene, kernel="sparse", tolerance=tolerance, compiled=compiled).bragg
        dense = expected_photons(scene, kernel="dense").bragg
    peak = float(dense.max())
    return {
        "case": case,
        "comparison": "sparse_vs_dense",
        "tolerance": tolerance,
        "dtype": str(dtype).replace("torch.", ""),
        "max_abs_diff_over_peak": float((sparse - dense).abs().max()) / peak,
        "total_ratio": float(sparse.sum()) / float(dense.sum()),
        "peak_photons": peak,
    }


if __name__ == "__main__":
    main()
