"""Where the time goes in predict_windows for one psii_jungfrau16m still (torch.profiler table)."""

from __future__ import annotations

import torch
from forward import build_scene

from spread_dials.physics.sparse import predict_windows

if __name__ == "__main__":
    scene = build_scene("psii_jungfrau16m", torch.device("cuda"), torch.float32)
    predict_windows(scene, 1e-6)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, with_stack=False) as prof:
        predict_windows(scene, 1e-6)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
