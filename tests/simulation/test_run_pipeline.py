"""The pipelined run loop: compression workers and a writer thread beside the simulation give the
same files as the serial loop, and a failure on either side leaves no partial container."""

from __future__ import annotations

import threading

import h5py
import numpy as np
import pytest

from spread_dials.command_line import simulate
from spread_dials.simulation import run as run_module

SMALL = ["detector.type=simple", "detector.simple.n_fast=96", "detector.simple.n_slow=80", "detector.distance_mm=40",
         "beam.nchannels=3", "crystal.mosaic_domains=2", "nimages=5", "output.images_per_container=2",
         "noise.readout_noise_adu=1", "random.seed=3"]  # fmt: skip


def _run(directory, *args):
    simulate.run([*SMALL, *args, f"output.directory={directory}"])


def _chunks(directory):
    """Every container's raw stored chunks and decoded pixels."""
    out = {}
    for path in sorted(directory.glob("images_[0-9]*.h5")):
        with h5py.File(path, "r") as h5:
            data = h5["/entry/data/data"]
            n, rows, _ = data.shape
            raw = [data.id.read_direct_chunk((i, r, 0)) for i in range(n) for r in range(0, rows, 80)]
            out[path.name] = (data[()], raw, h5["/entry/spread/A_matrix"][()])
    return out


def test_workers_give_the_serial_files(tmp_path):
    """compression_workers=0 (main thread) and =3 (threads + writer thread): identical chunks."""
    _run(tmp_path / "serial", "output.compression_workers=0")
    _run(tmp_path / "threads", "output.compression_workers=3")
    a, b = _chunks(tmp_path / "serial"), _chunks(tmp_path / "threads")
    assert list(a) == ["images_00000.h5", "images_00001.h5", "images_00002.h5"] == list(b)
    for name in a:
        assert np.array_equal(a[name][0], b[name][0]) and a[name][1] == b[name][1]
        assert np.array_equal(a[name][2], b[name][2])
    assert not list((tmp_path / "threads").glob(".*tmp*"))
    # another encoder and level (the default is isal, level 1): other bytes, the same pixels
    _run(tmp_path / "zlib4", "output.compression_workers=2", "output.compression_level=4", "output.deflate=zlib")
    c = _chunks(tmp_path / "zlib4")
    assert all(np.array_equal(a[k][0], c[k][0]) and a[k][1] != c[k][1] for k in a)


def test_writer_failure_stops_the_run_and_leaves_no_partial_container(tmp_path, monkeypatch):
    """A failure in the writer thread (here: writing container 1's truth) ends the run with that
    error; container 0 is complete, nothing of container 1 or 2 is left at a final name."""
    original = run_module.write_container_truth

    def failing(h5_path, *args):
        if h5_path.name == "images_00001.h5":
            assert threading.current_thread() is not threading.main_thread()
            raise OSError("disk full (test)")
        return original(h5_path, *args)

    monkeypatch.setattr(run_module, "write_container_truth", failing)
    with pytest.raises(OSError, match="disk full"):
        _run(tmp_path, "output.compression_workers=2")
    assert (tmp_path / "images_00000.refl").is_file()
    assert not (tmp_path / "images_00001.refl").exists() and not (tmp_path / "images_00002.h5").exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_simulation_failure_removes_the_open_container(tmp_path, monkeypatch):
    from spread_dials.simulation import shot as shot_module

    original = shot_module.simulate_shot

    def failing(setup, plan):
        if plan.index == 3:
            raise RuntimeError("simulation failed (test)")
        return original(setup, plan)

    monkeypatch.setattr(shot_module, "simulate_shot", failing)
    with pytest.raises(RuntimeError, match="simulation failed"):
        _run(tmp_path, "output.compression_workers=2")
    # container 0 was complete when shot 3 failed: it is finished; container 1 leaves nothing
    assert all((tmp_path / f"images_00000{s}").is_file() for s in (".h5", ".expt", ".refl"))
    assert not (tmp_path / "images_00001.h5").exists() and not list(tmp_path.glob(".*tmp*"))
    # the rerun resumes after the finished container 0 and ends like an uninterrupted run
    monkeypatch.setattr(shot_module, "simulate_shot", original)
    _run(tmp_path, "output.compression_workers=1")
    _run(tmp_path / "reference", "output.compression_workers=0")
    a, b = _chunks(tmp_path), _chunks(tmp_path / "reference")
    assert a.keys() == b.keys() and all(np.array_equal(a[k][0], b[k][0]) for k in a)
