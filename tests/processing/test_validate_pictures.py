"""dials.spread_validate and dials.spread_pictures on real stills_process results (subprocesses)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dials.array_family import flex
from dxtbx.model.experiment_list import ExperimentListFactory

from ..processed_stills import NIMAGES, command, run

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path, min_bytes: int = 5000) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size >= min_bytes


def _sorry(result, message: str) -> None:
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Sorry: ") and message in lines[0], result.stderr


@pytest.fixture(scope="module")
def validation(simulated, processed, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("validation")
    run([command("dials.spread_validate"), f"truth={simulated / 'images.expt'}", f"processed={processed}",
         f"output.directory={directory}"], directory)  # fmt: skip
    return directory


def test_validate_report(simulated, processed, validation):
    """The JSON agrees with the files: one row per true still, indexed exactly where an integrated
    file exists, counts equal to the tables', and the misorientation of the best setting."""
    record = json.loads((validation / "validation.json").read_text())
    rows, summary = record["stills"], record["summary"]
    assert len(rows) == summary["stills"] == NIMAGES
    integrated = {}
    for expt_file in processed.glob("idx-*_integrated.expt"):
        expt = ExperimentListFactory.from_json_file(str(expt_file), check_format=False)[0]
        table = flex.reflection_table.from_file(str(expt_file.with_suffix(".refl")))
        integrated[(Path(expt.imageset.paths()[0]).name, expt.imageset.indices()[0])] = table.size()
    truth = ExperimentListFactory.from_json_file(str(simulated / "images.expt"), check_format=False)
    assert [(r["image"], r["index"]) for r in rows] == [
        (Path(e.imageset.paths()[0]).name, e.imageset.indices()[0]) for e in truth
    ]
    for row in rows:
        key = (row["image"], row["index"])
        assert row["indexed"] == (key in integrated)
        if row["indexed"]:
            assert row["n_integrated"] == integrated[key]
            assert 0 <= row["misorientation_deg"] < 0.3
            assert row["n_matched"] <= row["n_integrated"]
    assert summary["stills_indexed"] == len(integrated)
    assert summary["indexed_fraction"] == pytest.approx(len(integrated) / NIMAGES)
    assert summary["integrated_reflections"] == sum(integrated.values())
    angles = [r["misorientation_deg"] for r in rows if r["indexed"]]
    assert summary["misorientation_deg"]["median"] == pytest.approx(np.median(angles))
    assert summary["significant_matched_fraction"] > 0.95
    assert summary["intensity_rank_correlation"] > 0.9
    assert set(summary["targets"]["passed"]) == {"indexed_fraction", "median_misorientation"}
    log = (validation / "dials.spread_validate.log").read_text()
    assert "Stills indexed:" in log and "misor.deg" in log
    for name in ("validation_misorientation.png", "validation_intensities.png"):
        assert _is_png(validation / name), name


def test_validate_finds_the_truth_in_a_simulation_directory(simulated, processed, tmp_path):
    run([command("dials.spread_validate"), f"truth={simulated}", f"processed={processed}", "plots=False",
         "output.prefix=v"], tmp_path)  # fmt: skip
    assert json.loads((tmp_path / "v.json").read_text())["truth"] == str(simulated / "images.expt")
    assert not list(tmp_path.glob("*.png"))


@pytest.fixture(scope="module")
def other_simulation(tmp_path_factory) -> Path:
    """A different simulation (other prefix) to feed the wrong truth."""
    directory = tmp_path_factory.mktemp("other")
    run([command("dials.spread_simulate"), "detector.type=simple", "nimages=1", "output.prefix=other",
         f"output.directory={directory}"], directory)  # fmt: skip
    return directory


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give input.truth="),
        (["truth=SIM/nothing.expt", "processed=PROC"], "truth file not found"),
        (["truth=SIM/images_00000.h5", "processed=PROC"], "must be the simulation's <prefix>.expt"),
        (["truth=SIM", "processed=MISSING"], "processing directory not found"),
        (["truth=OTHER", "processed=PROC"], "processed images are not in the truth"),
        (["truth=SIM", "processed=PROC", "max_separation_px=-1"], "max_separation_px"),
        (["truth=SIM", "processed=EMPTY"], "holds no *_integrated.expt: nothing was indexed and integrated there"),
    ],
)
def test_validate_bad_input(simulated, processed, other_simulation, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    names = {"SIM": str(simulated), "PROC": str(processed), "OTHER": str(other_simulation),
             "MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty")}  # fmt: skip
    for key, value in names.items():
        args = [a.replace(key, value) for a in args]
    _sorry(run([command("dials.spread_validate"), *args], tmp_path, check=False), message)
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # no report, plot or log left behind


def test_pictures(simulated, processed, tmp_path):
    """Every picture of an indexed still, the shoeboxes drawn from the integrated table."""
    record = run([command("dials.spread_pictures"), f"truth={simulated / 'images.expt'}", f"processed={processed}",
                  "still=1", "shoeboxes=4", "canvas_px=400"], tmp_path)  # fmt: skip
    names = ["still_00001.png", "spectrum.png", "anomalous.png"]
    if list(processed.glob("idx-images_00000_00001_integrated.refl")):
        names += ["still_00001_spots.png", "still_00001_shoeboxes.png"]
    for name in names:
        assert _is_png(tmp_path / name), (name, record.stdout[-2000:])


def test_pictures_without_processing(simulated, tmp_path):
    run([command("dials.spread_pictures"), f"truth={simulated}", "canvas_px=300"], tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["anomalous.png", "spectrum.png", "still_00000.png"]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give input.truth="),
        (["truth=SIM", "still=99"], "still=99: the truth holds 4 stills"),
        (["truth=SIM", "processed=MISSING"], "processing directory not found"),
        (["truth=SIM/nothing.expt"], "truth file not found"),
    ],
)
def test_pictures_bad_input(simulated, tmp_path, args, message):
    args = [a.replace("SIM", str(simulated)).replace("MISSING", str(tmp_path / "missing")) for a in args]
    _sorry(run([command("dials.spread_pictures"), *args], tmp_path, check=False), message)
