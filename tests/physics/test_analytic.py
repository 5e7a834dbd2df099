"""Intensity against closed forms written independently of the kernels (numpy/math only)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spread_dials.physics import (
    Crystal,
    PanelArray,
    Scene,
    constant_structure_factors,
    make_sources,
    simulate_dense,
    simulate_sparse,
)
from spread_dials.physics.constants import HC_EV_A, R_E_SQ_M2
from spread_dials.physics.geometry import capture_fraction, kahn_polarization, layer_mean_depth_mm, solid_angle
from spread_dials.physics.lattice import lattice_factor

D = torch.float64


def _one_pixel_scene(pixel_xy_mm, distance_mm, energy_eV, ncells, kahn, thickness_mm=0.0, att_mm=0.05, tilt=None):
    """A 1x1-pixel panel whose centre is at (x, y, -distance) and a crystal with h=(1,0,0) exactly there."""
    px = 0.05
    x, y = pixel_xy_mm
    fast = np.array([1.0, 0.0, 0.0]) if tilt is None else np.array(tilt)
    slow = np.array([0.0, 1.0, 0.0])
    centre = np.array([x, y, -distance_mm])
    origin = centre - 0.5 * px * fast - 0.5 * px * slow
    panels = PanelArray(
        origin_mm=torch.tensor(np.array([origin]), dtype=D), fast_axis=torch.tensor(np.array([fast]), dtype=D),
        slow_axis=torch.tensor(np.array([slow]), dtype=D), pixel_size_mm=torch.full((1, 2), px, dtype=D), image_size=(1, 1),
        thickness_mm=torch.tensor([thickness_mm], dtype=D), attenuation_length_mm=torch.tensor([att_mm], dtype=D),
    )  # fmt: skip
    k = energy_eV / HC_EV_A
    d_unit = centre / np.linalg.norm(centre)
    s_vec = (d_unit - np.array([0.0, 0.0, -1.0])) * k
    # real-space rows with a.S = 1, b.S = c.S = 0: a along S / |S|^2, b and c perpendicular
    a = s_vec / (s_vec @ s_vec)
    b = np.cross(s_vec, [0.0, 1.0, 0.3])
    b = 40.0 * b / np.linalg.norm(b)
    c = np.cross(s_vec, b)
    c = 45.0 * c / np.linalg.norm(c)
    crystal = Crystal(
        real_space=torch.tensor(np.stack([a, b, c]), dtype=D), ncells_abc=torch.tensor(ncells, dtype=D),
        domain_rotations=torch.eye(3, dtype=D).unsqueeze(0), shape="gauss",
    )  # fmt: skip
    sources = make_sources(torch.tensor([energy_eV], dtype=D), torch.ones(1, dtype=D), 1e25, polarization_fraction=kahn)
    return Scene(panels, sources, crystal, constant_structure_factors(12.5, torch.complex128)), centre, px


@pytest.mark.parametrize("xy,kahn", [((20.0, 0.0), 0.999), ((0.0, 25.0), 0.999), ((15.0, 15.0), 0.0)])
def test_single_reflection_on_one_pixel(xy, kahn):
    ncells = (6.0, 5.0, 4.0)
    scene, centre, px = _one_pixel_scene(xy, 80.0, 7100.0, ncells, kahn)
    r = np.linalg.norm(centre)
    omega = px * px / r**2 * (80.0 / r)  # area / R^2 * cos(obliquity)
    two_theta = math.acos(-centre[2] / r)
    phi = math.atan2(centre[1], centre[0])  # azimuth from the E vector (x)
    # Kahn: 0.5 (1 + cos^2 2t - K cos(2 psi) sin^2 2t), psi = azimuth from the polarization plane
    polar = 0.5 * (1 + math.cos(two_theta) ** 2 - kahn * math.cos(2 * phi) * math.sin(two_theta) ** 2)
    expected = R_E_SQ_M2 * 1e25 * 12.5**2 * np.prod(ncells) ** 2 * omega * polar
    for image in (simulate_dense(scene), simulate_sparse(scene)):
        assert float(image.sum()) == pytest.approx(expected, rel=1e-9)


def test_solid_angle_and_polarization_at_known_angles():
    pos = torch.tensor([[0.0, 0.0, -100.0], [100.0, 0.0, -100.0], [0.0, 100.0, -100.0]], dtype=D)
    normal = torch.tensor([0.0, 0.0, -1.0], dtype=D)
    omega = solid_angle(pos, normal, torch.tensor(0.01, dtype=D))
    expected = [0.01 / 100.0**2, 0.01 / 20000.0 * (100.0 / math.sqrt(20000.0)), 0.01 / 20000.0 * (100.0 / math.sqrt(20000.0))]
    assert omega.tolist() == pytest.approx(expected, rel=1e-12)
    incident = torch.tensor([0.0, 0.0, -1.0], dtype=D)
    e_vec = torch.tensor([1.0, 0.0, 0.0], dtype=D)
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]], dtype=D)  # 2theta 90 in / out of the E plane, forward
    full = kahn_polarization(incident, d, e_vec, 1.0)
    assert full.tolist() == pytest.approx([0.0, 1.0, 1.0], abs=1e-12)
    unpolarized = kahn_polarization(incident, d, e_vec, 0.0)
    assert unpolarized.tolist() == pytest.approx([0.5, 0.5, 1.0], abs=1e-12)


def test_capture_fraction_and_layer_depths():
    t, att, n = 0.32, 1.0 / 26.565, 4
    cos = torch.tensor([1.0, 0.6], dtype=D)
    z_front, z_mean = layer_mean_depth_mm(cos, torch.tensor(t, dtype=D), torch.tensor(att, dtype=D), n)
    cap = capture_fraction(cos.unsqueeze(-1), z_front, torch.tensor(t, dtype=D), torch.tensor(att, dtype=D), n)
    for i, p in enumerate((1.0, 0.6)):
        L = att * p
        total = 1.0 - math.exp(-t / L)
        assert float(cap[i].sum()) == pytest.approx(total, rel=1e-12)
        for layer in range(n):
            z0, z1 = layer * t / n, (layer + 1) * t / n
            assert float(cap[i, layer]) == pytest.approx(math.exp(-z0 / L) - math.exp(-z1 / L), rel=1e-12)
            # mean depth by numerical quadrature of z exp(-z / L) over the layer
            z = np.linspace(z0, z1, 200001)
            w = np.exp(-z / L)
            assert float(z_mean[i, layer]) == pytest.approx(np.trapz(z * w, z) / np.trapz(w, z), rel=1e-8)


def test_thick_sensor_pixel_equals_product_of_factors():
    """A 1-pixel still with a 0.32 mm sensor: capture 1 - exp(-t / (L cos)) and the solid angle
    at the mean absorption depth z = L cos - t / (exp(t / (L cos)) - 1) enter as factors."""
    thin, centre, _ = _one_pixel_scene((10.0, 5.0), 60.0, 6550.0, (5.0, 5.0, 5.0), 0.999)
    thick, _, _ = _one_pixel_scene((10.0, 5.0), 60.0, 6550.0, (5.0, 5.0, 5.0), 0.999, thickness_mm=0.32, att_mm=0.0376)
    ratio = float(simulate_dense(thick).sum() / simulate_dense(thin).sum())
    r = np.linalg.norm(centre)
    cos = 60.0 / r
    depth_scale = 0.0376 * cos
    z = depth_scale - 0.32 / math.expm1(0.32 / depth_scale)
    deep = centre + np.array([0.0, 0.0, -z])
    omega_ratio = ((60.0 + z) / np.linalg.norm(deep) ** 3) / (60.0 / r**3)
    # the deeper point also moves the ray off the exact Bragg condition: F_latt^2 changes < 3e-5
    assert ratio == pytest.approx((1.0 - math.exp(-0.32 / depth_scale)) * omega_ratio, rel=1e-4)


@pytest.mark.parametrize("shape", ["square", "gauss", "tophat", "round"])
def test_lattice_peak_and_zeros(shape):
    n = torch.tensor([5.0, 6.0, 7.0], dtype=D)
    peak = float(lattice_factor(torch.zeros(3, dtype=D), n, shape))
    norm = 0.723601254558268 if shape == "round" else 1.0
    assert peak**2 == pytest.approx((5 * 6 * 7 * norm) ** 2, rel=1e-12)
    if shape == "square":  # zeros at dh = j / N along each axis
        for axis, nn in enumerate((5, 6, 7)):
            for j in range(1, nn // 2 + 1):
                dh = torch.zeros(3, dtype=D)
                dh[axis] = j / nn
                assert abs(float(lattice_factor(dh, n, shape))) < 1e-9 * peak
    if shape == "round":  # first zero of 3 (sin x - x cos x) / x^3 at x = 4.493409457909064
        dh = torch.tensor([4.493409457909064 / math.pi / 5.0, 0.0, 0.0], dtype=D)
        assert abs(float(lattice_factor(dh, n, shape))) < 1e-9 * peak
    if shape == "gauss":  # exp(-hrad / 0.63) with hrad = sum (N dh)^2
        dh = torch.tensor([0.05, -0.03, 0.02], dtype=D)
        hrad = float(((dh * n) ** 2).sum())
        assert float(lattice_factor(dh, n, shape)) == pytest.approx(210.0 * math.exp(-hrad / 0.63), rel=1e-12)
    if shape == "tophat":
        inside = torch.tensor([0.6 / 5.0, 0.0, 0.0], dtype=D)
        outside = torch.tensor([0.64 / 5.0, 0.0, 0.0], dtype=D)
        assert float(lattice_factor(inside, n, shape)) == peak and float(lattice_factor(outside, n, shape)) == 0.0
