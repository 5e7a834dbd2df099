"""benchmarks/correct.py's error families (--errors): each name gives the InjectedErrors it says,
and a bad one one Sorry line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from correct import main, parse_error  # noqa: E402

from ..physics.scene_factory import grid_panels  # noqa: E402

PANELS = grid_panels(n_fast=24, n_slow=20, pixel_mm=0.1, distance_mm=40.0, grid=(2, 2), gap_mm=0.5, tilt_deg=0.0)


def test_each_family_sets_its_error():
    e = parse_error("psf1.5+gain0.05+pixgain0.1+offset1+jitter0.5+aniso2+charge0.3", PANELS, seed=3, spread_deg=0.05)
    assert e.psf_fwhm_px == 1.5 and e.spectrometer_offset_eV == 1.0 and e.energy_jitter_eV == 0.5
    assert e.photon_charge_rms == 0.3
    assert e.panel_gain.shape == (4,) and 0 < float((e.panel_gain - 1).abs().max()) < 0.5
    assert e.pixel_gain.shape == (4, 20, 24) and abs(float(e.pixel_gain.std()) - 0.1) < 0.01
    assert e.mosaic_spread_abc_deg == pytest.approx((0.1, 0.05, 0.025))
    none = parse_error("none", PANELS, seed=3, spread_deg=0.05)
    assert none.pixel_gain is None and none.mosaic_spread_abc_deg is None and none.psf_fwhm_px == 0
    # the flat field is the detector's: the same map for every replicate's seed
    assert torch.equal(parse_error("pixgain0.1", PANELS, seed=4, spread_deg=0.05).pixel_gain, e.pixel_gain)


@pytest.mark.parametrize("text, says", [("blur2", "unknown error 'blur2'"), ("aniso0", "must be > 0"),
                                        ("pixgain", "needs a number")])  # fmt: skip
def test_a_bad_family_is_one_sorry_line(text, says):
    with pytest.raises(SystemExit, match=says) as raised:
        parse_error(text, PANELS, seed=3, spread_deg=0.05)
    assert str(raised.value).startswith("Sorry:") and "\n" not in str(raised.value)


@pytest.mark.parametrize("flag", ["--n", "--replicates", "--epochs"])
def test_a_count_below_one_is_one_sorry_line(flag, tmp_path):
    with pytest.raises(SystemExit, match="must be >= 1") as raised:
        main([flag, "0", "--out", str(tmp_path)])
    assert str(raised.value).startswith("Sorry:") and not any(tmp_path.iterdir())


def test_the_noise_flow_without_a_gaussian_likelihood_is_one_sorry_line(tmp_path):
    with pytest.raises(SystemExit, match="needs a Gaussian likelihood") as raised:
        main(["--errors", "charge1", "--noise-flow", "--out", str(tmp_path)])
    assert str(raised.value).startswith("Sorry:") and not any(tmp_path.iterdir())
