"""The dials.spread_simulate run: check the output directory, simulate this rank's containers,
write each one atomically with its truth, resume finished work, report progress and a summary.

Files of a run (``P`` = output.prefix, ``NNNNN`` = container number):

* ``P_run.json``: parameters (and their fingerprint), structure-factor source, f'/f'' per site
  and channel; rewritten with a summary when the run is complete.
* ``P_NNNNN.h5`` (images), then ``P_NNNNN.expt`` and ``P_NNNNN.refl`` (truth): each written
  to a temporary name and renamed.  A container counts as finished when all three exist
  (the .refl is written last), so a killed run redoes at most the containers it was writing.
* ``P.expt`` / ``P.refl``: every container's truth together, written at the end by rank 0.

Containers are striped over MPI ranks (rank r takes containers r, r + n, ...); every shot's
random numbers depend on (random.seed, shot) only, so the images do not depend on the ranks.

Writing is pipelined: while the main thread simulates shot i + 1 (on the GPU), a pool of
``output.compression_workers`` threads compresses shot i's chunks and one writer thread stores
them (``write_direct_chunk``), closes and renames each finished container and writes its truth.
At most :data:`QUEUE_IMAGES` images wait for the writer (memory stays bounded: a Jungfrau 16M
image is 66 MB); the files are the same as with ``output.compression_workers=0``, where the main
thread does everything in turn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import spread_dials
from spread_dials.io.compression import ChunkCompressor, default_workers
from spread_dials.io.nxmx import NXmxWriter, hdf5_errno
from spread_dials.io.write_queue import WriteQueue
from spread_dials.simulation.plan import container_shots, n_containers
from spread_dials.simulation.truth import (
    container_truth_arrays,
    merge_truth,
    wavelength_A,
    write_container_truth,
)
from spread_dials.util.atomic import write_text_atomic
from spread_dials.util.errors import SpreadError
from spread_dials.util.program import write_error

__all__ = ["RunFiles", "parameter_values", "fingerprint", "photon_summary", "run_simulation"]

logger = logging.getLogger("dials.spread.simulate")

#: parameters that do not change the images: left out of the fingerprint
_NOT_IN_FINGERPRINT = ("mp.", "output.overwrite", "output.log", "output.directory", "output.compression_workers")
#: images simulated but not yet written that the main thread may run ahead of the writer
QUEUE_IMAGES = 3


@dataclass(frozen=True)
class RunFiles:
    """File names of a run in ``directory`` with ``prefix``."""

    directory: Path
    prefix: str

    def container(self, c: int, suffix: str) -> Path:
        return self.directory / f"{self.prefix}_{c:05d}{suffix}"

    @property
    def run_json(self) -> Path:
        return self.directory / f"{self.prefix}_run.json"

    @property
    def expt(self) -> Path:
        return self.directory / f"{self.prefix}.expt"

    @property
    def refl(self) -> Path:
        return self.directory / f"{self.prefix}.refl"

    def finished(self, c: int) -> bool:
        return all(self.container(c, s).is_file() for s in (".h5", ".expt", ".refl"))

    def existing(self) -> list[Path]:
        """Every file of this prefix in the directory (containers, truth, temporaries)."""
        patterns = (f"{self.prefix}_[0-9]*.h5", f"{self.prefix}_[0-9]*.expt", f"{self.prefix}_[0-9]*.refl",
                    f".{self.prefix}_*.tmp*", f".{self.prefix}.tmp*", f"{self.prefix}.expt", f"{self.prefix}.refl",
                    f"{self.prefix}_run.json")  # fmt: skip
        found = {p for pattern in patterns for p in self.directory.glob(pattern)}
        return sorted(found)

    def temporaries(self) -> list[Path]:
        return sorted(self.directory.glob(f".{self.prefix}_*.tmp*")) + sorted(self.directory.glob(f".{self.prefix}.tmp*"))


def container_damage(files: RunFiles, c: int, n_images: int) -> str | None:
    """Why finished container c cannot be trusted (None if it can): its HDF5 file must open with
    every image's chunks and the truth arrays stored, and its .expt and .refl must load with one
    experiment per image (a truncated or overwritten file fails here)."""
    import h5py

    path = files.container(c, ".h5")
    try:
        with h5py.File(path, "r") as h5:
            data = h5["/entry/data/data"]
            n_panels = len([k for k in h5["/entry/instrument/detector"] if k.startswith("panel")])
            if data.shape[0] != n_images or data.id.get_num_chunks() != n_images * n_panels:
                return f"{path.name} holds {data.id.get_num_chunks()} of {n_images * n_panels} image chunks"
            if h5["/entry/spread/shot_index"].shape != (n_images,):
                return f"{path.name} lacks the truth of its shots"
    except (OSError, KeyError, ValueError) as e:
        return f"{path.name} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    expt, refl = files.container(c, ".expt"), files.container(c, ".refl")
    try:
        n_expt = len(ExperimentListFactory.from_json_file(str(expt), check_format=False))
        flex.reflection_table.from_file(str(refl))
    except Exception as e:  # noqa: BLE001  dxtbx and msgpack raise many kinds for a damaged file
        return f"its truth {expt.name} / {refl.name} cannot be read ({type(e).__name__})"
    if n_expt != n_images:
        return f"{expt.name} holds {n_expt} experiments for {n_images} images"
    return None


def parameter_values(phil, params) -> dict[str, str]:
    """Every parameter as ``path -> value text``, e.g. ``{"beam.nchannels": "40", ...}``."""
    working = phil.format(python_object=params)
    values = {}
    for definition in working.all_definitions():
        values[definition.path] = " ".join(w.value for w in definition.object.words) if definition.object.words else ""
    return values


def fingerprint(values: dict[str, str]) -> str:
    """sha256 of the parameters that change the images."""
    kept = sorted(f"{k}={v}" for k, v in values.items() if not k.startswith(_NOT_IN_FINGERPRINT))
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()


def _check_output(files: RunFiles, values: dict[str, str], overwrite: bool) -> str | None:
    """On rank 0: refuse a directory holding another run (unless overwrite).

    Returns an error message or None.
    """
    present = files.existing()
    if not present or overwrite:
        return None
    mine = fingerprint(values)
    previous = None
    if files.run_json.is_file():
        try:
            previous = json.loads(files.run_json.read_text())
        except (OSError, ValueError):
            previous = None
    if previous is None or previous.get("fingerprint") != mine:
        changed = []
        if previous is not None:
            old = previous.get("parameters", {})
            changed = sorted(k for k in set(old) | set(values)
                             if not k.startswith(_NOT_IN_FINGERPRINT) and old.get(k) != values.get(k))  # fmt: skip
        what = f" (changed: {', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''})" if changed else ""
        return (
            f"{files.directory} already holds a run with prefix {files.prefix!r} made with other parameters{what}; "
            "rerun with the same parameters to resume, set output.overwrite=True to replace it, "
            "or choose another output.directory or output.prefix"
        )
    return None


def _clear_output(files: RunFiles, overwrite: bool) -> None:
    """On rank 0, once every input is checked: remove the previous run (overwrite) or the
    temporary files a killed run left."""
    if overwrite:
        present = files.existing()
        for path in present:
            path.unlink(missing_ok=True)
        if present:
            logger.info("output.overwrite=True: removed %d files of the previous run in %s", len(present),
                        files.directory)  # fmt: skip
        return
    for path in files.temporaries():
        path.unlink(missing_ok=True)


def _site_truth(setup) -> list[dict[str, Any]]:
    sites = []
    for s, site in enumerate(setup.structure.sites):
        sites.append({
            "label": site.label,
            "element": site.element,
            "atoms": list(site.atom_labels),
            "oxidation_state": setup.site_states[s] if s < len(setup.site_states) else None,
            "f_prime": setup.f_prime[s].tolist(),
            "f_double_prime": setup.f_double_prime[s].tolist(),
        })  # fmt: skip
    return sites


def _run_record(ctx, phil, values: dict[str, str], setup, summary: dict | None) -> dict[str, Any]:
    from dials.util.version import dials_version

    params = ctx.params
    return {
        "program": "dials.spread_simulate",
        "spread_dials_version": spread_dials.__version__,
        "dials_version": dials_version(),
        "fingerprint": fingerprint(values),
        "status": "complete" if summary else "running",
        "nimages": params.nimages,
        "images_per_container": params.output.images_per_container,
        "n_containers": n_containers(params.nimages, params.output.images_per_container),
        "seed": params.random.seed,
        "detector": setup.detector_description,
        "structure_factor_source": setup.structure_source,
        "channels_eV": setup.channels_eV.tolist(),
        "sites": _site_truth(setup),
        "crystal": {
            "unit_cell": list(setup.unit_cell),
            "space_group": setup.space_group,
            "domain_size_A": params.crystal.domain_size_A,
            "length_um": params.crystal.length_um,
            "ncells_abc": list(setup.brightness.ncells_abc),
            "ncells_abc_source": setup.brightness.ncells_source,
            "spot_scale": setup.brightness.spot_scale,
            "spot_scale_source": setup.brightness.spot_scale_source,
            "unit_cells_in_beam": setup.brightness.cells_in_beam,
            "mosaic_spread_deg": params.crystal.mosaic_spread_deg,
            "mosaic_domains": params.crystal.mosaic_domains,
            "shape": params.crystal.shape,
        },
        "fluence_photons_per_m2": setup.fluence_photons_per_m2,
        "parameters": values,
        "phil": phil.format(python_object=params).as_str(attributes_level=0),
        "summary": summary,
    }


def _format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class _WriteStats:
    """What writing took (filled by the writer thread, read after the queue is drained)."""

    bytes: int = 0
    raw_bytes: int = 0
    compress_seconds: float = 0.0
    write_seconds: float = 0.0
    truth_seconds: float = 0.0


def _open_container(files: RunFiles, setup, c: int, n_images: int, compressor: ChunkCompressor) -> NXmxWriter:
    """The writer of container c (not yet open)."""
    params = setup.params
    return NXmxWriter(
        files.container(c, ".h5"), setup.layout, n_images, n_channels=setup.n_channels,
        compression=params.output.compression, compression_level=params.output.compression_level,
        attributes={"program": "dials.spread_simulate", "spread_dials_version": spread_dials.__version__,
                    "random_seed": params.random.seed, "container": c},
        compressor=compressor,
    )  # fmt: skip


def _enter(writer: NXmxWriter, stats: _WriteStats) -> None:
    t0 = time.perf_counter()
    writer.__enter__()
    stats.write_seconds += time.perf_counter() - t0


def _finish_container(files: RunFiles, setup, c: int, writer: NXmxWriter, results: list, stats: _WriteStats) -> None:
    """Per-shot truth arrays into container c, close and rename it, then write its .expt and .refl."""
    params = setup.params
    t0 = time.perf_counter()
    for name, (values, units, description) in container_truth_arrays(results).items():
        writer.write_array(name, values, units=units or None, description=description)
    writer.__exit__(None, None, None)  # renames the complete container into place
    path = files.container(c, ".h5")
    t1 = time.perf_counter()
    write_container_truth(
        path, files.container(c, ".expt"), files.container(c, ".refl"), results, params.random.seed,
        setup.space_group, setup.unit_cell, params.beam.polarization_fraction,
    )  # fmt: skip
    t2 = time.perf_counter()
    size = path.stat().st_size
    stats.bytes += size
    stats.raw_bytes += writer.raw_bytes
    stats.compress_seconds += writer.compress_seconds
    stats.write_seconds += writer.write_seconds + (t1 - t0)
    stats.truth_seconds += t2 - t1
    logger.info(
        "Wrote %s (%d images, %.3g MB, compression ratio %.1f; compress %.2f s in workers, write %.2f s) and its "
        "truth (%.2f s)", path, len(results), size / 1e6, writer.raw_bytes / max(size, 1), writer.compress_seconds,
        writer.write_seconds + (t1 - t0), t2 - t1,
    )  # fmt: skip


def _require_space(files: RunFiles, setup, c: int, n_images: int) -> None:
    """Refuse to start container c without room for it and the images still queued, uncompressed
    (the most they can take): HDF5 cannot recover from a write that fails for want of space."""
    import shutil

    panels = setup.panels
    image_bytes = panels.n_panels * panels.n_slow * panels.n_fast * 4  # int32 pixels
    need = int(1.01 * (n_images + QUEUE_IMAGES) * image_bytes) + (64 << 10) + panels.n_panels * (4 << 10)
    free = shutil.disk_usage(files.directory).free
    if free < need:
        raise SpreadError(
            f"not enough space in {files.directory} for {files.container(c, '.h5').name}: it may take up to "
            f"{need / 1e6:.3g} MB and {free / 1e6:.3g} MB are free; the containers already finished are kept, "
            "and a rerun with the same parameters resumes once there is room"
        )


def compression_workers(params) -> int:
    """``output.compression_workers``, with Auto (None) resolved to the cores left for compression."""
    workers = getattr(params.output, "compression_workers", None)
    if workers is None or not isinstance(workers, int):  # None or libtbx.Auto
        return default_workers(encoder=params.output.deflate)
    return int(workers)


def run_simulation(ctx, program_phil) -> dict[str, Any] | None:
    """Run the simulation described by ``ctx.params``; return the summary on rank 0."""
    from spread_dials.simulation.setup import build_setup, check_parameters, plan_shot
    from spread_dials.simulation.shot import simulate_shot

    params, mpi = ctx.params, ctx.mpi
    if not params.output.prefix or "/" in params.output.prefix:
        raise SpreadError(f"output.prefix must be a plain file name prefix, not {params.output.prefix!r}")
    check_parameters(params)
    files = RunFiles(ctx.output_dir, params.output.prefix)
    values = parameter_values(program_phil, params)
    error = _check_output(files, values, params.output.overwrite) if mpi.is_root else None
    error = mpi.bcast(error)
    if error:
        raise SpreadError(error)

    t_setup = time.perf_counter()
    setup = build_setup(params, ctx.device, ctx.dtype)
    logger.info(
        "Detector: %s; %d channels %.1f-%.1f eV (%s); %d reflections to %.2f A; %d anomalous sites; setup %.1f s",
        setup.detector_description, setup.n_channels, setup.channels_eV.min(), setup.channels_eV.max(),
        params.beam.spectrum, setup.structure.miller_index.shape[0], setup.structure.d_min,
        len(setup.structure.sites), time.perf_counter() - t_setup,
    )  # fmt: skip
    ctx.accept_inputs()  # from here a failure leaves this run's log and finished containers
    if mpi.is_root:
        _clear_output(files, params.output.overwrite)
        write_text_atomic(files.run_json, json.dumps(_run_record(ctx, program_phil, values, setup, None), indent=1))
    mpi.barrier()

    per = params.output.images_per_container
    n_total = n_containers(params.nimages, per)
    mine = mpi.stripe(range(n_total))
    todo = [c for c in mine if not files.finished(c)]
    for c in mine:
        damage = None if c in todo else container_damage(files, c, len(container_shots(c, params.nimages, per)))
        if damage:  # finished-looking, but not whole: simulate it again
            logger.warning("Container %d looks finished but %s: simulating it again", c, damage)
            for suffix in (".refl", ".expt", ".h5"):
                files.container(c, suffix).unlink(missing_ok=True)
            todo.append(c)
    todo.sort()
    skipped = [c for c in mine if c not in todo]
    skipped_shots = sum(len(container_shots(c, params.nimages, per)) for c in skipped)
    if skipped:
        logger.info("Resuming: %d of %d containers (%d shots) are already finished", len(skipped), n_total, skipped_shots)
    n_todo = sum(len(container_shots(c, params.nimages, per)) for c in todo)
    logger.info("Simulating %d shots in %d containers%s", n_todo, len(todo),
                f" (this rank's share; {mpi.size} ranks)" if mpi.size > 1 else "")  # fmt: skip

    workers = compression_workers(params)
    logger.info("Compression: %s level %d (%s), %d worker thread(s)%s", params.output.compression,
                params.output.compression_level, params.output.deflate, workers,
                ", writing in a thread beside the simulation" if workers > 0 else ", in the main thread")  # fmt: skip
    if ctx.device.type == "cuda" and todo:
        logger.info("The first shot compiles the GPU kernels (torch.compile, once per process: tens of seconds; "
                    "the second recompiles them for sizes that vary between stills)")  # fmt: skip
    t0 = time.perf_counter()
    done = 0
    simulate_seconds = 0.0
    stats = {"windows": 0, "spots": 0}
    photons = {"bragg": [], "background": [], "peak": []}  # per shot, for the summary
    written = _WriteStats()
    compressor = ChunkCompressor(workers, params.output.compression, params.output.compression_level,
                                 encoder=params.output.deflate)  # fmt: skip
    queue = WriteQueue(threaded=workers > 0)
    writers: list[NXmxWriter] = []
    try:
        for c in todo:
            shots = container_shots(c, params.nimages, per)
            _require_space(files, setup, c, len(shots))
            writer = _open_container(files, setup, c, len(shots), compressor)
            writers.append(writer)  # small objects: the pixels are not kept
            queue.call(_enter, writer, written)
            results = []
            for slot, shot in enumerate(shots):
                result = simulate_shot(setup, plan_shot(setup, shot))
                simulate_seconds += result.seconds
                queue.throttle(QUEUE_IMAGES)
                plan = result.plan
                # the container carries what the instruments record (model errors included)
                recorded_mean = plan.mean_energy_eV + plan.recorded_offset_eV
                prepared = writer.prepare_image(slot, result.counts, wavelength_A(recorded_mean),
                                                (plan.recorded_energies_eV, plan.weights))  # fmt: skip
                queue.call(writer.store, prepared, image=True)
                results.append(dataclasses.replace(result, counts=None))  # the truth needs no pixels
                del result, prepared
                done += 1
                last = results[-1]
                stats["windows"] += last.n_windows
                stats["spots"] += len(last.spots["intensity"])
                photons["bragg"].append(last.bragg_photons)
                photons["background"].append(last.background_photons)
                photons["peak"].append(last.peak_bragg_photons)
                elapsed = time.perf_counter() - t0
                rate = done / elapsed if elapsed > 0 else float("inf")
                logger.info(
                    "Shot %d (%d/%d): %d windows, %d spots, %.4g Bragg photons (peak pixel %.4g), %.4g background "
                    "photons, %.2f s | %.2f shots/s, ETA %s",
                    shot, done, n_todo, last.n_windows, len(last.spots["intensity"]), last.bragg_photons,
                    last.peak_bragg_photons, last.background_photons, last.seconds, rate,
                    _format_seconds((n_todo - done) / rate if rate > 0 else 0.0),
                )  # fmt: skip
            queue.call(_finish_container, files, setup, c, writer, results, written)
        queue.drain()
    except BaseException as error:
        try:  # containers already complete are still finished, so that a rerun skips them
            queue.drain()
        except Exception:
            logger.debug("writer failure after the run had failed", exc_info=True)
        finally:
            queue.close()  # the writer thread is idle from here on
            compressor.close(cancel=True)
            for writer in writers:  # remove the temporary files of containers not finished
                if writer.is_open:
                    with contextlib.suppress(Exception):  # the first failure is the one to report
                        writer.__exit__(type(error), error, error.__traceback__)
        number = hdf5_errno(error) if isinstance(error, (OSError, RuntimeError)) else None
        unwritable = write_error(OSError(number, os.strerror(number), getattr(error, "filename", None) or
                                         str(files.directory))) if number else None  # fmt: skip
        if unwritable is not None:
            raise SpreadError(f"{unwritable}; the containers already finished are kept, and a rerun with the "
                              "same parameters resumes") from None  # fmt: skip
        raise
    queue.close()
    compressor.close()
    seconds = time.perf_counter() - t0
    write_seconds = written.write_seconds + written.truth_seconds
    written_bytes = written.bytes

    per_rank = mpi.gather({"shots": done, "seconds": seconds, "write_seconds": write_seconds, "bytes": written_bytes,
                           "raw_bytes": written.raw_bytes, "simulate_seconds": simulate_seconds,
                           "compress_seconds": written.compress_seconds, "hdf5_seconds": written.write_seconds,
                           "truth_seconds": written.truth_seconds, "wait_seconds": queue.wait_seconds,
                           "photons": photons, **stats})  # fmt: skip
    mpi.barrier()
    if not mpi.is_root:
        return None
    shots = sum(r["shots"] for r in per_rank)
    total_bytes = sum(r["bytes"] for r in per_rank)
    wall = max(r["seconds"] for r in per_rank)
    pairs = [(files.container(c, ".expt"), files.container(c, ".refl")) for c in range(n_total)]
    missing = [p for pair in pairs for p in pair if not p.is_file()]
    if missing:
        raise SpreadError(f"{len(missing)} truth files are missing after the run, e.g. {missing[0]}")
    n_expt, n_refl = merge_truth(pairs, files.expt, files.refl)
    summary = {
        "shots_simulated": shots,
        "shots_skipped": params.nimages - shots,
        "containers": n_total,
        "ranks": mpi.size,
        "seconds": wall,
        "shots_per_second": shots / wall if wall > 0 else None,
        "write_seconds": max(r["write_seconds"] for r in per_rank),
        "simulate_seconds": max(r["simulate_seconds"] for r in per_rank),
        "compress_seconds": max(r["compress_seconds"] for r in per_rank),
        "hdf5_write_seconds": max(r["hdf5_seconds"] for r in per_rank),
        "truth_seconds": max(r["truth_seconds"] for r in per_rank),
        "wait_for_writer_seconds": max(r["wait_seconds"] for r in per_rank),
        "compression_workers": workers,
        "compression_ratio": (sum(r["raw_bytes"] for r in per_rank) / total_bytes) if total_bytes else None,
        "bytes_written": total_bytes,
        "bytes_per_image": total_bytes / shots if shots else None,
        "true_spots": sum(r["spots"] for r in per_rank),
        "photons_per_still": photon_summary([r["photons"] for r in per_rank]),
        "experiments": n_expt,
        "reflections": n_refl,
        "device": str(ctx.device),
    }
    write_text_atomic(files.run_json, json.dumps(_run_record(ctx, program_phil, values, setup, summary), indent=1))
    logger.info(
        "Done: %d shots simulated (%d already finished) in %.1f s on %d rank(s): %.2f shots/s, %.3g bytes per image",
        shots, params.nimages - shots, wall, mpi.size, summary["shots_per_second"] or 0.0,
        summary["bytes_per_image"] or 0.0,
    )  # fmt: skip
    per_still = summary["photons_per_still"]
    if per_still:
        logger.info(
            "Photons per still (expected, this run's %d simulated stills): Bragg mean %.4g (%.4g-%.4g), background "
            "mean %.4g; the strongest spot's peak pixel: median %.4g, max %.4g Bragg photons",
            per_still["stills"], per_still["bragg_mean"], per_still["bragg_min"], per_still["bragg_max"],
            per_still["background_mean"], per_still["peak_median"], per_still["peak_max"],
        )  # fmt: skip
    logger.info("Truth: %s (%d experiments), %s (%d true spots); run record %s", files.expt, n_expt, files.refl,
                n_refl, files.run_json)  # fmt: skip
    return summary


def photon_summary(per_rank: list[dict[str, list[float]]]) -> dict[str, float] | None:
    """Expected photons per still over the simulated stills of every rank: Bragg (mean, min,
    max), background (mean), and the strongest spot's peak pixel (median, max); None when no
    still was simulated (a resumed, finished run)."""
    bragg = np.concatenate([np.asarray(r["bragg"], dtype=np.float64) for r in per_rank])
    if bragg.size == 0:
        return None
    background = np.concatenate([np.asarray(r["background"], dtype=np.float64) for r in per_rank])
    peak = np.concatenate([np.asarray(r["peak"], dtype=np.float64) for r in per_rank])
    return {
        "stills": int(bragg.size),
        "bragg_mean": float(bragg.mean()),
        "bragg_min": float(bragg.min()),
        "bragg_max": float(bragg.max()),
        "background_mean": float(background.mean()),
        "peak_median": float(np.median(peak)),
        "peak_max": float(peak.max()),
    }
