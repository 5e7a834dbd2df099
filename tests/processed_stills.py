"""Simulated stills and their real dials.stills_process results, made once per test session.

tests/conftest.py imports the fixtures ``simulated`` and ``processed`` from here, so every test
directory (processing/, refine/) shares one run of each.  Nothing here imports dials: the
programs run in subprocesses, only when a test asks for the fixtures.

The stills: rubredoxin (the built-in model) with SASE pulses, noise and water background, on a
2 x 2 grid of 512 x 512 pixel panels (far quicker to simulate than the Jungfrau 16M, and
reaching 2.4 A), 4 shots in 2 containers; a crystal of 30^3-cell domains, 100 of them in the beam
(fixed here: the preset's derived 4 um crystal puts ~24x the photons into far smaller spots).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def command(name: str) -> str:
    """The console script ``name`` of this environment (the venv's bin first)."""
    exe = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert exe, f"{name} is not installed (pip install -e .)"
    return exe


SIMULATION = [
    "detector.type=simple", "detector.simple.n_fast=512", "detector.simple.n_slow=512", "detector.distance_mm=60",
    "crystal.ncells_abc=30,30,30", "crystal.spot_scale=100", "nimages=4", "output.images_per_container=2",
    "crystal.domain_set=quadrature", "random.seed=3", "mp.nproc=2",
]  # fmt: skip
NIMAGES = 4


def run(cmd: list[str], cwd: Path, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{cmd}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="session")
def simulated(tmp_path_factory) -> Path:
    """The simulation directory: images_00000.h5, images_00001.h5, images.expt/.refl (truth)."""
    directory = tmp_path_factory.mktemp("simulated")
    run([command("dials.spread_simulate"), "rubredoxin.phil", *SIMULATION, f"output.directory={directory}"], directory)
    return directory


@pytest.fixture(scope="session")
def processed(simulated, tmp_path_factory) -> Path:
    """dials.spread_stills_process (serial, one process) on the simulated containers."""
    directory = tmp_path_factory.mktemp("processed")
    containers = sorted(str(p) for p in simulated.glob("images_0*.h5"))
    result = run([command("dials.spread_stills_process"), *containers, "rubredoxin_stills_process.phil"], directory)
    (directory / "stills_process.out").write_text(result.stdout + result.stderr)
    return directory
