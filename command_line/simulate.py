"""Simulate serial-crystallography XFEL stills into NXmx containers that stock DIALS reads.

Each shot is a still of a randomly oriented mosaic crystal in one XFEL pulse (a spectrum of
channels), simulated with the spread_dials sparse kernel (Bragg spots of every channel and
mosaic domain), plus water/air background and the detector response.  Images go into
multi-image NXmx HDF5 containers (gzip) with the ground truth beside them:

  <prefix>_NNNNN.h5     images, per-image wavelength, /entry/spread: spectra, A matrices,
                        mosaic domain rotations, fluence and seeds of every shot
  <prefix>_NNNNN.expt   the true models, one experiment per shot (imageset -> container, index)
  <prefix>_NNNNN.refl   the true Bragg spots: miller_index, panel, xyzcal.px, intensity.sum.value
  <prefix>.expt/.refl   all containers together (written at the end)
  <prefix>_run.json     the full PHIL, structure-factor source, f'/f'' of every site, summary

A rerun with the same parameters skips finished containers (so a killed run resumes); changed
parameters in a directory that already holds a run are refused unless output.overwrite=True.

Examples::

  dials.spread_simulate nimages=20 output.directory=sim
  (rubredoxin.phil and psii.phil name the files shipped in spread_dials/phil unless a file of
  that name exists in the working directory)
  dials.spread_simulate rubredoxin.phil detector.type=simple nimages=4 noise.enable=False
  dials.spread_simulate psii.phil structure.file=psii_oec.pdb nimages=1000 device.name=cuda
  mpirun -n 4 dials.spread_simulate psii.phil structure.file=psii_oec.pdb mp.method=mpi
  dials.import sim/images_00000.h5        # stock DIALS reads the images
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from libtbx.phil import parse

from spread_dials.util.program import Program, handle_errors

logger = logging.getLogger("dials.spread.simulate")

phil_str = """
include scope spread_dials.phil.common.device_phil
include scope spread_dials.phil.common.mp_phil
include scope spread_dials.phil.common.random_phil
output
  .help = "Where the images and the ground truth go"
{
  directory = simulated
    .type = path
    .help = "Directory for the containers, truth files and log; created if missing"
  prefix = images
    .type = str
    .help = "File name prefix: <prefix>_00000.h5, <prefix>.expt, <prefix>_run.json ..."
  images_per_container = 10
    .type = int(value_min=1)
    .help = "Shots per NXmx HDF5 container (the unit of restart and of MPI work)"
  compression = *gzip none
    .type = choice
    .help = "gzip (with the shuffle filter; stock DIALS reads it with no plugin) or none"
  compression_level = 1
    .type = int(value_min=1, value_max=9)
    .help = "gzip (deflate) level: 1 fast ... 9 small. The isal encoder has levels 1-3 (higher"
            "levels use 3); on still-like counts its level 1 is both its fastest and smallest"
    .expert_level = 1
  deflate = *isal zlib
    .type = choice
    .help = "Encoder of the gzip chunks: isal (Intel ISA-L through python-isal, ~4.7x faster"
            "than zlib at level 1) or zlib (the bytes HDF5 itself would write). Both are"
            "standard deflate streams: every HDF5 reader decodes them with no plugin"
    .expert_level = 1
  compression_workers = Auto
    .type = int(value_min=0)
    .help = "Threads that compress image chunks (HDF5 gzip + shuffle, written with direct"
            "chunk writes) while the main thread simulates the next shots. Auto: the cores"
            "left after the simulating thread (shared among MPI ranks on one node), at most 4"
            "with deflate=isal. 0: the main thread compresses and writes each container"
            "itself, in turn"
  overwrite = False
    .type = bool
    .help = "Start again in a directory that holds a run made with other parameters (its"
            "containers and truth files of this prefix are deleted). Without it such a run"
            "is refused, and a rerun with the same parameters resumes."
  log = None
    .type = path
    .help = "Log file; None: dials.spread_simulate.log inside output.directory"
    .expert_level = 1
}
nimages = 10
  .type = int(value_min=1)
  .help = "Number of shots (stills) to simulate"
include scope spread_dials.phil.structure.structure_phil
include scope spread_dials.phil.structure.anomalous_phil
crystal
  .help = "The mosaic crystal of every shot (unit cell and space group come from the model;"
          "the resolution limit is structure.d_min)"
{
  domain_size_A = 4000
    .type = float(value_min=1)
    .help = "Effective mosaic domain size (A): the diameter of a sphere of the domain's"
            "volume. Sets the unit cells of a domain (crystal.ncells_abc, the spot size):"
            "pi/6 domain_size_A^3 / V_cell cells, with one real-space extent along a, b, c"
  length_um = 4
    .type = float(value_min=0)
    .help = "Crystal path length along the beam (um). With beam.diameter_um it sets the"
            "illuminated volume pi/4 diameter^2 length (a crystal at least as wide as the"
            "beam), hence the domains in the beam (crystal.spot_scale)"
  ncells_abc = None
    .type = floats(size=3, value_min=1)
    .help = "Explicit unit cells of one mosaic domain along a, b, c (sets the spot size)."
            "None: derived from domain_size_A. When given it wins; the derived spot scale"
            "then counts domains of these cells, so the cells in the beam stay the same"
  mosaic_spread_deg = 0.05
    .type = float(value_min=0)
    .help = "rms rotation angle of the mosaic domains (degrees): each domain turns about a"
            "uniformly random axis by an angle drawn from N(0, mosaic_spread_deg), as in the"
            "seed's simtbx scripts (LS49, ExaFEL). The rocking about any one axis has rms"
            "mosaic_spread_deg / sqrt(3)"
  anisotropic_spread_deg = None
    .type = floats(size=3, value_min=0)
    .help = "Optional spreads along the a, b, c axes (degrees), instead of the isotropic"
            "spread: the components of the random rotation along a, b, c are scaled by one"
            "each, so three equal values are the isotropic spread of that value"
    .expert_level = 1
  mosaic_domains = 10
    .type = int(value_min=1)
    .help = "Mosaic domains per shot (drawn per shot from its seed, in antithetic pairs)"
  domain_set = *random quadrature
    .type = choice
    .help = "random: each shot draws its domains from its seed (the few domains of a small"
            "crystal; spots differ from shot to shot). quadrature: the same deterministic"
            "equal-weight quadrature of the mosaic distribution on every shot (the limit of"
            "a crystal of very many domains; spread_dials/physics/mosaic_quadrature.py)"
  shape = *gauss square round tophat
    .type = choice
    .help = "Lattice transform of a domain (nanoBragg's shapes)"
  orientation = *random fixed
    .type = choice
    .help = "random: a uniformly distributed orientation per shot from the seed. fixed: the"
            "model's setting rotated by fixed_rotation_deg, the same for every shot"
  fixed_rotation_deg = 0 0 0
    .type = floats(size=3)
    .help = "Rotation vector (axis times angle, degrees) of the fixed orientation"
  spot_scale = None
    .type = float(value_min=0)
    .help = "Explicit number of domains in the beam (the dimensionless scale of the Bragg"
            "intensity). None: the illuminated volume over the volume of one domain of"
            "ncells_abc cells. When given it wins: with the fluence and ncells_abc it alone"
            "sets the Bragg brightness"
    .expert_level = 1
}
beam
  .help = "The XFEL pulse (lab frame: beam along -z, electric field along x)"
{
  energy_eV = None
    .type = float(value_min=1000)
    .help = "Mean photon energy (eV). None: the structure preset's (rubredoxin 7120, psii 6550)"
  spectrum = gaussian *sase monochromatic file
    .type = choice
    .help = "gaussian: the same Gaussian band every shot. sase: a seeded spiky SASE spectrum"
            "per shot. monochromatic: one channel. file: measured spectra (spectrum_file),"
            "shot i takes spectrum i modulo their number"
  nchannels = None
    .type = int
    .help = "Spectral channels (>= 1) on a grid centred on energy_eV. None: 40, or with"
            "spectrum=file as many as hold every measured spectrum. A window narrower than"
            "the measured spectra drops their outer photons (the run says what fraction)"
  channel_width_eV = 1.0
    .type = float
    .help = "Width of one channel (eV)"
  fwhm_eV = 15.0
    .type = float(value_min=0)
    .help = "FWHM of the Gaussian band, or of the envelope of the SASE spikes (eV)"
  sase
    .help = "The synthetic SASE spectra"
  {
    n_spikes = 20
      .type = int(value_min=1)
      .help = "Spikes (longitudinal modes) per pulse"
    spike_fwhm_eV = 1.5
      .type = float(value_min=0.001)
      .help = "FWHM of one spike (eV)"
  }
  spectrum_file = None
    .type = path
    .help = ".npz with energies_eV (m,) or (n, m) and weights (n, m); the spectra are moved"
            "so that their mean centroid is energy_eV, then rebinned to the channels"
  photons = 1e12
    .type = float
    .help = "Photons per pulse at the sample (> 0)"
  diameter_um = 1.0
    .type = float
    .help = "Diameter of the round top-hat beam (um, > 0). It sets both the fluence,"
            "photons / (pi/4 diameter^2), and the illuminated crystal volume, pi/4"
            "diameter^2 crystal.length_um, so with a derived spot scale the Bragg photons do"
            "not depend on it (docs/brightness.md)"
  polarization_fraction = 0.999
    .type = float(value_min=0, value_max=1)
    .help = "Kahn polarization factor (electric field along lab x)"
  divergence_mrad = 0
    .type = float(value_min=0)
    .help = "Full beam divergence (mrad), sampled on a divergence_steps x divergence_steps grid"
    .expert_level = 1
  divergence_steps = 1
    .type = int(value_min=1)
    .help = "Divergence grid points per axis"
    .expert_level = 1
}
detector
  .help = "The detector"
{
  type = *jungfrau16m simple
    .type = choice
    .help = "jungfrau16m: the 256-panel Jungfrau 16M built in code. simple: a grid of panels"
            "(detector.simple). Ignored when detector.file is given"
  file = None
    .type = path
    .help = "An experiment list (.expt) whose first detector is used instead (any dxtbx"
            "detector with panels of one size)"
  distance_mm = None
    .type = float(value_min=1)
    .help = "Sample to detector distance (mm). None: 119.5 (jungfrau16m), 100 (simple)"
  thickness_mm = 0.32
    .type = float(value_min=0)
    .help = "Si sensor thickness (mm) of the built-in detectors (0: no sensor model)"
  n_layers = 1
    .type = int(value_min=1)
    .help = "Sensor depth layers integrated over (absorption and parallax)"
    .expert_level = 1
  oversample = 1
    .type = int(value_min=1)
    .help = "Sub-pixels per pixel edge"
    .expert_level = 1
  simple
    .help = "The simple detector: n_x x n_y panels facing the beam"
  {
    n_fast = 256
      .type = int(value_min=1)
      .help = "Pixels per panel along fast"
    n_slow = 256
      .type = int(value_min=1)
      .help = "Pixels per panel along slow"
    pixel_mm = 0.075
      .type = float(value_min=0)
      .help = "Pixel size (mm)"
    panels = 2 2
      .type = ints(size=2, value_min=1)
      .help = "Panels along x and y"
    gap_mm = 1.0
      .type = float(value_min=0)
      .help = "Gap between panels (mm)"
    tilt_deg = 0
      .type = float
      .help = "Tilt of the last panel about its slow axis (degrees)"
  }
}
background
  .help = "Amorphous scattering in the beam (computed once at the nominal energy and scaled"
          "by each shot's photons)"
{
  water_thickness_um = 5
    .type = float(value_min=0)
    .help = "Water (jet or drop) in the beam (um)"
  air_thickness_mm = 0
    .type = float(value_min=0)
    .help = "Air path seen by the detector (mm)"
}
noise
  .help = "Detector response after the PSF"
{
  enable = True
    .type = bool
    .help = "Poisson photon noise, gain error and readout noise. False: expected photons"
            "times quantum_gain plus adc_offset, rounded to integers"
  quantum_gain = 1.0
    .type = float(value_min=0)
    .help = "ADU per photon"
  readout_noise_adu = 0
    .type = float(value_min=0)
    .help = "rms Gaussian readout noise (ADU)"
  gain_error_rms = 0
    .type = float(value_min=0)
    .help = "rms of the fixed per-pixel calibration (gain) error, as a fraction"
  adc_offset_adu = 0
    .type = float
    .help = "Constant ADC offset (ADU)"
}
model_errors
  .help = "Effects put into the images that the recorded metadata does not describe, for"
          "validating refinement and model correction. The truth records the true and the"
          "recorded values. (A PSF, a per-pixel gain error and anisotropic mosaicity are set"
          "with psf.fwhm_px, noise.gain_error_rms and crystal.anisotropic_spread_deg.)"
{
  spectrometer_offset_eV = 0
    .type = float
    .help = "Calibration offset of the spectrometer: the recorded energy axis (spectrum and"
            "wavelength written to the container) is the true one plus this (eV)"
  energy_jitter_eV = 0
    .type = float(value_min=0)
    .help = "rms of a further per-shot shift of the recorded energy axis (eV), seeded per shot"
  panel_gain_rms = 0
    .type = float(value_min=0)
    .help = "rms of a fixed per-panel gain error (fraction), seeded by random.seed; needs noise"
}
psf
  .help = "Point-spread function"
{
  fwhm_px = 0
    .type = float(value_min=0)
    .help = "Gaussian PSF FWHM (pixels); 0: off"
}
tolerance = 1e-6
  .type = float(value_min=0)
  .help = "Sparse kernel: largest lattice-factor fraction F_latt^2 / peak^2 left out"
  .expert_level = 2
"""

phil_scope = parse(phil_str, process_includes=True)

program = Program(
    "dials.spread_simulate",
    usage="dials.spread_simulate [options] [params.phil] [key=value ...]",
    help=__doc__,
    phil=phil_scope,
)


def shipped_phil_files(args: list[str]) -> list[str]:
    """Arguments with a bare ``name.phil`` that is not a file here replaced by the shipped one
    (spread_dials/phil: rubredoxin.phil, psii.phil)."""
    import spread_dials.phil

    shipped = Path(spread_dials.phil.__file__).parent
    out = []
    for arg in args:
        if arg.endswith(".phil") and "=" not in arg and not Path(arg).exists() and (shipped / arg).is_file():
            arg = str(shipped / arg)
        out.append(arg)
    return out


@handle_errors
def run(args=None, phil=phil_scope) -> None:
    """Parse the command line and run the simulation (see the module docstring)."""
    ctx = program.start(shipped_phil_files(sys.argv[1:] if args is None else args), phil=phil)
    from spread_dials.simulation.run import run_simulation

    run_simulation(ctx, program_phil=phil)


if __name__ == "__main__":
    run()
