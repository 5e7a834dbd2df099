"""Where the main thread's time goes in one psii_jungfrau16m shot as dials.spread_simulate makes
it (``simulate_counts`` + the true-spot table; torch.profiler table by CPU time on stdout).

Usage: python benchmarks/profile_shot.py
"""

from __future__ import annotations

import torch
from simulate import PhysicsStills

if __name__ == "__main__":
    produce = PhysicsStills("psii_jungfrau16m")
    produce(0), produce(1)  # compile
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(2, 5):
            produce(i)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    print("seconds per shot", produce.seconds)
