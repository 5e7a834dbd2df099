"""spread_dials.parallel: real MPI ranks under mpirun, and the serial fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spread_dials.parallel import Parallel, assign_gpu, mpi_context
from spread_dials.util.errors import SpreadError

PROBE = Path(__file__).with_name("parallel_probe.py")


def run_probe(tmp_path: Path, method: str, *extra: str, prefix: list[str] | None = None, env=None):
    cmd = [*(prefix or []), sys.executable, str(PROBE), method, str(tmp_path), *extra]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    return r, {int(p.stem[4:]): json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}


SERIAL = {
    "method": "serial",
    "rank": 0,
    "size": 1,
    "mine": ["a", "b", "c", "d", "e"],
    "gathered": [["a", "b", "c", "d", "e"]],
    "allgathered": [0],
    "bcast": {"from": 0},
    "count": 5,
    "max_rank": 0,
    "range_share": [0, 1, 2, 3, 4],
    "iter_share": [0, 1, 2, 3, 4],
}


@pytest.mark.mpi
def test_two_ranks_stripe_and_gather(tmp_path, mpirun):
    _, out = run_probe(tmp_path, "mpi", prefix=mpirun)
    assert sorted(out) == [0, 1]
    assert out[0]["method"] == out[1]["method"] == "mpi"
    assert out[0]["size"] == out[1]["size"] == 2
    assert out[0]["mine"] == ["a", "c", "e"] and out[1]["mine"] == ["b", "d"]
    assert out[0]["range_share"] == out[0]["iter_share"] == [0, 2, 4]
    assert out[1]["range_share"] == out[1]["iter_share"] == [1, 3]
    assert out[0]["gathered"] == [["a", "c", "e"], ["b", "d"]] and out[1]["gathered"] is None
    assert out[0]["allgathered"] == out[1]["allgathered"] == [0, 1]
    assert out[0]["bcast"] == out[1]["bcast"] == {"from": 0}
    assert out[0]["count"] == 5 and out[1]["count"] is None
    assert out[0]["max_rank"] == out[1]["max_rank"] == 1


@pytest.mark.mpi
def test_serial_method_under_mpirun_warns(tmp_path, mpirun):
    r, out = run_probe(tmp_path, "serial", prefix=mpirun)
    assert out == {0: SERIAL}  # both ranks did all the work and wrote the same file
    assert r.stderr.count("Started as 2 MPI ranks but mp.method=serial") == 2


def test_serial_method(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")}
    r, out = run_probe(tmp_path, "serial", env=env)
    assert out == {0: SERIAL}
    assert "dials.spread.parallel" not in r.stderr  # nothing to note


@pytest.mark.parametrize("blocked", ["mpi4py", "mpi4py.MPI"])
def test_mpi_requested_without_mpi4py_falls_back(tmp_path, blocked):
    r, out = run_probe(tmp_path, "mpi", f"block-{blocked}")
    assert out == {0: SERIAL}
    assert "mp.method=mpi but mpi4py.MPI cannot be imported" in r.stderr and "running serially" in r.stderr


def test_mpi_singleton_without_launcher(tmp_path):
    _, out = run_probe(tmp_path, "mpi")
    assert out == {0: {**SERIAL, "method": "mpi"}}


def test_serial_context_in_process():
    p = mpi_context("serial")
    assert isinstance(p, Parallel) and p.is_root and (p.rank, p.size) == (0, 1)
    assert p.stripe("xyz") == ["x", "y", "z"]
    assert p.reduce(2.5, op="max") == 2.5
    with pytest.raises(ValueError):
        p.reduce(1, op="mean")
    with pytest.raises(SpreadError, match="mp.method must be one of serial, mpi"):
        mpi_context("multiprocessing")


def test_assign_gpu_round_robin():
    assert [assign_gpu(r, n_devices=3) for r in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert assign_gpu(5, n_devices=1) == 0
    assert assign_gpu(0, n_devices=0) is None


@pytest.mark.gpu
def test_assign_gpu_sets_current_device():
    import torch

    n = torch.cuda.device_count()
    for rank in range(2 * n):
        assert assign_gpu(rank) == rank % n
        assert torch.cuda.current_device() == rank % n
