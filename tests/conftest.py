"""Shared test fixtures.  Must not import dials/dxtbx/cctbx: tests/physics also runs on the GPU
machine, which has torch but no DIALS (``make test-gpu``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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
