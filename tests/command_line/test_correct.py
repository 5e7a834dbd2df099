"""dials.spread_correct run as a user runs it: on dials.spread_refine's output of real
dials.stills_process output (the shared 4-still fixture): every output written and readable,
the truth reported, resume from the checkpoint, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from dials.array_family import flex

from ..processed_stills import command, run
from .test_refine import FAST, _inputs

#: the refine run the correction starts from, and the correction's own settings (small: 2 epochs;
#: the fixture's 209 shoeboxes are below the default capacity guard of 50 per weight)
REFINE = [*FAST, "uncertainty.bootstrap=0", "refinement.refine_mosaic=True"]  # (each still's mosaic spreads: a per-shot latent end to end)
CORRECT = [*REFINE, "correct.epochs=2", "correct.warmup_epochs=1", "correct.posterior_draws=200",
           "correct.min_shoeboxes_per_weight=2", "correct.theta_tolerance_eV=0", "correct.phi_tolerance=0"]  # fmt: skip
#: (tolerances 0: every epoch runs, so the checkpoint test knows how many there are)


@pytest.fixture(scope="module")
def refined_for_correct(processed, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("refined_for_correct")
    run([command("dials.spread_refine"), *_inputs(processed), *REFINE], directory)
    return directory


def _warm(refined: Path) -> list[str]:
    return [str(refined / f"spread_refine.{ext}") for ext in ("expt", "refl", "h5")]


@pytest.fixture(scope="module")
def corrected(refined_for_correct, simulated, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("corrected")
    run([command("dials.spread_correct"), *_warm(refined_for_correct), *CORRECT, f"truth={simulated / 'images_run.json'}", "plots=True"],
        directory)  # fmt: skip
    return directory


def test_correct_writes_every_output(corrected, refined_for_correct):
    for name in ("spread_posterior.csv", "spread_posterior.h5", "spread_correct.json", "spread_correct.expt",
                 "spread_correct.refl", "spread_correct_edge_shifts.png", "spread_correct_loss.png",
                 "spread_correct_correction.png", "spread_correct_predictive.png", "spread_correct_residual_maps.png",
                 "spread_correct_fp_fdp.png", "spread_correct.checkpoint.pt",
                 "dials.spread_correct.log"):  # fmt: skip
        assert (corrected / name).is_file(), name
    record = json.loads((corrected / "spread_correct.json").read_text())
    assert len(record["history"]) == 2 and record["converged"] is False
    assert "Not converged after 2 epochs" in (corrected / "dials.spread_correct.log").read_text()
    # the posterior predictive check: one of the four stills held out, its residuals before and after
    check = record["posterior_predictive"]
    assert len(check["held_out_stills"]) == 1 and record["stills"] == 4
    for when in ("before", "after"):
        shells = check[when]["resolution_shells"]
        assert sum(g["pixels"] for g in shells) == sum(g["pixels"] for g in check[when]["panel_groups"]) > 0
        assert all(np.isfinite(g["sd"]) and g["sd"] > 0 for g in shells if g["sd"] is not None)
    assert "held-out z" in (corrected / "dials.spread_correct.log").read_text()
    # the fitted stills' residual maps: the three stills in the fit, every pixel in a panel's sums
    for when in ("before", "after"):
        maps = record["residual_maps"][when]
        assert sum(p["pixels"] for p in maps["panels"]) > sum(n for row in maps["frame"]["pixels"] for n in row) > 0
        assert all(p["sd"] > 0 for p in maps["panels"] if p["sd"] is not None)
    assert "Residual maps of the fitted stills" in (corrected / "dials.spread_correct.log").read_text()
    # these stills have no model error and the correction is near the identity after 2 epochs: the
    # physics at the warm start (each still's scale and backgrounds fitted, as dials.spread_refine had
    # them) fits every panel about as well as the corrected model (from initial_state's guesses the
    # demo's "before" had a panel mean z of 8.5 where the refinement's sigma_Z were 0.86-1.11)
    before, after = ({p["panel"]: p for p in record["residual_maps"][w]["panels"]} for w in ("before", "after"))
    for panel, b in before.items():
        if b["pixels"] >= 50:
            assert abs(b["mean"] - after[panel]["mean"]) < 0.5 and b["sd"] < 1.5 * after[panel]["sd"], (panel, b, after[panel])
    # the offset (calibration prior 1 eV) is a common edge shift: the absolute shift's interval
    # carries the calibration's uncertainty
    offset = record["spectrometer"]["offset"]
    assert offset["prior_sigma"] == 1.0 and 0.9 < offset["sigma"] <= 1.0
    assert record["sites"][0]["sigma_eV"] >= 0.9
    (site,) = record["sites"]
    warm = h5py.File(refined_for_correct / "spread_refine.h5", "r")
    assert site["physics_edge_shift_eV"] == pytest.approx(float(warm["theta"][0]))
    assert np.isfinite(site["edge_shift_eV"]) and site["sigma_eV"] > 0
    # the correction's weights profiled out can only widen the interval
    assert site["sigma_eV"] >= site["sigma_conditional_eV"] * (1 - 1e-9)
    # with the spectrometer's calibration held the interval is the data's: well inside the 1 eV prior
    assert site["sigma_given_calibration_eV"] < 0.5 * site["sigma_eV"]
    assert "truth_edge_shift_eV" in site and np.isfinite(site["error_in_sigma"])
    assert abs(sum(site["state_probability"].values()) - 1) < 1e-9
    rows = list(csv.DictReader((corrected / "spread_posterior.csv").open()))
    assert rows[0]["site"] == site["site"] and float(rows[0]["edge_shift_eV"]) == pytest.approx(site["edge_shift_eV"])
    with h5py.File(corrected / "spread_posterior.h5", "r") as h:
        assert h.attrs["program"] == "dials.spread_correct"
        draws = h["draws"][()]
        assert draws.shape == (200, 3)  # the edge shift, the spectrometer's offset and dispersion
        names = [n.decode() for n in h["parameter_names"][()]]
        assert names[1:] == ["spectrometer_offset_eV", "spectrometer_dispersion"]
        assert abs(draws[:, 0].mean() - site["edge_shift_eV"]) < 4 * site["sigma_eV"] / np.sqrt(200)
        q = h["f_double_prime_quantiles"][()]
        assert q.shape[0] == 5 and bool((np.diff(q, axis=0) >= -1e-12).all())  # quantile bands ordered
        assert h["correction_weights"].shape == (h["correction_weight_names"].shape[0],)
    table = flex.reflection_table.from_file(str(corrected / "spread_correct.refl"))
    assert "spread.bragg_photons_physics" in table and "spread.bragg_photons" in table
    # each still's mosaic spreads: fitted at the warm start (the .expt does not carry them), refined, written
    spreads = table["spread.mosaic_spread_abc_deg"].as_numpy_array()
    assert np.all(np.isfinite(spreads)) and np.all(spreads > 0) and np.ptp(spreads) > 0
    assert "Per-shot parameters fitted at the warm start" in (corrected / "dials.spread_correct.log").read_text()
    log = (corrected / "dials.spread_correct.log").read_text()
    assert "ETA" in log and "Inter-site differences are the headline" in log
    assert "correction.gain off" not in log  # min_shoeboxes_per_weight=2: every part on


def test_correct_resumes_from_its_checkpoint(corrected, refined_for_correct, tmp_path):
    """A rerun with one more epoch starts after the saved epochs (it does not redo them)."""
    for name in ("spread_correct.checkpoint.pt",):
        (tmp_path / name).write_bytes((corrected / name).read_bytes())
    args = [command("dials.spread_correct"), *_warm(refined_for_correct), *CORRECT, "correct.epochs=3"]
    run(args, tmp_path)
    log = (tmp_path / "dials.spread_correct.log").read_text()
    assert "Resuming after epoch 2" in log
    assert len(json.loads((tmp_path / "spread_correct.json").read_text())["history"]) == 3


def test_the_learned_pixel_noise_is_written_and_resumed(refined_for_correct, tmp_path):
    """With the Gaussian-readout likelihood and correct.noise_flow.enable: each epoch's history has
    the flow's fit, spread_posterior.h5 its precision table, a PNG shows it, the checkpoint its
    weights; a rerun with one more epoch takes the flow from the checkpoint."""
    flow = ["likelihood=gaussian_readout", "readout_sigma_photons=0.5", "correct.noise_flow.enable=True",
            "correct.noise_flow.steps=50", "correct.predictive.held_out_fraction=0"]  # fmt: skip
    run([command("dials.spread_correct"), *_warm(refined_for_correct), *CORRECT, *flow, "correct.epochs=1", "plots=True"],
        tmp_path)  # fmt: skip
    record = json.loads((tmp_path / "spread_correct.json").read_text())
    (epoch,) = record["history"]
    assert epoch["noise_flow"]["pixels"] > 1000 and 0 < epoch["noise_flow"]["precision"] < 10
    with h5py.File(tmp_path / "spread_posterior.h5", "r") as h:
        table = h["noise_flow_precision"][()]
        assert table.shape == (33,) and np.all(np.isfinite(table)) and np.all(table > 0)
        assert not np.allclose(table, 1.0)  # fitted: no longer the identity's
    assert (tmp_path / "spread_correct_noise_flow.png").is_file()
    assert "noise flow:" in (tmp_path / "dials.spread_correct.log").read_text()
    import torch

    saved = torch.load(tmp_path / "spread_correct.checkpoint.pt", weights_only=False)["noise_flow"]
    assert np.allclose(saved["precision_table"].numpy(), table)
    run([command("dials.spread_correct"), *_warm(refined_for_correct), *CORRECT, *flow, "correct.epochs=2"], tmp_path)
    log = (tmp_path / "dials.spread_correct.log").read_text()
    assert "Resuming after epoch 1" in log
    low, high = float(table.min()), float(table.max())
    assert f"Noise flow from the checkpoint: precision factor {low:.4f}-{high:.4f}" in log
    assert len(json.loads((tmp_path / "spread_correct.json").read_text())["history"]) == 2


@pytest.mark.mpi
def test_two_mpi_ranks_give_the_serial_result(refined_for_correct, mpirun, tmp_path):
    """mpirun -n 2 dials.spread_correct ... mp.method=mpi: every sum over stills runs in still
    order and the noise flow is fitted to the same sample on every rank, so the edge shift,
    its sigma and the learned noise are the serial ones."""
    serial, mpi = tmp_path / "serial", tmp_path / "mpi"
    serial.mkdir()
    mpi.mkdir()
    args = [command("dials.spread_correct"), *_warm(refined_for_correct), *CORRECT, "likelihood=gaussian_readout",
            "readout_sigma_photons=0.5", "correct.noise_flow.enable=True", "correct.noise_flow.steps=30"]  # fmt: skip
    run(args, serial)
    run([*mpirun, *args, "mp.method=mpi"], mpi)
    assert "MPI: rank 0 of 2" in (mpi / "dials.spread_correct.log").read_text()
    a, b = (json.loads((d / "spread_correct.json").read_text()) for d in (serial, mpi))
    assert b["sites"][0]["edge_shift_eV"] == pytest.approx(a["sites"][0]["edge_shift_eV"], rel=1e-9, abs=1e-9)
    assert b["sites"][0]["sigma_eV"] == pytest.approx(a["sites"][0]["sigma_eV"], rel=1e-7)
    assert [h["noise_flow"]["pixels"] for h in b["history"]] == [h["noise_flow"]["pixels"] for h in a["history"]]
    with h5py.File(serial / "spread_posterior.h5", "r") as h, h5py.File(mpi / "spread_posterior.h5", "r") as g:
        assert np.allclose(g["noise_flow_precision"][()], h["noise_flow_precision"][()], rtol=1e-9, atol=0)


def test_bad_input_gives_one_sorry_line(refined_for_correct, tmp_path):
    exe = command("dials.spread_correct")
    expt, refl, h5 = _warm(refined_for_correct)
    not_refine = tmp_path / "other.h5"
    with h5py.File(not_refine, "w") as h:
        h.attrs["program"] = "something else"
    cases = {
        "no warm start": [expt, refl],
        "not a refine result": [expt, refl, str(not_refine)],
        "missing warm start": [expt, refl, str(tmp_path / "nothing.h5")],
        "another model": [expt, refl, h5, "model.anomalous=spline_kk"],
        "other sites": [expt, refl, h5, "structure.sites.element=Zn"],
        "too few shoeboxes for any part": [expt, refl, h5, "correct.min_shoeboxes_per_weight=1000"],
        "a calibration prior of zero": [expt, refl, h5, "correct.spectrometer.offset_sigma_eV=0"],
        "the noise flow on photon-counting pixels": [expt, refl, h5, "correct.noise_flow.enable=True"],
        "a missing truth file (refused before the fit)": [expt, refl, h5, f"truth={tmp_path / 'nothing.json'}"],
    }
    for name, args in cases.items():
        result = run([exe, *CORRECT, *args], tmp_path, check=False)
        text = (result.stdout + result.stderr).strip()
        assert result.returncode != 0, name
        assert "Traceback" not in text, (name, text[-2000:])
        assert text.splitlines()[-1].startswith("Sorry"), (name, text[-500:])
    assert not list(tmp_path.glob("spread_posterior.*")) and not list(tmp_path.glob("spread_correct*"))


def test_the_phil_defaults_are_the_correction_settings_defaults():
    """dials.spread_correct's correct.correction defaults make CorrectionSettings' own defaults
    (the program and the library agree, e.g. the radius-2 d4 stencil)."""
    from dataclasses import asdict

    from spread_dials.command_line.correct import phil_scope
    from spread_dials.correct.correction import CorrectionSettings
    from spread_dials.correct.run import _correction_settings

    assert asdict(_correction_settings(phil_scope.extract())) == asdict(CorrectionSettings())
