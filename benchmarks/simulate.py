"""dials.spread_simulate throughput, end to end (kernel, noise, gzip NXmx containers, truth files).

Usage:
    python benchmarks/simulate.py [--nimages N] [--images-per-container K] [--device auto|cpu|cuda]
                                  [--nproc T] [key=value ...]

Runs the rubredoxin default (rubredoxin.phil: built-in model, 7120 eV, 40 SASE channels,
10 mosaic domains, the Jungfrau 16M, water background, Poisson noise) in a temporary directory
and prints one JSON object: shots_per_second and seconds_per_image over the shot loop (setup:
structure factors and background excluded, reported separately), bytes_per_image of the
containers, the device and the settings.  Extra key=value arguments go to the program.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nimages", type=int, default=4)
    parser.add_argument("--images-per-container", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--nproc", type=int, default=os.cpu_count() or 1)
    parser.add_argument("extra", nargs="*", help="more key=value parameters for dials.spread_simulate")
    args = parser.parse_args()

    os.environ.setdefault("DIALS_NOBANNER", "1")
    from spread_dials.command_line import simulate

    with tempfile.TemporaryDirectory(prefix="spread_bench_") as tmp:
        argv = [
            "rubredoxin.phil", f"nimages={args.nimages}", f"output.images_per_container={args.images_per_container}",
            f"device.name={args.device}", f"mp.nproc={args.nproc}", f"output.directory={tmp}", *args.extra,
        ]  # fmt: skip
        t0 = time.perf_counter()
        # the program's console output is not part of the result
        stdout, sys.stdout = sys.stdout, open(os.devnull, "w")  # noqa: SIM115
        try:
            simulate.run(argv)
        finally:
            sys.stdout.close()
            sys.stdout = stdout
        total = time.perf_counter() - t0
        record = json.loads((Path(tmp) / "images_run.json").read_text())
    summary = record["summary"]
    print(
        json.dumps(
            {
                "benchmark": "dials.spread_simulate rubredoxin default",
                "shots_per_second": summary["shots_per_second"],
                "seconds_per_image": 1.0 / summary["shots_per_second"],
                "bytes_per_image": summary["bytes_per_image"],
                "device": summary["device"],
                "nimages": args.nimages,
                "images_per_container": args.images_per_container,
                "threads": args.nproc,
                "setup_and_startup_seconds": total - summary["seconds"],
                "detector": record["detector"],
                "channels": len(record["channels_eV"]),
                "mosaic_domains": record["crystal"]["mosaic_domains"],
                "true_spots_per_image": summary["true_spots"] / args.nimages,
                "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
