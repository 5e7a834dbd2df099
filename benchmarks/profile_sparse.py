"""Where the time goes in one psii_jungfrau16m still (torch.profiler table on stdout).

Usage: python benchmarks/profile_sparse.py [--tolerance 1e-4] [--chunk-log2 24] [--no-compile]
"""

from __future__ import annotations

import argparse

import torch
from forward import PHOTONS, build_scene, materials

from spread_dials.physics.still import expected_photons


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--chunk-log2", type=int, default=22)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    scene = build_scene("psii_jungfrau16m", device, torch.float32)
    kwargs = dict(kernel="sparse", tolerance=args.tolerance, compiled=not args.no_compile,
                  max_terms_per_chunk=1 << args.chunk_log2)  # fmt: skip
    with torch.no_grad():
        expected_photons(scene, materials(), PHOTONS, **kwargs)  # warm up / compile
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            expected_photons(scene, materials(), PHOTONS, **kwargs)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    print("peak memory bytes", torch.cuda.max_memory_allocated())


if __name__ == "__main__":
    main()
