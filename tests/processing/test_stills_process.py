"""The real dials.stills_process (through dials.spread_stills_process) on simulated stills,
checked against the simulation's ground truth: serial, 2 real MPI ranks, the stock Debian
command with the sequences indexer, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dials.array_family import flex
from dxtbx.model.experiment_list import ExperimentListFactory

from spread_dials.validation.compare import validate

from ..processed_stills import NIMAGES, command, run


def _integrated(directory: Path) -> list[Path]:
    return sorted(directory.glob("idx-*_integrated.refl"))


def _truth(simulated: Path):
    return simulated / "images.expt", simulated / "images.refl"


def _check_against_truth(simulated: Path, processed: Path, min_indexed: int = 3) -> dict:
    """Every integrated still: files, reflections, misorientation and reflections on true spots."""
    reports, lattices = validate(*_truth(simulated), processed)
    assert len(reports) == NIMAGES
    indexed = [r for r in reports if r.indexed]
    assert len(indexed) >= min_indexed, [(r.image, r.index) for r in reports if not r.indexed]
    for r in indexed:
        assert r.crystal_type == "MosaicCrystalSauter2014"  # the full stills indexer ran (not sequences)
        assert r.n_integrated >= 25, (r.image, r.index, r.n_integrated)
        assert r.misorientation_deg < 0.25, (r.image, r.index, r.misorientation_deg)
        assert r.cell_error_max_pct < 1.0
        # integrated with I/sigma >= 2: on a true spot with the right Miller index
        assert r.n_significant >= 15 and r.n_significant_matched >= 0.95 * r.n_significant
        assert r.intensity_rank_correlation > 0.9
    assert np.median([r.misorientation_deg for r in indexed]) < 0.08
    return {"reports": reports, "lattices": lattices}


def test_serial_indexes_and_integrates_against_truth(simulated, processed):
    """One integrated file pair per still (shoeboxes kept), lattices close to the true crystals."""
    files = _integrated(processed)
    assert len(files) >= 3, (processed / "stills_process.out").read_text()[-3000:]
    for refl in files:
        table = flex.reflection_table.from_file(str(refl))
        assert table.size() >= 25
        assert "shoebox" in table and "intensity.sum.value" in table
        sb = table["shoebox"][0]
        assert sb.data.as_numpy_array().shape[0] == 1 and sb.data.as_numpy_array().size > 9
        expt = ExperimentListFactory.from_json_file(str(refl.with_suffix(".expt")), check_format=False)
        assert len(expt) == 1 and str(expt[0].crystal.get_space_group().info()) == "P 21 21 21"
    assert len(list(processed.glob("idx-*_strong.refl"))) == NIMAGES
    _check_against_truth(simulated, processed)


def test_mpi_two_ranks(simulated, processed, tmp_path, mpirun):
    """mpirun -n 2 ... mp.method=mpi: both ranks process images; same stills indexed as serial,
    same orientations."""
    containers = sorted(str(p) for p in simulated.glob("images_0*.h5"))
    result = run([*mpirun, command("dials.spread_stills_process"), *containers, "rubredoxin_stills_process.phil",
                  "mp.method=mpi", "output.logging_dir=."], tmp_path)  # fmt: skip
    assert (tmp_path / "info_rank0000.out").is_file() and (tmp_path / "info_rank0001.out").is_file()
    for rank in (0, 1):  # each rank integrated its own stills
        assert "integrated" in (tmp_path / f"info_rank{rank:04d}.out").read_text()
    if not _has_extension():  # the note about the stand-in comes once per job, not per rank
        assert result.stdout.count("using an empty stand-in") == 1
    assert [p.name for p in _integrated(tmp_path)] == [p.name for p in _integrated(processed)]
    mpi = _check_against_truth(simulated, tmp_path)
    serial = validate(*_truth(simulated), processed)[0]
    for a, b in zip(mpi["reports"], serial):
        assert a.indexed == b.indexed
        if a.indexed:
            assert a.misorientation_deg == pytest.approx(b.misorientation_deg, abs=1e-3)


def _has_extension() -> bool:
    """Whether this cctbx has the compiled xfel_mono_sim_ext (checked in a fresh interpreter)."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('xfel_mono_sim_ext') is None)"
    return subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0


def test_stock_command_default_indexer_fails_silently_and_sequences_works(simulated, tmp_path):
    """Why the wrapper exists: Debian's stock dials.stills_process with the default stills indexer
    exits 0 and integrates nothing; the documented alternative indexer=sequences integrates."""
    if _has_extension():
        pytest.skip("this cctbx has the compiled xfel_mono_sim_ext")
    container = str(sorted(simulated.glob("images_0*.h5"))[0])
    stock = Path("/usr/bin/dials.stills_process")
    if not stock.is_file():
        pytest.skip("no Debian /usr/bin/dials.stills_process")
    default = tmp_path / "default"
    default.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    from spread_dials.command_line.simulate import shipped_phil_files

    phil = shipped_phil_files(["rubredoxin_stills_process.phil"])[0]
    result = subprocess.run([str(stock), container, phil], cwd=default, capture_output=True, text=True, timeout=300,
                            env=env)  # fmt: skip
    assert result.returncode == 0
    assert not _integrated(default)
    sequences = tmp_path / "sequences"
    sequences.mkdir()
    result = subprocess.run([str(stock), container, phil, "indexing.stills.indexer=sequences"], cwd=sequences,
                            capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0
    files = _integrated(sequences)
    assert files, result.stdout[-3000:]
    for refl in files:
        assert flex.reflection_table.from_file(str(refl)).size() >= 10


def test_stub_only_when_the_extension_is_missing(tmp_path):
    """The stand-in goes into sys.modules only when xfel_mono_sim_ext cannot be imported."""
    probe = ("import sys; from spread_dials.command_line.stills_process import install_mono_sim_stub as f; "
             "s = f(); m = sys.modules['xfel_mono_sim_ext']; print(s, getattr(m, '__file__', None))")  # fmt: skip
    (tmp_path / "xfel_mono_sim_ext.py").write_text("REAL = True\n")
    present = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(tmp_path)})  # fmt: skip
    assert present.returncode == 0, present.stderr
    assert present.stdout.split() == ["False", str(tmp_path / "xfel_mono_sim_ext.py")]
    if _has_extension():
        return
    empty = tmp_path / "empty"
    empty.mkdir()
    probe += "; import xfel.mono_simulation"  # what the stills indexer imports: works with the stand-in
    missing = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=empty)
    assert missing.returncode == 0, missing.stderr
    assert missing.stdout.split() == ["True", "None"]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no image files given"),
        (["missing.h5", "stills_process.phil"], "no such image file: missing.h5"),
        (["images_00000.h5", "nonexistent.phil"], "PHIL file not found: nonexistent.phil"),
        (["images_0*.h5", "stills_process.phil", "bogus.parameter=1"], "bogus.parameter"),
    ],
)
def test_bad_input_gives_one_line_sorry(simulated, tmp_path, args, message):
    args = [str(simulated / a) if a.startswith("images_") else a for a in args]
    result = run([command("dials.spread_stills_process"), *args], tmp_path, check=False)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines and "Traceback" not in result.stderr
    assert any(line.startswith("Sorry") and message in line for line in lines), result.stderr


def test_help_and_config(tmp_path):
    result = run([command("dials.spread_stills_process"), "-h"], tmp_path)
    assert "stills" in result.stdout
    result = run([command("dials.spread_stills_process"), "-c"], tmp_path)
    assert "sigma_b_cutoff" in result.stdout and "composite_output" in result.stdout


def test_shipped_phil_files_carry_the_seed_settings():
    """The PHIL files parse with stills_process's own scope and hold the settings they document."""
    from dials.command_line.stills_process import phil_scope
    from libtbx.phil import parse

    import spread_dials.phil

    shipped = Path(spread_dials.phil.__file__).parent
    cells = {"stills_process.phil": None, "rubredoxin_stills_process.phil": (34.123, 34.874, 43.683),
             "psii_stills_process.phil": (117.585, 223.068, 309.977)}  # fmt: skip
    for name, cell in cells.items():
        p = phil_scope.fetch(parse(file_name=str(shipped / name))).extract()
        d = p.spotfinder.threshold.dispersion
        assert p.spotfinder.threshold.algorithm == "dispersion"
        assert (d.gain, d.sigma_background, d.sigma_strong, d.global_threshold) == (1, 2, 2, 10)
        assert list(d.kernel_size) == [6, 6] and p.spotfinder.filter.min_spot_size == 3
        assert str(p.indexing.known_symmetry.space_group) == "P 21 21 21"
        assert p.integration.debug.output and not p.integration.debug.separate_files
        assert p.profile.gaussian_rs.centroid_definition == "com"
        assert p.profile.gaussian_rs.parameters.sigma_b_cutoff > 0.1
        assert p.output.composite_output is False and p.dispatch.pre_import
        if cell:
            assert p.indexing.known_symmetry.unit_cell.parameters()[:3] == pytest.approx(cell)
    psii = phil_scope.fetch(parse(file_name=str(shipped / "psii_stills_process.phil"))).extract()
    assert psii.spotfinder.filter.d_min == 3.4
