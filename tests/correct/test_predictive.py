"""dials.spread_correct's posterior predictive check (spread_dials.correct.predictive): held-out
stills leave the fit, and their standardized residuals are those of Poisson counts when the model
is right and not when a point spread is missing (toy stills; references: the Poisson
distribution's mean 0 and sd 1 of z, an independent fit without the held-out still)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from spread_dials.correct.context import pixel_context
from spread_dials.correct.correction import CorrectionSettings, PixelCorrection
from spread_dials.correct.fit import CorrectedModel, CorrectSettings, feature_statistics
from spread_dials.correct.predictive import (
    held_out_stills,
    pool_reports,
    residual_sums,
    shell_edges,
    summarise_sums,
    z_moments,
)
from spread_dials.refine.engine import inverse_resolution
from spread_dials.refine.synthetic import InjectedErrors

from .toy import NOMINAL_EV, toy_refinement


def test_held_out_stills_are_a_seeded_tenth_and_never_all():
    assert held_out_stills(40, 0.1, 3) == held_out_stills(40, 0.1, 3)
    assert len(held_out_stills(40, 0.1, 3)) == 4 and held_out_stills(40, 0.1, 3) != held_out_stills(40, 0.1, 4)
    assert len(held_out_stills(4, 0.1, 1)) == 1 and held_out_stills(1, 0.5, 1) == [] and held_out_stills(9, 0.0, 1) == []
    assert len(held_out_stills(3, 0.9, 1)) == 2
    with pytest.raises(ValueError):
        held_out_stills(10, 1.0, 1)


def _z_summary(r) -> dict:
    local = list(range(len(r.caches)))
    inverse_d = [inverse_resolution(s) for s in r.shots.shots]
    edges = shell_edges(torch.cat(inverse_d), 3)
    return summarise_sums(residual_sums(r, local, inverse_d, edges, 2), 2, r.shots.panels.n_panels, edges)


@pytest.mark.parametrize("psf", [None, 1.5])
def test_held_out_residuals_are_poisson_when_the_model_is_right(psf):
    """Refined toy stills, their per-shot parameters refitted: without a model error every
    panel group's and resolution shell's z has mean 0 (4 standard errors) and sd 1 (+-6 %);
    with a 1.5 px point spread the physics model lacks, the sd of some group exceeds 1.3."""
    r = toy_refinement(seed=2, n_stills=2, spot_scale=4000.0, errors=None if psf is None else InjectedErrors(psf_fwhm_px=psf))
    r.run()
    summary = _z_summary(r)
    groups = summary["panel_groups"] + summary["resolution_shells"]
    assert sum(g["pixels"] for g in summary["panel_groups"]) == sum(g["pixels"] for g in summary["resolution_shells"]) > 1000
    if psf is None:
        for g in groups:
            assert abs(g["mean"]) < 4 / g["pixels"] ** 0.5 + 0.02 and abs(g["sd"] - 1) < 0.06, g
    else:
        assert max(g["sd"] for g in groups) > 1.3, groups


def _fitted_theta(held: bool, scale_held_counts: float) -> torch.Tensor:
    r = toy_refinement(seed=0, n_stills=3, spot_scale=4000.0, errors=InjectedErrors(psf_fwhm_px=1.5))
    if held:
        r.caches[2] = replace(r.caches[2], weight=0.0)
    r.caches[2] = replace(r.caches[2], counts=r.caches[2].counts * scale_held_counts)
    contexts = [pixel_context(r.shots, s, NOMINAL_EV) for s in r.shots.shots]
    correction = PixelCorrection(r.shots.panels.n_panels, CorrectionSettings(gain=False), feature_statistics(r, contexts))
    model = CorrectedModel(r, correction, contexts, CorrectSettings(epochs=2, warmup_epochs=1))
    model.run()
    return torch.cat([r.theta.detach(), model.phi.detach()])


def test_a_held_out_still_does_not_move_the_fit():
    """The edge shifts and the correction's weights fitted with still 2 held out (weight 0) do
    not change when that still's counts are doubled (to 1e-10), while the same change moves
    them when the still is in the fit."""
    base, doubled = _fitted_theta(True, 1.0), _fitted_theta(True, 2.0)
    assert torch.allclose(base, doubled, rtol=0, atol=1e-10), (base, doubled)
    assert not torch.allclose(_fitted_theta(False, 1.0), _fitted_theta(False, 2.0), rtol=0, atol=1e-3)


def test_pooled_reports_are_the_moments_of_all_pixels():
    """Two data sets' reports pooled per group equal numpy's mean and sd (ddof 1) of their
    pixels' z together; a group with one pixel (no moments) adds nothing; unequal shell counts
    are refused."""
    rng = np.random.default_rng(7)
    zs = [[rng.normal(0.3, 1.4, 50), rng.normal(-0.1, 0.8, 30)], [rng.normal(0.2, 1.2, 20), rng.normal(0.0, 1.0, 1)]]

    def report(z: list[np.ndarray], d: float) -> dict:
        parts = [z_moments(len(x), float(x.sum()), float((x**2).sum())) for x in z]
        groups = {"panel_groups": [{"panels": [0, 1], **parts[0]}, {"panels": [2, 3], **parts[1]}],
                  "resolution_shells": [{"d_max_A": None, "d_min_A": d, **parts[0]}, {"d_max_A": d, "d_min_A": None, **parts[1]}]}  # fmt: skip
        return {"held_out_stills": ["a"], "before": groups, "after": groups}

    pooled = pool_reports([report(zs[0], 2.0), report(zs[1], 3.0)])
    assert pooled["data_sets"] == 2 and pooled["held_out_stills"] == ["a", "a"]
    for g, together in enumerate([np.concatenate([zs[0][0], zs[1][0]]), zs[0][1]]):
        got = pooled["after"]["panel_groups"][g]
        assert got["pixels"] == together.size
        assert got["mean"] == pytest.approx(together.mean(), rel=1e-12)
        assert got["sd"] == pytest.approx(together.std(ddof=1), rel=1e-12)
    assert pooled["before"]["resolution_shells"][0]["d_min_A"] == pytest.approx(2.5)
    assert pooled["before"]["resolution_shells"][0]["d_max_A"] is None
    short = report(zs[0], 2.0)
    short["after"]["resolution_shells"] = short["after"]["resolution_shells"][:1]
    with pytest.raises(ValueError, match="different numbers of resolution shells"):
        pool_reports([report(zs[1], 3.0), short])
