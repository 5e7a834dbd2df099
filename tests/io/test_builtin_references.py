"""The packaged measured rubredoxin Fe pair (7000-7300 eV) and anomalous.builtin_fe_references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from libtbx.phil import parse

from spread_dials.io.anomalous_tables import read_anomalous_table
from spread_dials.io.builtin_references import BUILTIN_FE_BAND_EV, builtin_fe_reference_paths

# a tiny detector: the structure factors go only to ~9 A, so the setup takes about a second
TINY = ["detector.type=simple", "detector.simple.n_fast=64", "detector.simple.n_slow=64", "detector.distance_mm=40",
        "nimages=1", "crystal.mosaic_domains=1"]  # fmt: skip
SOURCES = {2: "pf-rd-red_fftkk.out", 3: "pf-rd-ox_fftkk.out"}


def _band(curve, low=7000.0, high=7300.0):
    keep = (curve.energy_eV >= low) & (curve.energy_eV <= high)
    return torch.stack([curve.energy_eV[keep], curve.f_prime[keep], curve.f_double_prime[keep]])


@pytest.mark.parametrize("state", [2, 3])
def test_packaged_band_equals_the_shared_rows(shared_data, state):
    path = builtin_fe_reference_paths()[state]
    assert path.parent.name == "anomalous" and (path.parent / "NOTICE").is_file()
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert f"sample_data/{SOURCES[state]}" in text and "gigantocypris/kramkron" in text and "MIT" in text
    assert "d357dd6abf0fc6ff42a41a38fb739cc7f80b7b3d" in text and "7000-7300" in text
    packaged = read_anomalous_table(path)
    source = read_anomalous_table(shared_data / "anomalous" / SOURCES[state])
    assert packaged.energy_eV[0] == BUILTIN_FE_BAND_EV[0] and packaged.energy_eV[-1] == BUILTIN_FE_BAND_EV[1]
    assert packaged.energy_eV.numel() == 301
    assert torch.equal(_band(packaged), _band(source))  # bit for bit: the numbers were copied as text


def test_notice_is_the_mit_licence():
    notice = (builtin_fe_reference_paths()[3].parent / "NOTICE").read_text()
    assert "MIT License" in notice and "Permission is hereby granted, free of charge" in notice
    assert "gigantocypris/kramkron" in notice


def _simulate_params(*args: str):
    from spread_dials.command_line import simulate

    files = simulate.shipped_phil_files(["rubredoxin.phil"])
    sources = [parse(file_name=files[0])] + [parse(a) for a in (*TINY, *args)]
    return simulate.phil_scope.fetch(sources=sources).extract()


def test_rubredoxin_preset_simulates_the_oxidized_measured_curve(shared_data):
    from spread_dials.simulation.setup import build_setup

    params = _simulate_params()
    assert params.anomalous.builtin_fe_references and not params.anomalous.reference_files
    setup = build_setup(params, torch.device("cpu"), torch.float64)
    assert setup.site_states == [3] and [s.element for s in setup.structure.sites] == ["Fe"]
    channels = setup.channels_eV
    assert channels.min() > 7000 and channels.max() < 7300 and len(channels) == 40
    # independent reference: numpy interpolation of the shared (full-range) oxidized file
    table = np.loadtxt(shared_data / "anomalous" / "pf-rd-ox_fftkk.out")
    expected_fdp = np.interp(channels, table[:, 0], table[:, 2])
    expected_fp = np.interp(channels, table[:, 0], table[:, 1])
    np.testing.assert_allclose(setup.f_double_prime[0].numpy(), expected_fdp, rtol=0, atol=1e-9)
    np.testing.assert_allclose(setup.f_prime[0].numpy(), expected_fp, rtol=0, atol=1e-9)
    # and not the reduced one: at the rising edge the pair differs by far more than that
    reduced = np.loadtxt(shared_data / "anomalous" / "pf-rd-red_fftkk.out")
    assert np.abs(np.interp(channels, reduced[:, 0], reduced[:, 2]) - expected_fdp).max() > 0.1


def test_builtin_pair_states_and_precedence(shared_data):
    from spread_dials.adapters.anomalous_setup import measured_reference_files, site_oxidation_states, site_references
    from spread_dials.adapters.structure_factors import AnomalousSite

    site = AnomalousSite(label="A/FE54/FE", element="Fe", atom_indices=(0,), atom_labels=("FE",))
    energy = torch.arange(7100.0, 7140.0, 1.0, dtype=torch.float64)
    on = _simulate_params("anomalous.oxidation_state=2").anomalous
    assert site_oxidation_states(on, [site]) == [2]
    (reduced,) = site_references(on, [site], energy)
    packaged = read_anomalous_table(builtin_fe_reference_paths()[2])
    assert reduced.label == "Fe(II)" and torch.equal(reduced.f_double_prime, packaged.f_double_prime)
    off = _simulate_params("anomalous.builtin_fe_references=False").anomalous
    assert site_oxidation_states(off, [site]) == [None]  # the free atom, as before the option existed
    # explicit files win over the packaged pair
    given = _simulate_params(f"anomalous.reference_files={shared_data / 'anomalous' / 'Fe_fake.dat'}",
                             "anomalous.reference_states=3").anomalous  # fmt: skip
    files, states = measured_reference_files(given)
    assert states == [3] and [str(f) for f in files] == [str(shared_data / "anomalous" / "Fe_fake.dat")]


@pytest.mark.parametrize(
    "args, message",
    [
        (["beam.energy_eV=7350"], "curve Fe(III) covers 7000-7300 eV but the channels span 7330.5-7369.5"),
        (["beam.energy_eV=7010"], "covers 7000-7300 eV but the channels span 6990.5-7029.5 eV"),
        (["anomalous.edge_shift_eV=200"], "the channels minus its edge shift 200 eV span 6900.5-6939.5"),
    ],
)
def test_a_band_outside_the_packaged_curves_is_a_one_line_sorry(tmp_path, capsys, args, message):
    """Outside its grid a curve would hold its end values: refused before any shot, on one line."""
    from spread_dials.command_line import simulate

    with pytest.raises(SystemExit) as exit_info:
        simulate.run(["rubredoxin.phil", *TINY, *args, f"output.directory={tmp_path / 'out'}"])
    assert exit_info.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("Sorry: anomalous: site A/FE54/FE: ") and message in err[0], err
    assert "the packaged rubredoxin curves (builtin_fe_references) cover only 7000-7300 eV" in err[0]
    assert not list(tmp_path.rglob("images_*.h5"))
