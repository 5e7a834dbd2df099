"""Reading measured f'/f'' tables (CRLF, tabs, fixed-width, non-uniform grids)."""

from __future__ import annotations

import re

import pytest
import torch

from spread_dials.io.anomalous_tables import read_anomalous_table, write_anomalous_table


def test_rubredoxin_tables(shared_data):
    ox = read_anomalous_table(shared_data / "anomalous" / "pf-rd-ox_fftkk.out")
    red = read_anomalous_table(shared_data / "anomalous" / "pf-rd-red_fftkk.out")
    assert ox.energy_eV.numel() == red.energy_eV.numel() == 23900
    assert torch.equal(ox.energy_eV, red.energy_eV)
    assert torch.equal(torch.diff(ox.energy_eV), torch.ones(23899, dtype=torch.float64))
    # first and last rows as kramkron's own tests print them
    assert ox.energy_eV[0].item() == 1006.0
    assert ox.f_prime[0].item() == -1.95442043311 and ox.f_double_prime[0].item() == 5.92009170594
    assert (ox.energy_eV[-1].item(), ox.f_prime[-1].item(), ox.f_double_prime[-1].item()) == (24905.0, 0.18454034239, 0.315405661584)
    # MANIFEST: minimum f' -7.64 e at 7123 eV (ox), -7.85 e at 7116 eV (red)
    assert ox.energy_eV[ox.f_prime.argmin()].item() == 7123.0 and ox.f_prime.min().item() == pytest.approx(-7.64, abs=0.01)
    assert red.energy_eV[red.f_prime.argmin()].item() == 7116.0 and red.f_prime.min().item() == pytest.approx(-7.85, abs=0.01)
    assert ox.label == "pf-rd-ox_fftkk"


def test_fe_fake_nonuniform_grid(shared_data):
    fake = read_anomalous_table(shared_data / "anomalous" / "Fe_fake.dat", label="Fe0")
    assert fake.energy_eV.numel() == 366 and fake.label == "Fe0"
    assert fake.energy_eV[0].item() == 1000.0 and fake.energy_eV[-1].item() == 24900.0
    steps = set(torch.diff(fake.energy_eV).tolist())
    assert {1.0, 5.0, 15.0, 90.0, 100.0} <= steps
    # f'' ramps linearly 0.470 -> 3.95 e over 7110-7115 eV
    at = fake.at(torch.tensor([7110.0, 7115.0], dtype=torch.float64))[1]
    assert at.tolist() == pytest.approx([0.470, 3.95], abs=0.01)


def test_round_trip_and_errors(tmp_path):
    path = tmp_path / "t.dat"
    path.write_bytes(b"# comment\r\n7000\t-3.0\t0.5\r\n\r\n7002  -3.5  0.6\r\n7001 -3.2 0.55 extra\r\n")
    curve = read_anomalous_table(path)
    assert curve.energy_eV.tolist() == [7000.0, 7001.0, 7002.0]  # sorted
    assert curve.f_prime.tolist() == [-3.0, -3.2, -3.5]
    back = read_anomalous_table(write_anomalous_table(curve, tmp_path / "out.dat"))
    assert torch.allclose(back.f_double_prime, curve.f_double_prime)
    (tmp_path / "bad.dat").write_text("7000 -3.0\n7001 -3 0.5\n")
    with pytest.raises(ValueError, match="three columns"):
        read_anomalous_table(tmp_path / "bad.dat")
    (tmp_path / "dup.dat").write_text("7000 -3 0.5\n7000 -3 0.5\n")
    with pytest.raises(ValueError, match="repeated"):
        read_anomalous_table(tmp_path / "dup.dat")
    (tmp_path / "text.dat").write_text("energy fp fdp\n")
    with pytest.raises(ValueError, match="expected"):
        read_anomalous_table(tmp_path / "text.dat")


@pytest.mark.parametrize(
    "rows, message",
    [
        ("7000 -3 0.5\n7001 nan 0.5\n7002 -3 inf\n", "2 rows hold values that are not finite"),
        ("7000 -3 0.5\n7001 -9999 -9999\n", "1 rows hold f', f'' no atom has (placeholders?)"),
        ("7000 -3 0.5\n7001 -3 -5\n", "no atom has"),
        ("7.000 -3 0.5\n7.001 -3.1 0.6\n", "energies 7-7.001 are not X-ray energies in eV (keV or wavelengths?)"),
    ],
)
def test_tables_no_atom_can_have_are_refused(tmp_path, rows, message):
    """Non-finite values (they reached the images as int32 minimum pixels), placeholders and
    energies in keV are refused when the table is read, whatever the run then asks of it."""
    (tmp_path / "t.dat").write_text(rows)
    with pytest.raises(ValueError, match=re.escape(message)):
        read_anomalous_table(tmp_path / "t.dat")
