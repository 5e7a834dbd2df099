"""load_shots on real dials.stills_process output, checked against the files read independently:
pixels and spectra with h5py from the NXmx containers, bboxes and Miller indices from the
reflection tables, crystals from the experiment lists; and every kind of bad input."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from dials.array_family import flex
from dxtbx.model import ExperimentList
from dxtbx.model.experiment_list import ExperimentListFactory

from spread_dials.refine.loader import load_shots, read_spectra_file, write_spectra_file
from spread_dials.util.errors import SpreadError


def _pairs(processed: Path) -> tuple[list[Path], list[Path]]:
    expts = sorted(processed.glob("idx-*_integrated.expt"))
    assert len(expts) >= 3, (processed / "stills_process.out").read_text()[-3000:]
    return expts, [p.with_suffix(".refl") for p in expts]


def _image(expt: Path) -> tuple[str, int]:
    """(container, image index in it) from the .expt JSON itself."""
    imageset = json.loads(expt.read_text())["imageset"][0]
    return imageset["images"][0], int(imageset["single_file_indices"][0])


def _container_image(container: str, index: int, n_panels: int) -> np.ndarray:
    """(P, n_slow, n_fast) raw pixels: the NXmx layout stacks panels along slow."""
    with h5py.File(container, "r") as h5:
        data = h5["/entry/data/data"][index]
    return data.reshape(n_panels, data.shape[0] // n_panels, data.shape[1])


def _table(refl: Path) -> dict[str, np.ndarray]:
    t = flex.reflection_table.from_file(str(refl))
    return {
        "bbox": np.stack([p.as_numpy_array() for p in t["bbox"].parts()], axis=1),
        "miller_index": t["miller_index"].as_vec3_double().as_numpy_array().astype(np.int64),
        "panel": t["panel"].as_numpy_array().astype(np.int64),
        "integrated": t.get_flags(t.flags.integrated_sum).as_numpy_array(),
    }


def _edit_expt(src: Path, dst: Path, edit) -> Path:
    d = json.loads(src.read_text())
    edit(d)
    dst.write_text(json.dumps(d))
    return dst


def _boxes(shot) -> list[tuple[int, int, int, int, int, np.ndarray, np.ndarray]]:
    """(panel, x0, x1, y0, y1, counts (ns, nf), valid (ns, nf)) of every shoebox of a shot."""
    sb = shot.shoeboxes
    out, start = [], 0
    for b in range(sb.n_shoeboxes):
        nf, ns = int(sb.n_fast[b]), int(sb.n_slow[b])
        x0, y0 = int(sb.fast0[b]), int(sb.slow0[b])
        counts = sb.counts[start : start + nf * ns].numpy().reshape(ns, nf)
        valid = sb.valid[start : start + nf * ns].numpy().reshape(ns, nf)
        out.append((int(sb.panel[b]), x0, x0 + nf, y0, y0 + ns, counts, valid))
        start += nf * ns
    assert start == sb.n_pixels
    return out


def test_one_still_matches_its_files(processed):
    """Pixels, bboxes, Miller indices, spectrum, crystal and geometry of one still."""
    expts, refls = _pairs(processed)
    gain = 2.0
    shots = load_shots(expts[:1], refls[:1], quantum_gain=gain)
    assert len(shots.shots) == 1
    shot = shots.shots[0]
    experiment = ExperimentListFactory.from_json_file(str(expts[0]), check_format=False)[0]
    assert shot.identifier == experiment.identifier
    detector = experiment.detector
    n_fast, n_slow = detector[0].get_image_size()
    container, index = _image(expts[0])
    assert shots.sources == [f"{container}:{index}"]

    # shoeboxes: every integrated reflection, bbox clipped to its panel, in table order
    table = _table(refls[0])
    sb = shot.shoeboxes
    assert sb.n_shoeboxes == int(table["integrated"].sum()) >= 25
    rows = sb.reflection.numpy()
    assert (np.diff(rows) > 0).all() and table["integrated"][rows].all()
    bbox = table["bbox"][rows]
    assert np.array_equal(sb.fast0.numpy(), np.maximum(bbox[:, 0], 0))
    assert np.array_equal(sb.slow0.numpy(), np.maximum(bbox[:, 2], 0))
    assert np.array_equal((sb.fast0 + sb.n_fast).numpy(), np.minimum(bbox[:, 1], n_fast))
    assert np.array_equal((sb.slow0 + sb.n_slow).numpy(), np.minimum(bbox[:, 3], n_slow))
    assert np.array_equal(sb.miller_index.numpy(), table["miller_index"][rows])
    assert np.array_equal(sb.panel.numpy(), table["panel"][rows])
    assert sb.counts.dtype == torch.float64 and sb.valid.dtype == torch.bool

    # pixels: the container's raw counts / quantum gain (h5py, not dxtbx)
    image = _container_image(container, index, len(detector))
    for panel, x0, x1, y0, y1, counts, valid in _boxes(shot):
        np.testing.assert_array_equal(counts, image[panel, y0:y1, x0:x1].astype(np.float64) / gain)
        assert valid.all()  # no mask, trusted range of the whole int32 range

    # spectrum: the container's /entry/spread arrays, weights normalised
    with h5py.File(container, "r") as h5:
        energies = h5["/entry/spread/spectrum_energies_eV"][index]
        weights = h5["/entry/spread/spectrum_weights"][index]
    np.testing.assert_array_equal(shot.energy_eV.numpy(), energies)
    np.testing.assert_allclose(shot.weight.numpy(), weights / weights.sum(), rtol=1e-12)
    assert shot.weight.sum().item() == pytest.approx(1.0, abs=1e-12)

    # crystal: the rows of A^-1 are a, b, c
    a_matrix = np.array(experiment.crystal.get_A(), dtype=np.float64).reshape(3, 3)
    np.testing.assert_allclose(shot.real_space.numpy(), np.linalg.inv(a_matrix), rtol=0, atol=1e-9)
    assert shot.real_space.dtype == torch.float64

    # geometry: dxtbx's panels, beam along -sample_to_source, E = normal x sample_to_source
    assert shots.panels.n_panels == len(detector) and shots.panels.image_size == (n_fast, n_slow)
    np.testing.assert_allclose(shots.panels.origin_mm.numpy(), [p.get_origin() for p in detector], atol=1e-12)
    np.testing.assert_allclose(shots.panels.fast_axis.numpy(), [p.get_fast_axis() for p in detector], atol=1e-12)
    np.testing.assert_allclose(shots.panels.attenuation_length_mm.numpy(), [1 / p.get_mu() for p in detector])
    beam = json.loads(expts[0].read_text())["beam"][0]
    to_source = np.array(beam["direction"]) / np.linalg.norm(beam["direction"])
    np.testing.assert_allclose(shots.beam_direction.numpy(), -to_source, atol=1e-12)
    np.testing.assert_allclose(shots.e_vector.numpy(), np.cross(beam["polarization_normal"], to_source), atol=1e-12)
    assert shots.polarization_fraction == beam["polarization_fraction"]


def test_all_stills(processed):
    """Every integrated still once, in file order, with one detector; mu averaged over the stills."""
    expts, refls = _pairs(processed)
    shots = load_shots(expts, refls)
    assert [s.identifier for s in shots.shots] == [
        ExperimentListFactory.from_json_file(str(e), check_format=False)[0].identifier for e in expts
    ]
    assert shots.sources == [f"{c}:{i}" for c, i in map(_image, expts)]
    mu = [[p.get_mu() for p in ExperimentListFactory.from_json_file(str(e), check_format=False)[0].detector]
          for e in expts]  # fmt: skip
    np.testing.assert_allclose(shots.panels.attenuation_length_mm.numpy(), 1 / np.mean(mu, axis=0), rtol=1e-12)
    for shot in shots.shots:
        assert shot.shoeboxes.n_pixels == int((shot.shoeboxes.n_fast * shot.shoeboxes.n_slow).sum())


def test_max_shoebox_px_keeps_the_centre_of_each_box(processed):
    """Boxes cut to 7 pixels per side hold the central block of the whole box's pixels (the
    reference: the uncut load sliced by hand; boxes clipped at a panel edge are centred on the
    unclipped box, so only their containment is checked)."""
    expts, refls = _pairs(processed)
    uncut = load_shots(expts[:1], refls[:1])
    whole = _boxes(uncut.shots[0])
    cut = _boxes(load_shots(expts[:1], refls[:1], max_shoebox_px=7).shots[0])
    assert len(cut) == len(whole) and any(x1 - x0 > 7 for _, x0, x1, *_ in whole)
    n_fast, n_slow = uncut.panels.n_fast, uncut.panels.n_slow
    for (p, x0, x1, y0, y1, counts, valid), (q, u0, u1, v0, v1, c_cut, v_cut) in zip(whole, cut):
        assert p == q and x0 <= u0 < u1 <= x1 and y0 <= v0 < v1 <= y1
        np.testing.assert_array_equal(c_cut, counts[v0 - y0 : v1 - y0, u0 - x0 : u1 - x0])
        np.testing.assert_array_equal(v_cut, valid[v0 - y0 : v1 - y0, u0 - x0 : u1 - x0])
        if x0 == 0 or y0 == 0 or x1 == n_fast or y1 == n_slow:
            continue
        assert u1 - u0 == min(7, x1 - x0) and v1 - v0 == min(7, y1 - y0)
        fs = (x0 + x1) // 2 - 3 if x1 - x0 > 7 else x0
        ss = (y0 + y1) // 2 - 3 if y1 - y0 > 7 else y0
        assert (u0, v0) == (fs, ss)


def test_bbox_overhanging_or_off_the_panel(processed, tmp_path):
    """A bbox overhanging its panel is clipped; one with no pixel on it is left out."""
    expts, refls = _pairs(processed)
    t = flex.reflection_table.from_file(str(refls[0]))
    experiment = ExperimentListFactory.from_json_file(str(expts[0]), check_format=False)[0]
    n_fast, n_slow = experiment.detector[0].get_image_size()
    bbox = t["bbox"]
    bbox[0] = (-5, 7, n_slow - 6, n_slow + 9, 0, 1)
    bbox[1] = (n_fast + 1, n_fast + 8, 10, 20, 0, 1)
    t.as_file(str(tmp_path / "edited.refl"))
    shot = load_shots(expts[:1], [tmp_path / "edited.refl"]).shots[0]
    rows = shot.shoeboxes.reflection.numpy()
    assert rows[0] == 0 and 1 not in rows and len(rows) == t.size() - 1
    panel, x0, x1, y0, y1, counts, _ = _boxes(shot)[0]
    assert (x0, x1, y0, y1) == (0, 7, n_slow - 6, n_slow)
    image = _container_image(*_image(expts[0]), len(experiment.detector))
    np.testing.assert_array_equal(counts, image[panel, n_slow - 6 :, :7])


def test_trusted_range_marks_invalid_pixels(processed, tmp_path):
    """valid follows the experiment's trusted range: low < raw < high."""
    expts, refls = _pairs(processed)
    container, index = _image(expts[0])
    image = _container_image(container, index, 4)
    high = float(np.percentile(image, 99.5))

    def trusted(d):
        for panel in d["detector"][0]["panels"]:
            panel["trusted_range"] = [0.0, high]

    expt = _edit_expt(expts[0], tmp_path / "trusted.expt", trusted)
    shot = load_shots([expt], refls[:1]).shots[0]
    n_invalid = 0
    for panel, x0, x1, y0, y1, _, valid in _boxes(shot):
        raw = image[panel, y0:y1, x0:x1]
        np.testing.assert_array_equal(valid, (raw > 0) & (raw < high))
        n_invalid += int((~valid).sum())
    assert n_invalid > 0


def test_several_experiments_per_file(processed, tmp_path):
    """A composite pair (2 experiments, ids in the other order) gives the same shots as the singles."""
    expts, refls = _pairs(processed)
    experiments = ExperimentList()
    for e in expts[:2]:
        experiments.extend(ExperimentListFactory.from_json_file(str(e), check_format=False))
    experiments.as_file(str(tmp_path / "composite.expt"))
    tables = [flex.reflection_table.from_file(str(r)) for r in refls[:2]]
    second, first = tables[1], tables[0]
    first["id"] = flex.int(first.size(), 1)
    ids = first.experiment_identifiers()
    identifier = ids[0]
    del ids[0]
    ids[1] = identifier
    second.extend(first)  # rows of the second still first, with id 0
    second.as_file(str(tmp_path / "composite.refl"))

    singles = load_shots(expts[:2], refls[:2])
    composite = load_shots([tmp_path / "composite.expt"], [tmp_path / "composite.refl"])
    assert [s.identifier for s in composite.shots] == [s.identifier for s in singles.shots]
    assert composite.sources == singles.sources
    for a, b in zip(composite.shots, singles.shots):
        for name in ("miller_index", "panel", "fast0", "slow0", "n_fast", "n_slow", "counts", "valid", "reflection"):
            assert torch.equal(getattr(a.shoeboxes, name), getattr(b.shoeboxes, name)), name
        torch.testing.assert_close(a.real_space, b.real_space, rtol=0, atol=1e-9)  # the JSON rewrite rounds
        assert torch.equal(a.energy_eV, b.energy_eV) and torch.equal(a.weight, b.weight)


def test_spectra_file_round_trip(processed, tmp_path):
    expts, refls = _pairs(processed)
    identifiers = [ExperimentListFactory.from_json_file(str(e), check_format=False)[0].identifier for e in expts]
    rng = np.random.default_rng(0)
    energies = 6500.0 + np.cumsum(rng.uniform(0.5, 1.5, (len(expts), 7)), axis=1)
    weights = rng.uniform(0.0, 3.0, (len(expts), 7))
    path = write_spectra_file(tmp_path / "spectra", identifiers[::-1], energies[::-1], weights[::-1])
    assert path.name == "spectra.npz"
    back = read_spectra_file(path)
    assert list(back) == identifiers[::-1]
    shots = load_shots(expts, refls, spectra_file=path)
    for shot, e, w in zip(shots.shots, energies, weights):
        np.testing.assert_array_equal(shot.energy_eV.numpy(), e)
        np.testing.assert_allclose(shot.weight.numpy(), w / w.sum(), rtol=1e-12)


def test_min_shoeboxes_skips_and_logs(processed, caplog):
    expts, refls = _pairs(processed)
    counts = [s.shoeboxes.n_shoeboxes for s in load_shots(expts, refls).shots]
    with caplog.at_level(logging.INFO, logger="dials.spread.refine"):
        shots = load_shots(expts, refls, min_shoeboxes=max(counts))
    n_skipped = sum(c < max(counts) for c in counts)
    assert n_skipped >= 1 and len(shots.shots) == len(counts) - n_skipped
    assert f"Skipped {n_skipped} of {len(counts)} stills with fewer than {max(counts)} shoeboxes" in caplog.text
    assert "Loaded" in caplog.text
    with pytest.raises(SpreadError, match="no still has at least"):
        load_shots(expts, refls, min_shoeboxes=max(counts) + 1)


# -- bad input ------------------------------------------------------------------------------------


def test_no_integrated_reflections(processed, tmp_path):
    expts, refls = _pairs(processed)
    t = flex.reflection_table.from_file(str(refls[0]))
    t.unset_flags(flex.bool(t.size(), True), t.flags.integrated_sum)
    bad = tmp_path / "unintegrated.refl"
    t.as_file(str(bad))
    with pytest.raises(SpreadError, match=r"^no integrated reflections .*unintegrated\.refl"):
        load_shots(expts[:1], [bad])


def test_reflection_file_lacking_columns(processed, tmp_path):
    expts, refls = _pairs(processed)
    t = flex.reflection_table.from_file(str(refls[0]))
    del t["bbox"]
    bad = tmp_path / "nobbox.refl"
    t.as_file(str(bad))
    with pytest.raises(SpreadError, match=r"^missing column\(s\) bbox in reflection file .*nobbox\.refl"):
        load_shots(expts[:1], [bad])
    (tmp_path / "junk.refl").write_text("not a reflection table")
    with pytest.raises(SpreadError, match=r"^cannot read reflections from .*junk\.refl"):
        load_shots(expts[:1], [tmp_path / "junk.refl"])


def test_image_container_not_found_or_unreadable(processed, tmp_path):
    expts, refls = _pairs(processed)

    def point_to(path):
        def edit(d):
            d["imageset"][0]["images"] = [str(path)]

        return edit

    nowhere = tmp_path / "nowhere" / "images_00000.h5"
    expt = _edit_expt(expts[0], tmp_path / "nowhere.expt", point_to(nowhere))
    message = rf"^image container not found: {re.escape(str(nowhere))} \(the images of .*nowhere\.expt\)"
    with pytest.raises(SpreadError, match=message):
        load_shots([expt], refls[:1])
    junk = tmp_path / "junk.h5"
    junk.write_text("not HDF5")
    expt = _edit_expt(expts[0], tmp_path / "junk.expt", point_to(junk))
    with pytest.raises(SpreadError, match=rf"^cannot open image container {re.escape(str(junk))}"):
        load_shots([expt], refls[:1])


def test_missing_spectra(processed, tmp_path):
    """A container without /entry/spread spectra, or a spectra file without the still."""
    expts, refls = _pairs(processed)
    container, _ = _image(expts[0])
    copy = tmp_path / "nospectra.h5"
    shutil.copy(container, copy)
    with h5py.File(copy, "r+") as h5:
        del h5["/entry/spread/spectrum_energies_eV"], h5["/entry/spread/spectrum_weights"]

    def point_to_copy(d):
        d["imageset"][0]["images"] = [str(copy)]

    expt = _edit_expt(expts[0], tmp_path / "nospectra.expt", point_to_copy)
    message = rf"^no spectrum for experiment .*: image container {re.escape(str(copy))} has no"
    with pytest.raises(SpreadError, match=message):
        load_shots([expt], refls[:1])
    identifier = ExperimentListFactory.from_json_file(str(expts[0]), check_format=False)[0].identifier
    spectra = write_spectra_file(tmp_path / "s.npz", [identifier], [[7000.0, 7001.0]], [[1.0, 3.0]])
    assert load_shots([expt], refls[:1], spectra_file=spectra).shots[0].weight.tolist() == [0.25, 0.75]
    other = write_spectra_file(tmp_path / "other.npz", ["someone-else"], [[7000.0]], [[1.0]])
    with pytest.raises(SpreadError, match=rf"^no spectrum for experiment '{identifier}' .*other\.npz"):
        load_shots([expt], refls[:1], spectra_file=other)
    zero = write_spectra_file(tmp_path / "zero.npz", [identifier], [[7000.0, 7001.0]], [[0.0, 0.0]])
    message = r"^bad spectrum for experiment .*zero\.npz: 2 energies, 2 weights summing to 0"
    with pytest.raises(SpreadError, match=message):
        load_shots([expt], refls[:1], spectra_file=zero)
    np.savez(tmp_path / "incomplete.npz", identifiers=np.array([identifier]))
    with pytest.raises(SpreadError, match=r"incomplete\.npz lacks energies_eV, weights"):
        load_shots([expt], refls[:1], spectra_file=tmp_path / "incomplete.npz")


def test_mismatched_files(processed):
    expts, refls = _pairs(processed)
    with pytest.raises(SpreadError, match=r"^mismatched input: 2 experiment files but 1 reflection files"):
        load_shots(expts[:2], refls[:1])
    message = rf"^reflection file {re.escape(str(refls[1]))} does not belong to {re.escape(str(expts[0]))}"
    with pytest.raises(SpreadError, match=message):
        load_shots(expts[:1], refls[1:2])
    with pytest.raises(SpreadError, match="appears in"):
        load_shots([expts[0], expts[0]], [refls[0], refls[0]])


def test_different_detectors_or_beams(processed, tmp_path):
    expts, refls = _pairs(processed)

    def shift(d):
        d["detector"][0]["hierarchy"]["origin"][2] -= 1.0  # the whole detector 1 mm further

    expt = _edit_expt(expts[1], tmp_path / "shifted.expt", shift)
    with pytest.raises(SpreadError, match=r"^experiments with different detectors: .* of .*shifted\.expt"):
        load_shots([expts[0], expt], refls[:2])

    def tilt(d):
        d["beam"][0]["direction"] = [0.001, 0.0, 1.0]

    expt = _edit_expt(expts[1], tmp_path / "tilted.expt", tilt)
    with pytest.raises(SpreadError, match=r"^experiments with different beam directions .* of .*tilted\.expt"):
        load_shots([expts[0], expt], refls[:2])
