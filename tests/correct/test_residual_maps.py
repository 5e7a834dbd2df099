"""dials.spread_correct's residual maps (spread_dials.correct.residual_maps): sums checked by
hand, and on toy stills the signature of a point spread the physics lacks (z < 0 at a spot's
centre, > 0 beside it), which the fitted correction takes away."""

from __future__ import annotations

import pytest
import torch

from spread_dials.correct.context import pixel_context
from spread_dials.correct.correction import CorrectionSettings, PixelCorrection
from spread_dials.correct.fit import CorrectedModel, CorrectSettings, feature_statistics
from spread_dials.correct.residual_maps import model_residual_sums, residual_map_sums, summarise_maps
from spread_dials.refine.synthetic import InjectedErrors

from .toy import NOMINAL_EV, toy_refinement


def test_sums_per_panel_and_frame_offset_by_hand():
    z = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0])
    panel = torch.tensor([0, 0, 2, 2, 2])
    # offsets: centre, half pixels (round up), one beyond radius 1
    local = torch.tensor([[0.0, 0.0], [0.5, -0.5], [-1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    per_panel, frame = residual_map_sums(z, panel, local, n_panels=3, radius=1)
    assert per_panel.tolist() == [[2, -1, 5], [0, 0, 0], [3, 7.5, 25.25]]
    assert frame.shape == (3, 3, 3) and frame[..., 0].sum() == 4  # the pixel at fast offset 2 is outside
    assert frame[1, 1].tolist() == [2, 1.5, 1.25]  # (slow 0, fast 0): z 1 and 0.5
    assert frame[1, 2].tolist() == [1, -2, 4]  # (0.5, -0.5) -> fast 1, slow 0
    assert frame[2, 0].tolist() == [1, 3, 9]  # fast -1, slow +1
    summary = summarise_maps(per_panel, frame)
    assert [p["panel"] for p in summary["panels"]] == [0, 2]
    assert summary["panels"][1]["mean"] == pytest.approx(2.5) and summary["panels"][1]["sd"] == pytest.approx(1.802776, rel=1e-6)
    assert summary["frame"]["radius"] == 1 and summary["frame"]["pixels"][1][1] == 2 and summary["frame"]["mean"][2][0] is None


def test_a_missing_point_spread_shows_in_the_frame_and_the_correction_removes_it():
    """Physics-only refinement of stills blurred by a 1.5 px PSF: mean z < 0 at the spot centre,
    > 0 at the four edge neighbours; after the stencil is fitted the centre's |mean z| is at
    most a tenth of what it was."""
    r = toy_refinement(seed=3, n_stills=3, spot_scale=4000.0, errors=InjectedErrors(psf_fwhm_px=1.5))
    r.run()
    contexts = [pixel_context(r.shots, s, NOMINAL_EV) for s in r.shots.shots]
    correction = PixelCorrection(r.shots.panels.n_panels, CorrectionSettings(gain=False), feature_statistics(r, contexts))
    model = CorrectedModel(r, correction, contexts, CorrectSettings(epochs=3, warmup_epochs=1))
    before = summarise_maps(*model_residual_sums(model, physics=True))["frame"]["mean"]
    model.run()
    after = summarise_maps(*model_residual_sums(model))["frame"]["mean"]
    c = 4  # FRAME_RADIUS: the centre cell
    edges = [before[c - 1][c], before[c + 1][c], before[c][c - 1], before[c][c + 1]]
    assert before[c][c] < -3 and min(edges) > 3, (before[c][c], edges)  # measured -8.2; 7.4-24
    assert abs(after[c][c]) < 0.1 * abs(before[c][c]), (before[c][c], after[c][c])  # measured -0.26
