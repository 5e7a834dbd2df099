"""Simulate one XFEL still with the spread_dials physics core and draw it (the `make demo` job).

The crystal is a rubredoxin-sized P 21 21 21 cell (34.1 x 34.9 x 43.7 A) with Wilson-like
structure factors (until the structure-factor module lands), the beam a Gaussian SASE-like band
at the Fe K edge, the detector the Jungfrau 16M built in code.  Writes still.png and a summary
to output.directory.

Examples::

  python -m spread_dials.command_line.demo output.directory=demo_output
  python -m spread_dials.command_line.demo detector=simple nchannels=5 device.name=cpu
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from libtbx.phil import parse

from spread_dials.util.program import Program, handle_errors

logger = logging.getLogger("dials.spread.demo")

phil_scope = parse(
    """
include scope spread_dials.phil.common.common_phil
detector = *jungfrau16m simple
  .type = choice
  .help = "jungfrau16m: 256 panels built in code; simple: 2 x 2 panels of 512 x 512 at 0.075 mm"
energy_eV = 7100
  .type = float(value_min=1000)
  .help = "Mean photon energy (eV)"
bandwidth_eV = 20
  .type = float(value_min=0)
  .help = "FWHM of the Gaussian spectrum (eV)"
nchannels = 40
  .type = int(value_min=1)
  .help = "Spectral channels of 1 eV"
mosaic_domains = 10
  .type = int(value_min=1)
  .help = "Mosaic domains"
mosaic_spread_deg = 0.05
  .type = float(value_min=0)
  .help = "Isotropic mosaic spread (degrees)"
ncells_abc = 50 50 40
  .type = floats(size=3, value_min=1)
  .help = "Unit cells per mosaic domain along a, b, c"
photons = 1e12
  .type = float(value_min=0)
  .help = "Photons in the pulse"
beam_diameter_um = 1
  .type = float(value_min=0)
  .help = "Beam diameter (um); fluence = photons / area"
spot_scale = 30
  .type = float(value_min=0)
  .help = "Number of mosaic blocks in the crystal (scales the Bragg intensity)"
water_thickness_um = 5
  .type = float(value_min=0)
  .help = "Water in the beam (um)"
""",
    process_includes=True,
)

program = Program(
    "dials.spread_demo", usage="python -m spread_dials.command_line.demo [key=value ...]", help=__doc__, phil=phil_scope
)


@handle_errors
def run(args=None, phil=phil_scope) -> None:
    ctx = program.start(args, phil=phil)
    p = ctx.params
    from spread_dials.detectors.jungfrau import jungfrau16m_panel_array
    from spread_dials.detectors.layout import panel_array_from_layout, silicon_mu_per_mm
    from spread_dials.detectors.simple import simple_detector
    from spread_dials.physics import (
        Crystal, Scene, StructureFactors, gaussian_spectrum, make_sources, mosaic_domain_rotations,
        real_space_from_cell, rotation_from_vector,
    )  # fmt: skip
    from spread_dials.physics.background import WATER_F_BG
    from spread_dials.physics.sparse import miller_indices_within
    from spread_dials.physics.still import AmorphousMaterial, DetectorResponse, detector_counts, expected_photons
    from spread_dials.plots.detector_image import plot_still

    seed = p.random.seed
    dtype, device = ctx.dtype, ctx.device
    if p.detector == "jungfrau16m":
        panels = jungfrau16m_panel_array(energy_eV=p.energy_eV)
    else:
        layout = simple_detector(512, 512, 0.075, 80.0, 2, 2, gap_mm=0.5, thickness_mm=0.32,
                                 mu_per_mm=silicon_mu_per_mm(p.energy_eV))  # fmt: skip
        panels = panel_array_from_layout(layout)
    energy, weight = gaussian_spectrum(p.energy_eV, p.bandwidth_eV, p.nchannels, 1.0)
    area_m2 = math.pi * (0.5e-6 * p.beam_diameter_um) ** 2
    sources = make_sources(energy, weight, p.photons / area_m2)
    gen = torch.Generator().manual_seed(seed)
    cell = torch.tensor([34.1, 34.9, 43.7, 90.0, 90.0, 90.0], dtype=torch.float64)
    crystal = Crystal(
        real_space=real_space_from_cell(cell, rotation_from_vector(math.pi * torch.rand(3, generator=gen, dtype=torch.float64))),
        ncells_abc=torch.tensor(p.ncells_abc, dtype=torch.float64),
        domain_rotations=mosaic_domain_rotations(p.mosaic_spread_deg, p.mosaic_domains, seed=seed + 1),
        spot_scale=p.spot_scale,
    )
    hkl = miller_indices_within(real_space_from_cell(cell), 1.5)
    q2 = ((hkl.double() @ torch.linalg.inv(real_space_from_cell(cell)).T) ** 2).sum(-1)
    amp = (-torch.log1p(-torch.rand(hkl.shape[0], generator=gen, dtype=torch.float64))).sqrt() * 200.0
    amp = amp * torch.exp(-15.0 * q2 / 4.0)
    F = torch.polar(amp, 2 * math.pi * torch.rand(hkl.shape[0], generator=gen, dtype=torch.float64))
    scene = Scene(panels, sources, crystal, StructureFactors(miller_index=hkl, F0=F)).to(device=device, dtype=dtype)
    water = AmorphousMaterial(torch.tensor(WATER_F_BG), p.water_thickness_um * 1e-3, 1.0, 18.0)
    logger.info("Simulating one still: %d panels, %d channels, %d mosaic domains on %s",
                panels.n_panels, p.nchannels, p.mosaic_domains, device)  # fmt: skip
    t0 = time.perf_counter()
    with torch.no_grad():
        result = expected_photons(scene, (water,), p.photons, compiled=device.type == "cuda")
        counts = detector_counts(result.total, DetectorResponse(), torch.Generator(device=device).manual_seed(seed))
    seconds = time.perf_counter() - t0
    image = counts.cpu().numpy()
    png = plot_still(
        image, panels.origin_mm.numpy(), panels.fast_axis.numpy(), panels.slow_axis.numpy(),
        panels.pixel_size_mm.numpy(), ctx.output_path("still.png"),
        title=f"{p.detector}: {p.nchannels} channels around {p.energy_eV:.0f} eV, {p.mosaic_domains} domains",
    )  # fmt: skip
    logger.info("Bragg photons %.4g, background photons %.4g, %d windows, %.2f s", float(result.bragg.sum()),
                float(result.background.sum()), result.windows.n_windows, seconds)  # fmt: skip
    bright = int((result.bragg.cpu().numpy() > 1.0).sum())
    logger.info("Pixels with > 1 expected Bragg photon: %d; max counts %d", bright, int(np.max(image)))
    logger.info("Wrote %s", png)


if __name__ == "__main__":
    run()
