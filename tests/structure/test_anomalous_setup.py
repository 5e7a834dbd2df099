"""PHIL scopes -> prepared structure and per-site anomalous model (real cctbx, real files)."""

from __future__ import annotations

import libtbx.phil
import pytest
import torch

from spread_dials.adapters.anomalous_setup import (
    anomalous_model_from_params,
    prepare_from_params,
    resolve_structure_params,
    site_oxidation_states,
)
from spread_dials.adapters.structure_factors import load_model, select_sites
from spread_dials.phil.structure import structure_and_anomalous_phil
from spread_dials.physics.anomalous import EdgeShiftModel, FreeChannelModel
from spread_dials.physics.oxidation_states import edge_energy
from spread_dials.plots.anomalous import curves_from_model, plot_anomalous

master = libtbx.phil.parse(structure_and_anomalous_phil)


def params(*lines: str):
    return master.fetch(libtbx.phil.parse("\n".join(lines))).extract()


def test_every_parameter_has_help():
    for definition in master.all_definitions():
        assert definition.object.help, definition.path


def test_rubredoxin_defaults_and_fe_states(shared_data):
    p = params(
        "structure.d_min=4",
        f"anomalous.reference_files={shared_data / 'anomalous' / 'pf-rd-red_fftkk.out'}",
        f"anomalous.reference_files={shared_data / 'anomalous' / 'pf-rd-ox_fftkk.out'}",
        "anomalous.reference_states=2 3",
    )
    choice = resolve_structure_params(p.structure)
    assert (choice.element, choice.d_min, choice.file) == ("Fe", 4.0, None)
    prepared = prepare_from_params(p.structure, mean_energy_eV=7120.0)
    assert [s.label for s in prepared.sites] == ["A/FE54/FE"] and prepared.algorithm == "direct"
    energy = torch.arange(7070.0, 7170.0, 1.0, dtype=torch.float64)
    model = anomalous_model_from_params(p.anomalous, prepared.sites, energy)
    assert isinstance(model, EdgeShiftModel) and model.labels == ["Fe(III)"]
    reduced = anomalous_model_from_params(params("anomalous.oxidation_state=2", *[f"anomalous.{k}" for k in (
        f"reference_files={shared_data / 'anomalous' / 'pf-rd-red_fftkk.out'}", "reference_states=2")]).anomalous, prepared.sites, energy)
    assert reduced.labels == ["Fe(II)"]
    with pytest.raises(ValueError, match="no reference curve for Fe oxidation state 2"):
        anomalous_model_from_params(params("anomalous.oxidation_state=2").anomalous, prepared.sites, energy)
    sf = prepared.structure_factors(*model(energy))
    assert sf.f_prime.shape == (1, 100)


def test_psii_preset_gives_each_oec_mn_its_state(shared_data, tmp_path):
    with pytest.raises(ValueError, match="structure.file"):
        resolve_structure_params(params("structure.preset=psii").structure)
    p = params("structure.preset=psii", f"structure.file={shared_data / 'models' / 'psii_oec.pdb'}")
    choice = resolve_structure_params(p.structure)
    assert (choice.element, choice.d_min) == ("Mn", None)  # None: the program decides (detector reach)
    _, hierarchy = load_model(choice.file)
    sites = select_sites(hierarchy, element=choice.element, group_by=choice.group_by)
    assert site_oxidation_states(p.anomalous, sites) == [3, 4, 4, 3] * 2
    energy = torch.arange(6500.0, 6600.0, 1.0, dtype=torch.float64)
    model = anomalous_model_from_params(p.anomalous, sites, energy)
    assert model.labels == ["Mn(III)", "Mn(IV)", "Mn(IV)", "Mn(III)"] * 2
    curves = curves_from_model(model, torch.arange(6450.0, 6650.0, 0.1, dtype=torch.float64), [s.label for s in sites])
    assert edge_energy(curves[1], 6500, 6600) - edge_energy(curves[0], 6500, 6600) == pytest.approx(2.0, abs=0.1)
    free = anomalous_model_from_params(params("anomalous.model=free_channel", "anomalous.oxidation_state=4").anomalous, sites[:2], energy)
    assert isinstance(free, FreeChannelModel) and free.f_prime.shape == (2, 100)
    png = plot_anomalous(tmp_path / "mn.png", curves[:4], band_eV=(6500.0, 6600.0), spectrum=(energy, torch.exp(-((energy - 6550) / 20) ** 2)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
