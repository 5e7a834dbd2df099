"""Shared test fixtures.  Must not import dials/dxtbx/cctbx: tests/physics also runs on the GPU
machine, which has torch but no DIALS (``make test-gpu``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import spread_dials  # noqa: F401  (first, whichever test module is collected first: it loads torch's OpenMP runtime before dxtbx loads the system's; spread_dials/__init__.py)
from tests.processed_stills import processed, simulated  # noqa: F401  (session fixtures: real DIALS runs)

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; $SPREAD_SHARED_DATA overrides; /work/shared/data is where
# this project's machines keep it when a clone lives elsewhere
_CANDIDATES = [Path(p) for p in (os.environ.get("SPREAD_SHARED_DATA"),) if p] + [
    REPO.parent / "shared" / "data",
    Path("/work/shared/data"),
]
SHARED_DATA = next((p for p in _CANDIDATES if (p / "MANIFEST.md").is_file()), _CANDIDATES[0])


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if not _cuda_available():
        skip_gpu = pytest.mark.skip(reason="needs torch with CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $SPREAD_SHARED_DATA): real geometry, models, f'/f'' curves, spectra."""
    if not (SHARED_DATA / "MANIFEST.md").is_file():
        pytest.fail(f"shared test data not found at {SHARED_DATA}; set SPREAD_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mpirun() -> list[str]:
    """The mpirun prefix for 2 real ranks (root- and oversubscribe-safe)."""
    exe = shutil.which("mpirun")
    if exe is None:
        pytest.fail("mpirun not found: install openmpi-bin (make install does)")
    return [exe, "--allow-run-as-root", "--oversubscribe", "-n", "2"]


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs file systems for a test: ``tmpfs(name, size="256k", read_only=False)``
    returns the mount point (a real full disk, or a directory even root cannot write).  Needs
    root (CI and `make test` run as root); unmounted after the test."""
    mounted = []

    def mount(name: str, size: str = "256k", read_only: bool = False) -> Path:
        point = tmp_path / name
        point.mkdir()
        options = f"size={size},mode=0755" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                                text=True, check=False)  # fmt: skip
        if result.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs (needs root): {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture
def read_only_dir(tmpfs) -> Path:
    """An existing directory that cannot be written, even by root (a read-only tmpfs)."""
    return tmpfs("read_only", read_only=True)
