"""Where the time goes in predict_windows for one psii_jungfrau16m still (torch.profiler tables).

Usage: python benchmarks/profile_predict.py [--no-compile]

Prints the median wall time of 5 predictions, then the profiler's table by CPU time (host work
and synchronisation) and by CUDA time (kernels).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from forward import build_scene

from spread_dials.physics.sparse import predict_windows

if __name__ == "__main__":
    compiled = "--no-compile" not in sys.argv
    scene = build_scene("psii_jungfrau16m", torch.device("cuda"), torch.float32)
    predict_windows(scene, 1e-6, compiled=compiled)
    torch.cuda.synchronize()
    wall = []
    for _ in range(5):
        t0 = time.perf_counter()
        windows = predict_windows(scene, 1e-6, compiled=compiled)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
    print(f"predict_windows: median {statistics.median(wall) * 1e3:.1f} ms, {windows.n_windows} windows")
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, with_stack=False) as prof:
        predict_windows(scene, 1e-6, compiled=compiled)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
