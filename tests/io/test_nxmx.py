"""NXmx containers: read back by dxtbx in this process and by the stock /usr/bin/dials.import,
compared with the detector models that dxtbx builds from the layouts (the truth)."""

from __future__ import annotations

import shutil
import subprocess

import h5py
import numpy as np
import pytest
from dxtbx.model.experiment_list import ExperimentListFactory

from spread_dials.adapters.dxtbx_models import detector_from_layout
from spread_dials.detectors.jungfrau import jungfrau16m_layout
from spread_dials.detectors.layout import layout_from_dxtbx_dict, silicon_mu_per_mm
from spread_dials.detectors.simple import simple_detector
from spread_dials.io.nxmx import NXmxWriter, panel_module_names, write_nxmx

TOL = 1e-6
WAVELENGTHS = (1.30, 1.31, 1.325)


def _small_layout():
    """2 x 2 panels of 64 x 48 pixels, the last one tilted by 7 degrees, behind a 0.32 mm sensor."""
    return simple_detector(64, 48, 0.172, 90.0, 2, 2, gap_mm=1.5, thickness_mm=0.32,
                           mu_per_mm=silicon_mu_per_mm(9500.0), tilt_deg=7.0)  # fmt: skip


def _images(n: int, layout, seed: int = 1) -> np.ndarray:
    n_fast, n_slow = layout.image_size
    rng = np.random.default_rng(seed)
    return rng.integers(-20, 70000, size=(n, 4, n_slow, n_fast), dtype=np.int64).astype(np.int32)


def _assert_same_geometry(detector, truth) -> None:
    assert len(detector) == len(truth)
    for k, (panel, ref) in enumerate(zip(detector, truth)):
        for getter in ("get_origin", "get_fast_axis", "get_slow_axis", "get_pixel_size"):
            got, want = np.array(getattr(panel, getter)()), np.array(getattr(ref, getter)())
            assert np.abs(got - want).max() <= TOL, (k, getter, got, want)
        assert panel.get_image_size() == ref.get_image_size(), k


def _dials_import(tmp_path, *files) -> "ExperimentList":  # noqa: F821
    exe = shutil.which("dials.import", path="/usr/bin")
    assert exe, "the stock /usr/bin/dials.import is needed"
    result = subprocess.run([exe, *map(str, files)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return ExperimentListFactory.from_json_file(str(tmp_path / "imported.expt"), check_format=True)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nxmx_small")
    layout = _small_layout()
    images = _images(len(WAVELENGTHS), layout)
    energies = np.stack([np.linspace(9400.0, 9600.0, 5) + 10 * i for i in range(3)])
    weights = np.stack([np.arange(1.0, 6.0) / 15.0] * 3)
    path = write_nxmx(tmp / "small.h5", layout, images, WAVELENGTHS, spectra=(energies, weights))
    return tmp, path, layout, images, (energies, weights)


def test_small_detector_read_by_dxtbx(small):
    """dxtbx in this process: 3 stills, the layout's panels, one wavelength each, same pixels."""
    _, path, layout, images, _ = small
    experiments = ExperimentListFactory.from_filenames([str(path)])
    assert len(experiments) == 3
    truth = detector_from_layout(layout)
    for i, expt in enumerate(experiments):
        assert expt.scan is None and expt.goniometer is None
        assert expt.beam.get_wavelength() == pytest.approx(WAVELENGTHS[i], abs=1e-12)
        _assert_same_geometry(expt.detector, truth)
        raw = expt.imageset.get_raw_data(0)
        for k in range(4):
            data = raw[k].as_numpy_array()
            assert data.dtype == np.int32 and np.array_equal(data, images[i, k]), (i, k)


def test_small_detector_read_by_stock_dials_import(small):
    """/usr/bin/dials.import (no plugin, no environment) sees the same detector, beams and pixels."""
    tmp, path, layout, images, _ = small
    experiments = _dials_import(tmp, path)
    assert len(experiments) == 3
    truth = detector_from_layout(layout)
    for i, expt in enumerate(experiments):
        assert expt.beam.get_wavelength() == pytest.approx(WAVELENGTHS[i], abs=1e-12)
        _assert_same_geometry(expt.detector, truth)
        for panel in expt.detector:
            assert panel.get_thickness() == pytest.approx(0.32)
            assert panel.get_material() == "Si"
        raw = expt.imageset.get_raw_data(0)
        assert all(np.array_equal(raw[k].as_numpy_array(), images[i, k]) for k in range(4))


def test_container_layout(small):
    """One gzip+shuffle chunk per module, zero-padded module names, spectra beside the images."""
    _, path, layout, _, (energies, weights) = small
    with h5py.File(path, "r") as h5:
        data = h5["/entry/data/data"]
        assert data.shape == (3, 4 * 48, 64) and data.dtype == np.int32
        assert data.chunks == (1, 48, 64)
        assert data.compression == "gzip" and data.shuffle
        wl = h5["/entry/instrument/beam/incident_wavelength"]
        assert np.array_equal(wl[()], WAVELENGTHS) and wl.attrs["units"] == b"angstrom"
        det = h5["/entry/instrument/detector"]
        assert [k for k in det if k.startswith("panel")] == panel_module_names(4) == ["panel000", "panel001", "panel002", "panel003"]
        assert np.array_equal(h5["/entry/spread/spectrum_energies_eV"][()], energies)
        assert np.array_equal(h5["/entry/spread/spectrum_weights"][()], weights)
    assert panel_module_names(1000)[-1] == "panel999" and panel_module_names(1001)[-1] == "panel1000"
    assert sorted(panel_module_names(1001)) == panel_module_names(1001)


def test_incomplete_container_leaves_no_file(tmp_path):
    """An exception or a missing image: no file at the final name and no temporary left behind."""
    layout = _small_layout()
    images = _images(2, layout)
    with pytest.raises(ZeroDivisionError):
        with NXmxWriter(tmp_path / "a.h5", layout, 2) as writer:
            writer.write_image(0, images[0], 1.3)
            raise ZeroDivisionError("the writer's caller failed")
    with pytest.raises(RuntimeError, match="never written"):
        with NXmxWriter(tmp_path / "b.h5", layout, 2) as writer:
            writer.write_image(1, images[1], 1.3)
    assert list(tmp_path.iterdir()) == []


def test_jungfrau16m_geometry_round_trip(tmp_path):
    """The 256-panel Jungfrau 16M (4-level hierarchy) through the file: global frames within 1e-6,
    also through the stock dials.import."""
    layout = jungfrau16m_layout()
    image = np.zeros((1, 256, 254, 254), dtype=np.int32)
    image[0, 17, 100, 200] = 12345
    path = write_nxmx(tmp_path / "j16m.h5", layout, image, [1.8908])
    truth = detector_from_layout(layout)
    for experiments in (ExperimentListFactory.from_filenames([str(path)]), _dials_import(tmp_path, path)):
        assert len(experiments) == 1
        detector = experiments[0].detector
        _assert_same_geometry(detector, truth)
        assert detector.hierarchy().is_group() and len(detector.hierarchy()) == 1  # the root chain kept
        raw = experiments[0].imageset.get_raw_data(0)
        assert raw[17].as_numpy_array()[100, 200] == 12345 and sum(int(p.as_numpy_array().sum()) for p in raw) == 12345


def test_refined_jungfrau_with_rotated_groups(tmp_path, shared_data):
    """The refined SwissFEL geometry (rotated group frames) read from the shared .expt survives the
    file: rotations are written as NeXus rotation axes."""
    reference = ExperimentListFactory.from_json_file(
        str(shared_data / "detectors" / "jungfrau16M_single.expt"), check_format=False
    )[0].detector
    layout = layout_from_dxtbx_dict(reference.to_dict())
    path = write_nxmx(tmp_path / "refined.h5", layout, np.zeros((1, 256, 254, 254), dtype=np.int32), [1.89])
    with h5py.File(path, "r") as h5:
        kinds = {h5[f"/entry/instrument/detector/transformations/{k}"].attrs["transformation_type"]
                 for k in h5["/entry/instrument/detector/transformations"]}  # fmt: skip
    assert b"rotation" in kinds
    _assert_same_geometry(ExperimentListFactory.from_filenames([str(path)])[0].detector, reference)
