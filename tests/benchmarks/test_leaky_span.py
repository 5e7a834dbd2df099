"""benchmarks/leaky_span.py: the span report against closed forms (a signal inside the basis's
span leaves nothing, one orthogonal to it everything), the log-intensity derivative against
autograd, and the edge basis absorbing the toy's edge-shift signal where a constant does not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from leaky_span import basis_named, log_intensity_derivative, main, span_report  # noqa: E402

from ..correct.toy import ENERGY, toy_table  # noqa: E402
from ..refine.test_engine import _reference  # noqa: E402


def test_span_report_inside_and_orthogonal_to_the_basis():
    gen = torch.Generator().manual_seed(3)
    basis = torch.randn(3, 12, generator=gen, dtype=torch.float64)
    intensity = torch.rand(50, 12, generator=gen, dtype=torch.float64) + 1.0
    inside = torch.randn(50, 3, generator=gen, dtype=torch.float64) @ basis
    report = span_report(intensity, inside, basis)
    assert report["information_left"] < 1e-12 and report["outside_p90"] < 1e-6 and report["weights_per_reflection"] == 3
    q, _ = torch.linalg.qr(torch.cat([basis.T, torch.randn(12, 1, generator=gen, dtype=torch.float64)], 1))
    orthogonal = q[:, 3:].T.expand(50, -1) * torch.arange(1.0, 51.0, dtype=torch.float64).unsqueeze(-1)
    report = span_report(intensity, orthogonal, basis)
    assert report["information_left"] == pytest.approx(1.0, abs=1e-12) and report["outside_median"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("shift", [0.0, 0.7])
def test_log_intensity_derivative_is_autograds(shift):
    table, reference = toy_table(), _reference()
    intensity, derivative = log_intensity_derivative(table, 0, reference, ENERGY, shift_eV=shift)

    def log_intensity(shift: torch.Tensor) -> torch.Tensor:
        fp, fdp = reference.at(ENERGY, shift)
        return ((table.F0.unsqueeze(-1) + table.G[:, :1] * torch.complex(fp, fdp)).abs() ** 2).log()

    exact = torch.func.jacfwd(log_intensity)(torch.tensor(shift, dtype=torch.float64))  # (H, C) forward-mode autograd
    assert torch.allclose(derivative, exact, rtol=1e-3, atol=1e-6)  # central differences across the table's nodes
    assert torch.allclose(intensity, log_intensity(torch.tensor(shift, dtype=torch.float64)).exp(), rtol=1e-12)


def test_the_edge_basis_absorbs_the_toys_signal_where_a_constant_does_not():
    table, reference = toy_table(), _reference()
    intensity, derivative = log_intensity_derivative(table, 0, reference, ENERGY)
    edge = span_report(intensity, derivative, basis_named("edge1", reference, ENERGY))
    constant = span_report(intensity, derivative, basis_named("poly0", reference, ENERGY))
    assert edge["information_left"] < 0.05 < constant["information_left"], (edge, constant)


def test_an_unknown_basis_is_a_sorry():
    with pytest.raises(SystemExit, match=r"^Sorry: a basis is polyD or edgeD"):
        main(["--data", str(REPO / "tests"), "--bases", "spline3"])
