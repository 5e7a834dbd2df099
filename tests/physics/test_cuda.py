"""CUDA equals CPU for both kernels, and the same seed gives identical noise on the GPU."""

from __future__ import annotations

import pytest
import torch

from spread_dials.physics import predict_windows, simulate_dense, simulate_sparse
from spread_dials.physics.detector_response import add_noise

from .scene_factory import small_scene

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_cuda_equals_cpu(dtype, rel):
    scene = small_scene(n_layers=2, divergence_mrad=0.5, divergence_steps=2, n_channels=3, dtype=dtype)
    cpu_dense = simulate_dense(scene)
    cpu_sparse = simulate_sparse(scene)
    gpu = scene.to("cuda")
    gpu_dense = simulate_dense(gpu).cpu()
    gpu_sparse = simulate_sparse(gpu).cpu()
    peak = float(cpu_dense.max())
    assert float((gpu_dense - cpu_dense).abs().max()) <= rel * peak
    assert float((gpu_sparse - cpu_sparse).abs().max()) <= rel * peak
    # the same windows are predicted on both devices
    assert predict_windows(gpu).n_windows == predict_windows(scene).n_windows


def test_same_seed_same_noise_on_cuda():
    rate = torch.full((16, 254, 254), 3.0, device="cuda")
    a = add_noise(rate, torch.Generator(device="cuda").manual_seed(3), readout_noise_adu=0.3)
    b = add_noise(rate, torch.Generator(device="cuda").manual_seed(3), readout_noise_adu=0.3)
    c = add_noise(rate, torch.Generator(device="cuda").manual_seed(4), readout_noise_adu=0.3)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_compiled_kernels_equal_eager_on_cuda():
    """torch.compile'd sparse kernel and background give the eager numbers (float64)."""
    from spread_dials.physics.background import WATER_F_BG, AmorphousMaterial, background_photons

    scene = small_scene(n_channels=3, n_domains=2).to("cuda")
    eager = simulate_sparse(scene)
    fused = simulate_sparse(scene, compiled=True)
    assert float((eager - fused).abs().max()) <= 1e-9 * float(eager.max())
    water = [AmorphousMaterial(torch.tensor(WATER_F_BG), 0.01, 1.0, 18.0)]
    bg_eager = background_photons(scene.panels, scene.sources, water, 1e12)
    bg_fused = background_photons(scene.panels, scene.sources, water, 1e12, compiled=True)
    assert float((bg_eager - bg_fused).abs().max()) <= 1e-9 * float(bg_eager.max())


def test_compiled_prediction_equals_eager_on_cuda():
    """torch.compile'd window prediction (dynamic shapes) gives exactly the eager windows, for
    scenes of different sizes (one compilation serves them all)."""
    for n_channels, n_domains, energy_eV in ((3, 2, 9000.0), (7, 5, 8500.0)):
        scene = small_scene(n_channels=n_channels, n_domains=n_domains, energy_eV=energy_eV).to("cuda")
        eager = predict_windows(scene, 1e-6)
        fused = predict_windows(scene, 1e-6, compiled=True)
        assert eager.n_windows > 0
        for name in eager.__dataclass_fields__:
            assert torch.equal(getattr(eager, name), getattr(fused, name)), name


def test_compiled_kernel_serves_every_still_without_recompiling():
    """Stills differ in their number of windows: after two stills the fused kernel has made that
    size symbolic, and a third still of another size runs without compiling again (a kernel
    compiled for static sizes would recompile every still, then fall back to eager)."""
    import torch._dynamo

    from spread_dials.physics.sparse import simulate_sparse_windows

    def still(energy_eV):
        scene = small_scene(n_channels=3, n_domains=2, energy_eV=energy_eV).to("cuda")
        windows = predict_windows(scene, 1e-6, compiled=True)
        return windows.n_windows, simulate_sparse_windows(scene, windows, compiled=True)[0]

    sizes = [still(9000.0)[0], still(8500.0)[0]]
    with torch._dynamo.config.patch(error_on_recompile=True):
        n_windows, image = still(8000.0)
    assert len({*sizes, n_windows}) == 3 and float(image.sum()) > 0


def test_compiled_profile_gradient_equals_eager_on_cuda():
    """The fused (torch.compile) per-channel profiles and their closed-form derivatives in the
    crystal's real space equal the eager ones on the GPU and on the CPU (float64)."""
    from spread_dials.physics.sparse import window_channel_profiles

    scene = small_scene(n_channels=3, n_domains=2, n_layers=2)
    windows = predict_windows(scene, 1e-4)
    real, rotations = scene.crystal.domain_real_space(), scene.crystal.domain_rotations
    cpu = window_channel_profiles(scene, windows, None, real, rotations)
    args = (scene.to("cuda"), windows.to("cuda"), None, real.cuda(), rotations.cuda())
    for made in (window_channel_profiles(*args), window_channel_profiles(*args, compiled=True)):
        for a, b in zip(made, cpu):
            assert float(b.abs().max()) > 0
            assert float((a.cpu() - b).abs().max()) <= 1e-9 * float(b.abs().max())
