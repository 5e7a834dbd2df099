"""dials.spread_simulate throughput: end to end, or the container write path alone.

Usage:
    python benchmarks/simulate.py [--phil rubredoxin.phil|psii.phil] [--nimages N]
                                  [--images-per-container K] [--device auto|cpu|cuda] [--nproc T]
                                  [--workers W|Auto] [key=value ...]
    python benchmarks/simulate.py --write-only [--workers 0,1,2] [--pool thread,process]
                                  [--nimages N] [--images-per-container K] [--level 1] [--encoder isal|zlib]
                                  [--produce-seconds 0.07] [--background-photons 0.5]
                                  [--physics psii_jungfrau16m|small_cpu]
                                  [--no-h5py-baseline] [--directory DIR]

End to end (default): runs the whole program (kernel, noise, compression and writing of the NXmx
containers, truth files) on the preset in a temporary directory and prints one JSON object:
shots_per_second and seconds_per_image over the shot loop (setup: structure factors and
background excluded, reported separately), bytes_per_image of the containers, the device, the
compression workers and the split of the time: simulate (main thread), compress (worker
CPU-seconds, summed over workers), write (HDF5 calls in the writer thread), truth (.expt/.refl),
and how long the main thread waited for the writer.  psii.phil takes structure.file from
../shared/data/models/psii_oec.pdb when it is not given.  Extra key=value arguments go to the
program.

--write-only: the write path alone, on synthetic Jungfrau 16M images (256 panels of 254 x 254
int32, 66 MB each) with a still's photon distribution (background mostly 0-3 photons, a few
thousand Bragg spots), written into NXmx containers exactly as the program writes them
(ChunkCompressor + NXmxWriter direct chunk writes, one writer thread beside the main thread,
fsync and rename per container).  One JSON line per (pool, workers): images/s, input MB/s,
stored bytes per image, compression ratio, worker CPU-seconds and HDF5 seconds per image.
``--workers h5py`` (on by default, --no-h5py-baseline turns it off) is the old path: h5py's
filter pipeline in the main thread.  ``--produce-seconds`` makes the main thread spend that long
per image (sleeping, as a thread waiting on the GPU does) to model the simulation beside it.
``--physics CASE`` makes each image with the physics instead, in the main thread as the program
does (``simulate_counts``: prediction, fused sparse kernel, background scaled from once per run,
noise, int32 counts to the host, the true-spot table), so that the GPU machine, which has no
DIALS, measures the program's shot loop: everything but the once-per-run setup and the truth
.expt/.refl files (which need dxtbx; their cost is reported by the end-to-end mode).
This mode imports no DIALS, dxtbx or cctbx (numpy, h5py, zlib, torch through the detector
layout, spread_dials.io), so it runs on the GPU machine; without h5py it measures compression
alone and writes the chunks to a plain file.
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

REPO = Path(__file__).resolve().parents[1]
#: top-level packages that the write-only mode must not import
_DIALS_PACKAGES = ("dials", "dxtbx", "cctbx", "libtbx", "scitbx", "iotbx", "rstbx", "xfel", "simtbx")
#: Jungfrau 16M: panels, slow and fast pixels per panel
JF16M = (256, 254, 254)


# -- the whole program -----------------------------------------------------------------------
def end_to_end(args: argparse.Namespace) -> dict:
    import torch

    os.environ.setdefault("DIALS_NOBANNER", "1")
    from spread_dials.command_line import simulate

    extra = list(args.extra)
    if args.phil.startswith("psii") and not any(a.startswith("structure.file=") for a in extra):
        model = REPO.parent / "shared" / "data" / "models" / "psii_oec.pdb"
        if not model.is_file():
            model = Path("/work/shared/data/models/psii_oec.pdb")
        extra.append(f"structure.file={model}")
    with tempfile.TemporaryDirectory(prefix="spread_bench_", dir=args.directory) as tmp:
        argv = [
            args.phil, f"nimages={args.nimages}", f"output.images_per_container={args.images_per_container}",
            f"device.name={args.device}", f"mp.nproc={args.nproc}", f"output.directory={tmp}",
            f"output.compression_workers={args.workers}", *extra,
        ]  # fmt: skip
        t0 = time.perf_counter()
        # the program's console output is not part of the result
        stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
        try:
            simulate.run(argv)
        finally:
            sys.stdout.close()
            sys.stdout = stdout
        total = time.perf_counter() - t0
        record = json.loads((Path(tmp) / "images_run.json").read_text())
    s = record["summary"]
    n = s["shots_simulated"]
    return {
        "benchmark": f"dials.spread_simulate {args.phil}",
        "shots_per_second": s["shots_per_second"],
        "seconds_per_image": 1.0 / s["shots_per_second"],
        "bytes_per_image": s["bytes_per_image"],
        "compression_ratio": s.get("compression_ratio"),
        "device": s["device"],
        "compression_workers": s.get("compression_workers"),
        "split_seconds_per_image": {
            "simulate": s.get("simulate_seconds", 0.0) / n,
            "compress_worker_cpu": s.get("compress_seconds", 0.0) / n,
            "write_hdf5": s.get("hdf5_write_seconds", 0.0) / n,
            "truth_files": s.get("truth_seconds", 0.0) / n,
            "main_thread_waiting_for_writer": s.get("wait_for_writer_seconds", 0.0) / n,
        },
        "nimages": args.nimages,
        "images_per_container": args.images_per_container,
        "torch_threads": args.nproc,
        "setup_and_startup_seconds": total - s["seconds"],
        "detector": record["detector"],
        "channels": len(record["channels_eV"]),
        "mosaic_domains": record["crystal"]["mosaic_domains"],
        "true_spots_per_image": s["true_spots"] / n,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
    }


# -- the write path alone --------------------------------------------------------------------
def synthetic_images(
    n: int, seed: int = 0, shape: tuple[int, int, int] = JF16M, background_photons: float = 0.5
) -> list:
    """``n`` int32 stills: a smooth background (a water ring) with per-pixel scatter, scaled to a
    mean of ``background_photons`` per pixel (0.5: ~70 % zeros, ~98 % of pixels 0-3), ~3000
    Gaussian Bragg spots (sigma 1 px, up to ~1e4 photons), Poisson."""
    import numpy as np

    rng = np.random.default_rng(seed)
    p, ns, nf = shape
    yy, xx = np.meshgrid(np.arange(ns), np.arange(nf), indexing="ij")
    images = []
    for _ in range(n):
        # each panel sits at some "radius": the background follows a ring profile
        radius = rng.uniform(0.0, 1.0, size=(p, 1, 1)) + (yy / ns * 0.05)[None]
        background = 0.1 + 1.4 * np.exp(-(((radius - 0.55) / 0.15) ** 2))
        background *= background_photons / background.mean()
        lam = (background * rng.gamma(4.0, 0.25, size=shape)).astype(np.float32)
        n_spots = 3000
        panel = rng.integers(0, p, n_spots)
        cy, cx = rng.uniform(3, ns - 3, n_spots), rng.uniform(3, nf - 3, n_spots)
        total = rng.lognormal(5.0, 1.5, n_spots).clip(max=2e5)
        for k, y0, x0, t in zip(panel, cy, cx, total):
            ys, xs = slice(int(y0) - 3, int(y0) + 4), slice(int(x0) - 3, int(x0) + 4)
            g = np.exp(-((yy[ys, xs] - y0) ** 2 + (xx[ys, xs] - x0) ** 2) / 2.0)
            lam[k, ys, xs] += (t * g / g.sum()).astype(np.float32)
        images.append(rng.poisson(lam).astype(np.int32))
        del lam
    return images


class PhysicsStills:
    """Stills of a ``benchmarks/forward.py`` case made as dials.spread_simulate makes a shot
    (``simulate_counts``: sparse kernel, background computed once and scaled, noise, int32 counts
    to the host, then the true-spot table): image i has a random orientation and 25 mosaic
    domains of psii.phil's 0.05 deg (rms) spread from seed i.  Structure factors are forward.py's Wilson draw over the same Miller indices,
    instead of the cctbx model the program computes in its (untimed, once per run) setup."""

    def __init__(self, case: str) -> None:
        import torch
        from forward import PHOTONS, build_scene, materials

        from spread_dials.physics.background import background_photons
        from spread_dials.physics.detector_response import calibration_gain_map
        from spread_dials.physics.still import DetectorResponse

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.scene = build_scene(case, self.device, torch.float32)
        panels = self.scene.panels
        with torch.no_grad():
            background = background_photons(panels, self.scene.sources.collapsed(), materials(), PHOTONS,
                                            compiled=self.device.type == "cuda")  # fmt: skip
        self.background_per_photon = background / PHOTONS
        self.photons = PHOTONS
        shape = (panels.n_panels, panels.n_slow, panels.n_fast)
        gain = calibration_gain_map(shape, 0.03, seed=7, device=self.device)
        self.response = DetectorResponse(calibration_gain=gain, readout_noise_adu=0.1)
        self.seconds: list[float] = []
        self.spot_seconds: list[float] = []

    def __call__(self, i: int):
        import dataclasses

        import numpy as np
        import torch

        from spread_dials.physics.crystal import mosaic_domain_rotations, real_space_from_cell
        from spread_dials.simulation.plan import uniform_rotation
        from spread_dials.simulation.shot import simulate_counts, true_spots

        t0 = time.perf_counter()
        crystal = self.scene.crystal
        cell = crystal.real_space.detach().double().cpu().norm(dim=-1)  # orthorhombic: a, b, c
        rotation = torch.as_tensor(uniform_rotation(np.random.default_rng(i)))
        real_space = real_space_from_cell(torch.cat([cell, torch.full((3,), 90.0, dtype=torch.float64)]), rotation)
        domains = mosaic_domain_rotations(0.05, crystal.n_domains, seed=1000 + i)  # psii.phil's spread
        crystal = dataclasses.replace(crystal, real_space=real_space, domain_rotations=domains)
        scene = dataclasses.replace(self.scene, crystal=crystal.to(device=self.device, dtype=torch.float32))
        still = simulate_counts(scene, 1e-6, self.background_per_photon, self.photons, self.response, noise_seed=i)
        t1 = time.perf_counter()
        true_spots(still.windows, still.sums, scene.panels.n_fast, scene.panels.n_slow)
        self.seconds.append(time.perf_counter() - t0)
        self.spot_seconds.append(time.perf_counter() - t1)
        return still.counts


def _no_dials_loaded() -> list[str]:
    return sorted(m for m in sys.modules if m.split(".")[0] in _DIALS_PACKAGES)


def _write_run(produce, layout, n_images: int, per: int, workers, kind: str, level: int, directory: Path,
               encoder: str) -> dict:  # fmt: skip
    """Write ``n_images`` images of detector ``layout``, image i made by ``produce(i)`` in the main
    thread, as the program does; return the timings."""
    from spread_dials.io.compression import ChunkCompressor
    from spread_dials.io.nxmx import NXmxWriter
    from spread_dials.io.write_queue import WriteQueue

    h5py_path = workers == "h5py"
    n_workers = 0 if h5py_path else int(workers)
    compressor = ChunkCompressor(n_workers, "gzip", level, kind=kind, encoder=encoder)
    queue = WriteQueue(threaded=n_workers > 0)
    writers = []
    stored = raw = 0
    compress_s = write_s = produce_s = 0.0
    t0 = time.perf_counter()
    try:
        for c, start in enumerate(range(0, n_images, per)):
            count = min(per, n_images - start)
            writer = NXmxWriter(directory / f"bench_{c:05d}.h5", layout, count, compressor=compressor,
                                compression_level=level, direct_chunk_write=not h5py_path)  # fmt: skip
            writers.append(writer)
            queue.call(writer.__enter__)
            for slot in range(count):
                tp = time.perf_counter()
                image = produce(start + slot)
                produce_s += time.perf_counter() - tp
                queue.throttle(3)
                queue.call(writer.store, writer.prepare_image(slot, image, 1.89), image=True)
            queue.call(writer.__exit__, None, None, None)
        queue.drain()
    finally:
        queue.close()
        compressor.close()
    wall = time.perf_counter() - t0
    for writer in writers:
        raw += writer.raw_bytes
        compress_s += writer.compress_seconds
        write_s += writer.write_seconds
    stored = sum(p.stat().st_size for p in directory.glob("bench_*.h5"))
    for p in directory.glob("bench_*.h5"):
        p.unlink()
    return {
        "path": "h5py filter pipeline, main thread" if h5py_path else f"ChunkCompressor ({encoder}) + write_direct_chunk",
        "pool": None if h5py_path or n_workers == 0 else kind,
        "workers": 0 if h5py_path else n_workers,
        "images_per_second": n_images / wall,
        "seconds_per_image": wall / n_images,
        "input_MB_per_second": raw / 1e6 / wall,
        "bytes_per_image": stored / n_images,
        "compression_ratio": raw / stored,
        "compress_worker_cpu_seconds_per_image": compress_s / n_images if not h5py_path else None,
        "write_hdf5_seconds_per_image": write_s / n_images,
        "main_thread_wait_seconds_per_image": queue.wait_seconds / n_images,
        "produce_seconds_per_image": produce_s / n_images,
        "wall_seconds": wall,
    }


def _compress_only(produce, n_images: int, workers: int, kind: str, level: int, directory: Path,
                   encoder: str) -> dict:  # fmt: skip
    """Without h5py: compress the chunks in the pool and append them to a plain file."""
    from spread_dials.io.compression import ChunkCompressor

    t0 = time.perf_counter()
    raw = stored = 0
    with ChunkCompressor(workers, "gzip", level, kind=kind, encoder=encoder) as compressor, \
            open(directory / "chunks.bin", "wb") as f:  # fmt: skip
        for i in range(n_images):
            for future in compressor.submit_image(produce(i)):
                for chunk in future.result():
                    f.write(chunk.data)
                    raw, stored = raw + chunk.nbytes, stored + len(chunk.data)
        f.flush()
        os.fsync(f.fileno())
    wall = time.perf_counter() - t0
    (directory / "chunks.bin").unlink()
    return {"path": f"ChunkCompressor ({encoder}), plain file (no h5py)", "pool": kind if workers else None, "workers": workers,
            "images_per_second": n_images / wall, "input_MB_per_second": raw / 1e6 / wall,
            "bytes_per_image": stored / n_images, "compression_ratio": raw / stored, "wall_seconds": wall}  # fmt: skip


def write_only(args: argparse.Namespace) -> list[dict]:
    import numpy as np

    try:
        import h5py
    except ImportError:
        h5py = None
    t = time.perf_counter()
    if args.physics:
        from forward import case_layout

        layout = case_layout(args.physics)
        produce = PhysicsStills(args.physics)
        images = [produce(0), produce(1)][:1]  # compile the kernels; a sample for the statistics below
        produce.seconds.clear()
        produce.spot_seconds.clear()
    else:
        from spread_dials.detectors.jungfrau import jungfrau16m_layout

        layout = jungfrau16m_layout()
        images = synthetic_images(args.distinct, seed=1, background_photons=args.background_photons)

        def produce(i: int):
            if args.produce_seconds > 0:
                time.sleep(args.produce_seconds)
            return images[i % len(images)]

    generate = time.perf_counter() - t
    counts = np.concatenate([np.bincount(np.clip(im.ravel(), 0, 4), minlength=5) for im in images[:1]])
    fractions = (counts / counts.sum()).round(4).tolist()
    workers = [w.strip() for w in args.workers.split(",")] if args.workers != "Auto" else ["Auto"]
    if args.h5py_baseline and "h5py" not in workers:
        workers = ["h5py", *workers]
    kinds = [k.strip() for k in args.pool.split(",")]
    common = {
        "benchmark": (f"spread_dials shot pipeline: {args.physics} stills simulated on {produce.device_name}, "
                      "written as the program writes them") if args.physics
        else "spread_dials write path, synthetic Jungfrau 16M",
        "pixels_per_image": int(images[0].size),
        "MB_per_image": images[0].nbytes / 1e6,
        "fraction_of_pixels_0_1_2_3_4plus": fractions,
        "mean_count": float(images[0].mean()),
        "distinct_images": args.distinct,
        "generate_seconds": generate,
        "nimages": args.nimages,
        "images_per_container": args.images_per_container,
        "gzip_level": args.level,
        "deflate_encoder": args.encoder,
        "cpu_cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "h5py": None if h5py is None else f"{h5py.__version__} (HDF5 {h5py.version.hdf5_version})",
    }
    results = []
    with tempfile.TemporaryDirectory(prefix="spread_write_bench_", dir=args.directory) as tmp:
        for w in workers:
            if w == "Auto":
                from spread_dials.io.compression import default_workers

                w = str(default_workers(encoder=args.encoder))
            for kind in kinds if w not in ("h5py", "0") else ["thread"]:
                if h5py is None:
                    if w == "h5py":
                        continue
                    row = _compress_only(produce, args.nimages, int(w), kind, args.level, Path(tmp), args.encoder)
                else:
                    row = _write_run(produce, layout, args.nimages, args.images_per_container, w, kind, args.level,
                                     Path(tmp), args.encoder)  # fmt: skip
                if args.physics:
                    row["simulate_seconds_per_image_median"] = float(np.median(produce.seconds))
                    row["true_spots_seconds_per_image_median"] = float(np.median(produce.spot_seconds))
                    produce.seconds.clear()
                    produce.spot_seconds.clear()
                row = {**common, **row, "dials_modules_imported": _no_dials_loaded()}
                print(json.dumps(row), flush=True)
                results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-only", action="store_true", help="benchmark the write path alone (no DIALS)")
    parser.add_argument("--phil", default="rubredoxin.phil", help="preset for the end-to-end run")
    parser.add_argument("--nimages", type=int, default=None, help="images (default 4 end to end, 8 write-only)")
    parser.add_argument("--images-per-container", type=int, default=None, help="(default 2 / 4)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--nproc", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument(
        "--workers",
        default="Auto",
        help="compression workers (end to end: one number or Auto; write-only: a comma list, e.g. 0,1,2)",
    )
    parser.add_argument("--pool", default="thread", help="write-only: worker kinds, thread and/or process")
    parser.add_argument("--level", type=int, default=1, help="write-only: gzip level")
    parser.add_argument("--encoder", default="isal", choices=("isal", "zlib"), help="write-only: deflate encoder")
    parser.add_argument("--distinct", type=int, default=2, help="write-only: distinct synthetic images, cycled")
    parser.add_argument(
        "--background-photons",
        type=float,
        default=0.5,
        help="write-only: mean background photons per pixel (0.5: mostly 0-3; the rubredoxin default gives ~6)",
    )
    parser.add_argument(
        "--produce-seconds",
        type=float,
        default=0.0,
        help="write-only: main-thread time per image before it is queued (models the GPU)",
    )
    parser.add_argument(
        "--physics",
        default=None,
        choices=("psii_jungfrau16m", "small_cpu"),
        help="write-only: make every image with the physics (a benchmarks/forward.py case, on the GPU when there is "
        "one) in the main thread, as the program does, instead of cycling synthetic images",
    )
    parser.add_argument(
        "--no-h5py-baseline",
        dest="h5py_baseline",
        action="store_false",
        help="write-only: leave out h5py's own filter pipeline",
    )
    parser.add_argument("--directory", default=None, help="where the temporary files go (default: the system's)")
    parser.add_argument("extra", nargs="*", help="more key=value parameters for dials.spread_simulate")
    args = parser.parse_args()
    if args.write_only:
        args.nimages = args.nimages or 8
        args.images_per_container = args.images_per_container or 4
        write_only(args)
        return
    args.nimages = args.nimages or 4
    args.images_per_container = args.images_per_container or 2
    print(json.dumps(end_to_end(args)))


if __name__ == "__main__":
    main()
