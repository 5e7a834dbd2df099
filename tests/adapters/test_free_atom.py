"""Free-atom f'/f'' tables through the adapter, and the Kramers-Kronig transform applied to them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cctbx.eltbx import henke, sasaki

from spread_dials.adapters.free_atom import free_atom_curve, free_atom_fp_fdp
from spread_dials.physics.kramers_kronig import fit_tail_correction, kramers_kronig
from spread_dials.physics.oxidation_states import DEFAULT_MN_EDGE_EV, edge_energy, mn_oxidation_state_curves

f64 = torch.float64


def test_values_are_the_tables():
    energy = np.array([6000.0, 6550.0, 7120.0])
    fp, fdp = free_atom_fp_fdp("Mn", energy, "sasaki")
    assert fp[1] == pytest.approx(-6.29, abs=0.01) and fdp[1] == pytest.approx(3.95, abs=0.01)  # ENVIRONMENT.md
    for e, a, b in zip(energy, fp, fdp):
        assert (a, b) == (sasaki.table("Mn").at_ev(e).fp(), sasaki.table("Mn").at_ev(e).fdp())
    curve = free_atom_curve("fe", energy, "henke")
    assert curve.label == "fe (henke)" and curve.f_double_prime.dtype == f64
    assert curve.f_prime[2].item() == pytest.approx(henke.table("Fe").at_ev(7120.0).fp())
    with pytest.raises(ValueError, match="covers 4300-123980 eV"):
        free_atom_fp_fdp("Mn", [1000.0], "sasaki")
    with pytest.raises(ValueError, match="unknown free-atom table"):
        free_atom_fp_fdp("Mn", [7000.0], "chantler")
    with pytest.raises(ValueError, match="no sasaki table"):
        free_atom_fp_fdp("Xx", [7000.0], "sasaki")


HENKE_MESH_EV = 10.0 * 3000.0 ** (np.arange(501) / 500.0)  # Henke's uniform log mesh, 10 eV - 30 keV


@pytest.mark.parametrize("element,Z,edge_eV", [("Fe", 26, 7112.0), ("Mn", 25, 6539.0), ("S", 16, 2472.0)])
def test_kramers_kronig_of_henke_f_double_prime_gives_henke_f_prime(element, Z, edge_eV):
    """Henke f1 is itself a Kramers-Kronig transform of f2 (plus the relativistic Z* term).

    Transform f'' sampled from the table (10 eV-30 keV, 20,000 log-spaced points, extended above
    30 keV by a power law fitted to 20-30 keV) and subtract (Z/82.5)^2.37; compare f' at the
    table's own mesh points between 1.5 and 25 keV, leaving out the two mesh points on each
    side of an absorption edge (the table's f1 there is interpolated across the edge).  No
    fitted offset.  Seen: |error| <= 0.03 e (median 0.004 e).
    """
    t = henke.table(element)
    E = np.geomspace(10.0, 30000.0, 20000)
    fdp = np.array([t.at_ev(e).fdp() for e in E])
    tail_fit = E > 20000.0
    slope, intercept = np.polyfit(np.log(E[tail_fit]), np.log(fdp[tail_fit]), 1)
    E_tail = np.geomspace(30000.0, 3e7, 3000)[1:]
    E_all = np.concatenate([E, E_tail])
    fdp_all = np.concatenate([fdp, np.exp(intercept + slope * np.log(E_tail))])
    at = HENKE_MESH_EV[(HENKE_MESH_EV > 1500.0) & (HENKE_MESH_EV < 25000.0)]
    at = at[np.abs(np.log(at / edge_eV)) > 0.033]  # 2 mesh steps of 1.6 %
    fp = kramers_kronig(torch.tensor(E_all), torch.tensor(fdp_all), torch.tensor(at)).numpy() - (Z / 82.5) ** 2.37
    reference = np.array([t.at_ev(e).fp() for e in at])
    error = np.abs(fp - reference)
    assert error.max() < 0.05 and np.median(error) < 0.01, (error.max(), np.median(error))


def test_kramers_kronig_of_sasaki_near_the_mn_edge():
    """Sasaki tables (4.3-124 keV, fine step at the edge): f' within 0.1 e from 2 eV past the edge.

    The table starts at 4.3 keV, so a tail correction (constant, 1/E^2, E^2) is fitted on
    5-6.2 keV and 6.9-60 keV; 6490-6590 eV is predicted.  Seen: 0.087 e at most beyond 2 eV of
    the edge (the step itself, where f' has a log singularity, differs by up to 1 e).
    """
    t = sasaki.table("Mn")
    E = np.unique(np.concatenate([np.geomspace(4300.0, 123000.0, 8000), np.arange(6479.0, 6599.0, 0.05)]))
    fdp = np.array([t.at_ev(e).fdp() for e in E])
    at = np.unique(np.concatenate([np.geomspace(5000.0, 60000.0, 300), np.arange(6489.0, 6589.0, 0.5)]))
    fp = kramers_kronig(torch.tensor(E), torch.tensor(fdp), torch.tensor(at))
    reference = torch.tensor([t.at_ev(e).fp() for e in at])
    at_t = torch.tensor(at)
    fit = ((at_t > 5000) & (at_t < 6239)) | ((at_t > 6839) & (at_t < 60000))
    corrected, _ = fit_tail_correction(at_t, fp, reference, fit, ("constant", "inverse_square", "square"))
    near = ((at_t - 6539.0).abs() < 50) & ((at_t - 6539.0).abs() > 2)
    assert (corrected - reference)[near].abs().max() < 0.1


def test_mn_oxidation_states_from_sasaki():
    energy = np.arange(6400.0, 6700.0, 0.1)
    free_atom = free_atom_curve("Mn", energy)
    assert edge_energy(free_atom, 6500.0, 6600.0) == pytest.approx(6539.4, abs=0.2)  # Sasaki's step
    curves = mn_oxidation_state_curves(free_atom)
    for state, curve in curves.items():
        assert edge_energy(curve, 6500.0, 6600.0) == pytest.approx(DEFAULT_MN_EDGE_EV[state], abs=0.05)
    # at 6550 eV the free atom is above its edge; Mn(IV) (edge 6552.7 eV) is still below its own
    e = torch.tensor([6550.0], dtype=f64)
    assert free_atom.at(e)[1].item() > 3.5 and curves[4].at(e)[1].item() < 1.0


def test_absorption_edges_from_the_free_atom_table():
    """Edges found where f'' jumps: the tabulated K edges of Fe (7112 eV) and Mn (6539 eV) and the
    L3, L2, L1 edges of Yb (8944, 9978, 10486 eV), each within 2 eV; none for S in this range."""
    from spread_dials.adapters.free_atom import absorption_edges_eV

    for element, edges in (("Fe", [7112]), ("Mn", [6539]), ("Yb", [8944, 9978, 10486])):
        found = absorption_edges_eV(element, 6000.0, 11000.0)
        assert len(found) == len(edges) and np.allclose(found, edges, atol=2.0), (element, found)
    assert absorption_edges_eV("S", 6000.0, 11000.0) == []
    assert absorption_edges_eV("Fe", 7200.0, 9000.0) == []
