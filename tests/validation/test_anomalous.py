"""Sauter 2020 Figure 9's metric (CC and RMSD of refined f', f'' against the truth over an edge
window) against numpy on hand-built curves, its windows, and the report of dials.spread_refine's
three site models (pure torch + numpy; no DIALS)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spread_dials.physics.anomalous import TabulatedCurve
from spread_dials.refine.sites import EdgeShiftSites, FreeSites, SplineKKSites
from spread_dials.validation.anomalous import (
    curve_agreement,
    edge_energy_eV,
    figure9_report,
    figure9_site,
    figure9_window_eV,
    window_energies,
)

f64 = torch.float64


def _edge(centre_eV: float, low_eV: float = 7000.0, high_eV: float = 7300.0, step: float = 0.5) -> TabulatedCurve:
    e = torch.arange(low_eV, high_eV, step, dtype=f64)
    fdp = 0.5 + 3.5 / (1 + torch.exp(-(e - centre_eV) / 1.5))
    fp = -2.0 - 5.0 * torch.exp(-0.5 * ((e - centre_eV + 1.0) / 3.0) ** 2)
    return TabulatedCurve(e, fp, fdp, "edge")


def test_cc_and_rmsd_against_numpy():
    rng = np.random.default_rng(7)
    truth = rng.normal(size=31)
    refined = 0.8 * truth + rng.normal(scale=0.3, size=31)
    cc, rmsd = curve_agreement(refined, truth)
    assert cc == pytest.approx(np.corrcoef(refined, truth)[0, 1], rel=1e-12)
    assert rmsd == pytest.approx(np.sqrt(np.mean((refined - truth) ** 2)), rel=1e-12)
    # closed forms: an affine copy correlates perfectly (sign of the slope); an offset c has RMSD |c|
    assert curve_agreement(2.5 * truth - 1.0, truth)[0] == pytest.approx(1.0, abs=1e-12)
    assert curve_agreement(-0.5 * truth, truth)[0] == pytest.approx(-1.0, abs=1e-12)
    assert curve_agreement(truth + 0.25, truth)[1] == pytest.approx(0.25, rel=1e-12)
    assert curve_agreement(np.ones(31), truth)[0] is None  # a flat curve has no correlation
    assert curve_agreement([], []) == (None, None)


def test_windows():
    """Fe: 7105-7135 eV (Sauter 2020); others: 31 eV centred on the reference's steepest f''."""
    assert figure9_window_eV("Fe", _edge(7200.0)) == (7105.0, 7135.0)
    assert figure9_window_eV("FE", _edge(7200.0)) == (7105.0, 7135.0)
    mn = _edge(6551.3, 6400.0, 6700.0, 0.1)
    assert edge_energy_eV(mn) == pytest.approx(6551.3, abs=0.051)
    low, high = figure9_window_eV("Mn", mn)
    assert (low, high) == (6536.0, 6566.0)
    assert np.arange(low, high + 0.5, 1.0).size == 31


def test_figure9_site_against_numpy():
    """A truth tabulated on 1 eV channels 7110-7140 eV: the window 7105-7135 keeps 7110-7135 (26
    energies); CC and RMSD equal numpy's over those energies."""
    e = np.arange(7110.0, 7141.0, 1.0)
    truth_fp = -3.0 - 4.0 * np.exp(-0.5 * ((e - 7120.0) / 3.0) ** 2)
    truth_fdp = 0.5 + 3.5 / (1 + np.exp(-(e - 7122.0) / 1.5))
    truth = TabulatedCurve(torch.tensor(e), torch.tensor(truth_fp), torch.tensor(truth_fdp), "truth")
    energy = window_energies((7105.0, 7135.0), truth)
    assert energy.tolist() == list(np.arange(7110.0, 7136.0, 1.0))
    keep = e <= 7135.0
    refined_fp = truth_fp[keep] + 0.1 * np.sin(e[keep])
    refined_fdp = 0.5 + 3.5 / (1 + np.exp(-(e[keep] - 7121.0) / 1.5))
    row = figure9_site(refined_fp, refined_fdp, truth, (7105.0, 7135.0), energy)
    assert row["points"] == 26 and row["window_eV"] == [7105.0, 7135.0]
    assert row["cc_f_prime"] == pytest.approx(np.corrcoef(refined_fp, truth_fp[keep])[0, 1], rel=1e-10)
    assert row["rmsd_f_prime_e"] == pytest.approx(np.sqrt(np.mean((0.1 * np.sin(e[keep])) ** 2)), rel=1e-10)
    assert row["cc_f_double_prime"] == pytest.approx(np.corrcoef(refined_fdp, truth_fdp[keep])[0, 1], rel=1e-10)
    assert row["rmsd_f_double_prime_e"] == pytest.approx(np.sqrt(np.mean((refined_fdp - truth_fdp[keep]) ** 2)), rel=1e-10)


@pytest.mark.parametrize("kind", ["edge_shift", "free", "spline_kk"])
def test_report_of_each_site_model(kind):
    """Two Fe sites, the truth each reference moved by +1.5 eV.  edge_shift at theta = 1.5 and
    free with the truth's values on its grid reproduce the truth on the window (CC 1, RMSD 0);
    spline_kk at theta = 0 is the reference, whose CC and RMSD against the truth are computed
    here with numpy from the tabulated curves."""
    refs = [_edge(7120.0), _edge(7118.0)]
    truths = [r.shifted(1.5, "truth") for r in refs]
    window = np.arange(7105.0, 7136.0, 1.0)
    if kind == "edge_shift":
        sites, theta = EdgeShiftSites(refs, [0, 1], ["FE1", "FE2"]), torch.tensor([1.5, 1.5], dtype=f64)
    elif kind == "free":
        grid = torch.arange(7100.0, 7141.0, 1.0, dtype=f64)
        sites = FreeSites(refs, [0, 1], ["FE1", "FE2"], grid)
        values = [t.at(grid) for t in truths]
        theta = torch.cat([values[0][0], values[1][0], values[0][1], values[1][1]])
    else:
        sites = SplineKKSites(refs, [0, 1], ["FE1", "FE2"], torch.arange(7100.0, 7141.0, 2.0, dtype=f64))
        theta = sites.initial()
    report = figure9_report(sites, theta, truths, ["A/FE1", "A/FE2"], ["Fe", "Fe"], refs)
    assert list(report) == ["A/FE1", "A/FE2"]
    for s, row in enumerate(report.values()):
        assert row["window_eV"] == [7105.0, 7135.0] and row["points"] == 31 and row["group"] == ["FE1", "FE2"][s]
        if kind == "spline_kk":
            # the reference is tabulated every 0.5 eV: its values at the window's energies, and the
            # truth's (the same table moved by 1.5 eV) at energy - 1.5 eV
            e_table = refs[s].energy_eV.numpy()
            idx = np.searchsorted(e_table, window)
            idx_truth = np.searchsorted(e_table, window - 1.5)
            for name, table in (("f_prime", refs[s].f_prime.numpy()), ("f_double_prime", refs[s].f_double_prime.numpy())):
                a, b = table[idx], table[idx_truth]
                assert row[f"cc_{name}"] == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-9)
                assert row[f"rmsd_{name}_e"] == pytest.approx(np.sqrt(np.mean((a - b) ** 2)), rel=1e-9)
        else:
            assert row["cc_f_prime"] == pytest.approx(1.0, abs=1e-9)
            assert row["cc_f_double_prime"] == pytest.approx(1.0, abs=1e-9)
            assert row["rmsd_f_prime_e"] < 1e-9 and row["rmsd_f_double_prime_e"] < 1e-9
