"""From the dials.spread_simulate PHIL to everything a run shares: detector, structure factors
per channel, spectra, background and detector response, with bad input turned into SpreadError.

:func:`check_parameters` is cheap (no cctbx work) and runs first on every rank;
:func:`build_setup` loads the model and computes F0, G and the sites' f'/f''.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spread_dials.detectors.layout import (
    DetectorLayout,
    layout_from_dxtbx_dict,
    panel_array_from_layout,
    silicon_mu_per_mm,
)
from spread_dials.physics.beam import gaussian_spectrum
from spread_dials.physics.constants import HC_EV_A
from spread_dials.physics.geometry import PanelArray
from spread_dials.physics.microcrystal import Brightness, brightness
from spread_dials.physics.sparse import detector_d_max, detector_d_min
from spread_dials.physics.spectra import (
    channel_energies,
    rebin_spectrum,
    sase_spectrum,
    spectrum_centroid,
    window_fraction,
)
from spread_dials.physics.still import AmorphousMaterial, DetectorResponse
from spread_dials.simulation.plan import ShotPlan, container_shots, shot_seeds, uniform_rotation
from spread_dials.util.errors import SpreadError, require_file

__all__ = ["PRESET_ENERGY_EV", "RunSetup", "build_setup", "check_parameters", "make_detector", "plan_shot"]

logger = logging.getLogger("dials.spread.simulate.setup")

#: beam.energy_eV = None takes the structure preset's: the Fe K edge region for rubredoxin,
#: the Mn K edge region for PSII
PRESET_ENERGY_EV = {"rubredoxin": 7120.0, "psii": 6550.0}
#: water and air (mean N2/O2) for the amorphous background: density (g/cm^3), molecular weight
WATER = (1.0, 18.015)
AIR = (1.2e-3, 28.96)


def mean_energy_eV(params) -> float:
    """The beam's nominal mean energy (eV)."""
    return float(params.beam.energy_eV or PRESET_ENERGY_EV[params.structure.preset])


def check_parameters(params) -> None:
    """Reject bad input before any heavy work (raises SpreadError with a one-line message)."""
    beam = params.beam
    if beam.spectrum != "monochromatic" and beam.nchannels is not None and beam.nchannels < 1:
        raise SpreadError(f"beam.nchannels must be at least 1 (spectral channels), not {beam.nchannels}")
    if beam.spectrum != "monochromatic" and beam.nchannels != 1 and not (beam.channel_width_eV or 0) > 0:
        raise SpreadError(f"beam.channel_width_eV must be > 0 eV, not {beam.channel_width_eV}")
    if beam.photons is None or not beam.photons > 0 or not math.isfinite(beam.photons):
        raise SpreadError(f"beam.photons (photons per pulse, sets the fluence) must be > 0, not {beam.photons}")
    if beam.diameter_um is None or not beam.diameter_um > 0:
        raise SpreadError(f"beam.diameter_um must be > 0 um, not {beam.diameter_um}")
    if params.crystal.spot_scale is None and not params.crystal.length_um > 0:
        raise SpreadError(f"crystal.length_um must be > 0 um (the crystal in the beam), not {params.crystal.length_um}")
    if beam.spectrum == "gaussian" and not beam.fwhm_eV > 0:
        raise SpreadError(f"beam.fwhm_eV={beam.fwhm_eV:g}: a Gaussian band needs a width > 0 eV; for one energy set "
                          "beam.spectrum=monochromatic")  # fmt: skip
    if beam.spectrum == "file":
        if not beam.spectrum_file:
            raise SpreadError("beam.spectrum=file needs beam.spectrum_file=/path/to/spectra.npz")
    elif beam.spectrum_file:
        raise SpreadError(f"beam.spectrum_file is given but beam.spectrum={beam.spectrum}, which does not read it; "
                          "set beam.spectrum=file to use the measured spectra, or drop beam.spectrum_file")  # fmt: skip
    inputs = [("beam.spectrum_file", beam.spectrum_file), ("structure.file", params.structure.file),
              ("detector.file", params.detector.file)]  # fmt: skip
    inputs += [("anomalous.reference_files", path) for path in params.anomalous.reference_files or [] if path]
    for parameter, path in inputs:
        if path is not None:
            require_file(path, parameter)
    if params.structure.preset == "psii" and params.structure.file is None:
        raise SpreadError("the psii preset needs the model: structure.file=/path/to/psii_oec.pdb")
    if params.output.compression == "gzip" and params.output.deflate == "isal":
        try:
            import isal.isal_zlib  # noqa: F401  the encoder the compression threads will use
        except ImportError:
            raise SpreadError("output.deflate=isal needs python-isal (pip install isal); or set output.deflate=zlib") from None


def _layout_from_file(path: str) -> DetectorLayout:
    from dxtbx.model.experiment_list import ExperimentListFactory

    try:
        experiments = ExperimentListFactory.from_json_file(str(path), check_format=False)
    except Exception as e:  # noqa: BLE001  dxtbx raises many kinds for a bad file
        why = _unholdable_axes(path) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise SpreadError(f"detector.file {path!r} is not an experiment list dxtbx can read: {why}") from None
    detectors = experiments.detectors()
    if not detectors:
        raise SpreadError(f"detector.file {path!r} holds no detector")
    try:
        return layout_from_dxtbx_dict(detectors[0].to_dict())
    except (ValueError, KeyError) as e:
        raise SpreadError(f"detector.file {path!r}: {e}") from None


def _unholdable_axes(path: str) -> str | None:
    """Why dxtbx refuses the detectors of experiment list ``path`` (JSON), if it is the axes:
    every panel and hierarchy group needs a fast and a slow axis at right angles (dxtbx asserts
    it with no word of which); None if they all have them or the file is no such JSON."""
    import json

    try:
        with open(path) as f:
            detectors = json.load(f)["detector"]
    except (OSError, ValueError, KeyError, TypeError):
        return None

    def nodes(detector):
        yield from (("panel", i, p) for i, p in enumerate(detector.get("panels", [])))
        stack = [detector["hierarchy"]] if "hierarchy" in detector else []
        while stack:
            group = stack.pop()
            if "panel" not in group:
                yield "hierarchy group", group.get("name", "?"), group
                stack.extend(group.get("children", []))

    for kind, which, node in (n for detector in detectors for n in nodes(detector)):
        try:
            fast, slow = (np.asarray(node[k], dtype=float) for k in ("fast_axis", "slow_axis"))
            cos = float(fast @ slow / (np.linalg.norm(fast) * np.linalg.norm(slow)))
        except (KeyError, TypeError, ValueError):
            continue
        if not abs(cos) < 1e-6:
            return (f"{kind} {which} ({node.get('name', '')}) has fast_axis {fast.tolist()} and slow_axis "
                    f"{slow.tolist()} at {math.degrees(math.acos(max(-1.0, min(1.0, cos)))):.3g} degrees; "
                    "dxtbx holds only axes at right angles")  # fmt: skip
    return None


def make_detector(params, energy_eV: float) -> tuple[DetectorLayout, str]:
    """The detector layout (mu of Si at ``energy_eV``) and a short description."""
    det = params.detector
    mu = float(silicon_mu_per_mm(energy_eV))
    if det.file is not None:
        layout = _layout_from_file(det.file)
        if layout.material not in ("Si", "", None):
            logger.warning("detector.file has a %s sensor; the simulation and the containers use Si", layout.material)
        layout = dataclasses.replace(layout, mu_per_mm=mu if layout.thickness_mm > 0 else 0.0, material="Si")
        return layout, f"{det.file} ({len(_panels(layout))} panels)"
    if det.type == "jungfrau16m":
        from spread_dials.detectors.jungfrau import DISTANCE_MM, jungfrau16m_layout

        distance = det.distance_mm or DISTANCE_MM
        layout = jungfrau16m_layout(distance_mm=distance, thickness_mm=det.thickness_mm, mu_per_mm=mu)
        return layout, f"Jungfrau 16M at {distance:g} mm"
    from spread_dials.detectors.simple import simple_detector

    s = det.simple
    distance = det.distance_mm or 100.0
    layout = simple_detector(
        s.n_fast, s.n_slow, s.pixel_mm, distance, s.panels[0], s.panels[1], gap_mm=s.gap_mm,
        thickness_mm=det.thickness_mm, mu_per_mm=mu if det.thickness_mm > 0 else 0.0, tilt_deg=s.tilt_deg,
    )  # fmt: skip
    return layout, f"{s.panels[0]} x {s.panels[1]} panels of {s.n_fast} x {s.n_slow} at {distance:g} mm"


def _panels(layout: DetectorLayout) -> list:
    from spread_dials.detectors.layout import flatten_layout

    return flatten_layout(layout).names


@dataclass
class RunSetup:
    """What every shot of a run shares.

    Attributes:
        params: the extracted PHIL.
        layout: detector layout (written to every container).
        detector_description: for the log.
        panels: the physics panels (on the run's device and dtype).
        channels_eV: (C,) channel energies (eV), fixed for the run.
        nominal_weights: (C,) the Gaussian or monochromatic weights (None for sase and file).
        file_spectra: (energies (n, m), weights (n, m), shift_eV) for spectrum=file, else None.
        structure: the PreparedStructure (F0, G, sites).
        unit_cell: (6,) the model's cell (A, degrees); space_group: its symbol (Hermann-Mauguin).
        brightness: Ncells and spot scale (derived from the crystal and beam, or explicit).
        f_prime, f_double_prime: (S, C) per site and channel (electrons).
        structure_factors: the kernel's StructureFactors (F0, G, f', f'') on the device.
        site_states: oxidation state of each site (None: free atom).
        structure_source: provenance of F0 and G for the truth file.
        background_per_photon: (P, S, F) expected background photons per incident photon.
        response: detector response (gain map on the device).
        fluence_photons_per_m2: photons / beam area.
        device, dtype: where the kernel runs.
    """

    params: Any
    layout: DetectorLayout
    detector_description: str
    panels: PanelArray
    channels_eV: np.ndarray
    nominal_weights: np.ndarray | None
    file_spectra: tuple[np.ndarray, np.ndarray, float] | None
    structure: Any
    unit_cell: tuple[float, ...]
    space_group: str
    brightness: Brightness
    f_prime: torch.Tensor
    f_double_prime: torch.Tensor
    structure_factors: Any
    site_states: list
    structure_source: dict
    background_per_photon: torch.Tensor | None
    response: DetectorResponse
    fluence_photons_per_m2: float
    device: torch.device
    dtype: torch.dtype

    @property
    def n_channels(self) -> int:
        return int(self.channels_eV.shape[0])


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: beam.nchannels = None for the gaussian and sase spectra
DEFAULT_NCHANNELS = 40
#: the largest fraction of a measured spectrum's photons that the channels may drop unsaid
WINDOW_LOSS = 1e-3


def _channels(params, energy: float, n_channels: int) -> tuple[np.ndarray, np.ndarray | None]:
    beam = params.beam
    if beam.spectrum == "monochromatic":
        return np.array([energy]), np.ones(1)
    if beam.spectrum == "gaussian":
        e, w = gaussian_spectrum(energy, beam.fwhm_eV, n_channels, beam.channel_width_eV)
        return e.numpy(), w.numpy()
    return channel_energies(energy, n_channels, beam.channel_width_eV), None


def _read_file_spectra(params, energy: float) -> tuple[np.ndarray, np.ndarray, float, int]:
    """(energies, weights, shift, channels that hold them all) of beam.spectrum_file, moved by
    ``shift`` so that their mean centroid is ``energy``."""
    from spread_dials.io.spectra import read_spectra

    try:
        energies, weights = read_spectra(params.beam.spectrum_file)
    except (FileNotFoundError, ValueError) as e:
        raise SpreadError(f"beam.spectrum_file: {e}") from None
    centroids = [spectrum_centroid(e, w) for e, w in zip(energies, weights)]
    shift = energy - float(np.mean(centroids))
    # the window about energy that holds all but WINDOW_LOSS of each spectrum's photons
    cumulative = np.cumsum(np.clip(weights, 0, None), axis=1)
    cumulative /= cumulative[:, -1:]
    moved = energies + shift
    lo = [e[np.searchsorted(c, WINDOW_LOSS / 2)] for e, c in zip(moved, cumulative)]
    hi = [e[min(np.searchsorted(c, 1 - WINDOW_LOSS / 2), len(e) - 1)] for e, c in zip(moved, cumulative)]
    reach = max(energy - min(lo), max(hi) - energy)
    return energies, weights, shift, 2 * math.ceil(reach / params.beam.channel_width_eV) + 1


def _file_spectra(params, file_spectra, channels: np.ndarray, needed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The measured spectra, checked against the channels (each must overlap them)."""
    energies, weights, shift = file_spectra
    kept = []
    for i in range(len(weights)):
        try:
            kept.append(window_fraction(energies[i], weights[i], channels, shift))
        except ValueError as e:
            raise SpreadError(f"beam.spectrum_file spectrum {i}: {e}") from None
    kept = np.array(kept)
    n, width = len(channels), params.beam.channel_width_eV
    if kept.min() >= 1.0 - WINDOW_LOSS:
        logger.info("The %d channels of %g eV hold %.2f%% or more of every measured spectrum's photons", n, width,
                    100 * kept.min())  # fmt: skip
    else:  # never drop flux silently
        logger.warning(
            "beam.nchannels=%d of %g eV keeps only %.1f%% (mean %.1f%%) of the measured spectra's photons: the rest "
            "is dropped and each kept part renormalised, which moves centroids and narrows the shot-to-shot "
            "jitter; beam.nchannels=%d (or None) holds 99.9%% of each", n, width, 100 * kept.min(), 100 * kept.mean(),
            needed,
        )  # fmt: skip
    return energies, weights, shift


#: an anomalous site's element needs an absorption edge within this many eV of the band
EDGE_MARGIN_EV = 50.0


def _resolution_range(d_min: float | None, panels: PanelArray, channels: np.ndarray) -> tuple[float, float, float]:
    """(d_min, reach, largest d) of the run (A).  The reach is the smallest d any pixel records
    (at the highest channel energy), the largest d what the pixels nearest the beam record (at
    the lowest).  d_min None is the reach; a d_min below the reach is refused."""
    beam = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
    reach = detector_d_min(panels, beam, float(channels.max()) / HC_EV_A)
    d_largest = detector_d_max(panels, beam, float(channels.min()) / HC_EV_A)
    if d_min is None:
        logger.info("d_min: the detector's reach, %.3f A at %.1f eV", reach, channels.max())
        return reach, reach, d_largest
    if d_min < reach * (1 - 1e-9):
        raise SpreadError(
            f"structure.d_min={d_min:g} A is beyond the detector's reach: it records d >= {reach:.3f} A at "
            f"{channels.max():.1f} eV; raise structure.d_min or move the detector closer"
        )
    return d_min, reach, d_largest


def _warn_empty_detector(d_min: float, reach: float, channels: np.ndarray) -> None:
    """Warn where d_min stops the spots short of the detector's reach."""
    if d_min > reach * (1 + 1e-3):
        logger.warning(
            "structure.d_min=%g A leaves the detector empty beyond it: its pixels reach %.3f A at %.1f eV, and no "
            "crystal stops diffracting at a sharp cutoff (structure.d_min=None simulates to the detector's reach)",
            d_min, reach, channels.max(),
        )  # fmt: skip


def _require_reflections_on_detector(xrs, d_min: float, d_largest: float) -> None:
    """Refuse a run in which no reflection with d >= d_min can reach a pixel."""
    from cctbx import miller

    recorded = miller.build_set(xrs.crystal_symmetry(), anomalous_flag=False, d_min=d_min)
    if math.isfinite(d_largest):
        recorded = recorded.resolution_filter(d_max=d_largest)
    if recorded.size() == 0:
        raise SpreadError(
            f"no reflection reaches the detector: the model has none with d >= structure.d_min={d_min:g} A that "
            f"its pixels record (d <= {d_largest:.1f} A); lower structure.d_min or leave it at None"
        )


def _warn_far_from_edges(sites, channels: np.ndarray, table: str) -> None:
    """Warn for each site element with no absorption edge within EDGE_MARGIN_EV of the band."""
    from spread_dials.adapters.free_atom import absorption_edges_eV

    lo, hi = float(channels.min()), float(channels.max())
    for element in sorted({site.element for site in sites}):
        if absorption_edges_eV(element, lo - EDGE_MARGIN_EV, hi + EDGE_MARGIN_EV, table):
            continue
        edges = absorption_edges_eV(element, lo - 5000.0, hi + 5000.0, table)
        nearest = f"the nearest is at {min(edges, key=lambda e: abs(e - 0.5 * (lo + hi))):.0f} eV" if edges else (
            "none within 5 keV")
        logger.warning(
            "The band %.1f-%.1f eV is far from every absorption edge of %s (%s): the sites' f'/f'' are flat over "
            "the band, so the stills carry almost none of their energy-dependent signal; set beam.energy_eV near "
            "an edge", lo, hi, element, nearest,
        )  # fmt: skip


def build_setup(params, device: torch.device, dtype: torch.dtype) -> RunSetup:
    """Build the run's shared state (loads the model, computes F0, G and f'/f'' per channel).

    Raises:
        SpreadError: unreadable model or detector file, bad sites, d_min beyond the detector.
    """
    from spread_dials.adapters.anomalous_setup import (
        anomalous_model_from_params,
        resolve_structure_params,
        site_oxidation_states,
    )
    from spread_dials.adapters.structure_factors import (
        default_model_path,
        load_model,
        prepare_structure_factors,
        select_sites,
    )

    check_parameters(params)
    energy = mean_energy_eV(params)
    n_channels = params.beam.nchannels or DEFAULT_NCHANNELS
    file_spectra = None
    if params.beam.spectrum == "file":
        *measured, needed = _read_file_spectra(params, energy)
        n_channels = params.beam.nchannels or needed
    channels, nominal = _channels(params, energy, n_channels)
    if params.beam.spectrum == "file":
        file_spectra = _file_spectra(params, measured, channels, needed)
    layout, description = make_detector(params, energy)
    panels64 = panel_array_from_layout(layout, n_layers=params.detector.n_layers)

    try:
        choice = resolve_structure_params(params.structure)
    except ValueError as e:
        raise SpreadError(str(e)) from None
    d_min, reach, d_largest = _resolution_range(choice.d_min, panels64, channels)

    structure = params.structure
    if (structure.unit_cell is None) != (structure.space_group is None):
        raise SpreadError("give structure.unit_cell and structure.space_group together (the model's symmetry)")
    symmetry = None
    if structure.unit_cell is not None:
        from cctbx import crystal, sgtbx

        try:
            symmetry = crystal.symmetry(unit_cell=tuple(structure.unit_cell),
                                        space_group_info=sgtbx.space_group_info(structure.space_group))  # fmt: skip
        except (RuntimeError, AssertionError) as e:  # cctbx: an unknown symbol; a cell the group does not allow
            raise SpreadError(f"structure.unit_cell / structure.space_group: {str(e).splitlines()[0]}") from None
    try:
        model_path = Path(choice.file) if choice.file else default_model_path()
        xrs, hierarchy = load_model(model_path, crystal_symmetry=symmetry)
    except (FileNotFoundError, ValueError) as e:
        raise SpreadError(str(e)) from None
    except Exception as e:  # noqa: BLE001  iotbx raises Sorry or RuntimeError for a bad file
        raise SpreadError(f"cannot read the model {str(choice.file or 'default')!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if xrs.scatterers().size() == 0:
        raise SpreadError(f"the model {str(model_path)!r} has no atoms")
    try:
        sites = select_sites(hierarchy, element=choice.element, selections=choice.selections, group_by=choice.group_by)
    except (ValueError, RuntimeError) as e:
        raise SpreadError(f"structure.sites: {e}") from None
    _require_reflections_on_detector(xrs, d_min, d_largest)
    _warn_empty_detector(d_min, reach, channels)
    _warn_far_from_edges(sites, channels, choice.free_atom_table)
    mean_for_f = choice.mean_energy_eV or float((channels * (nominal if nominal is not None else 1.0)).sum()
                                                 / (nominal.sum() if nominal is not None else len(channels)))  # fmt: skip
    logger.info("Structure factors of %s (%d atoms, %s) to %.3f A ...", model_path.name, xrs.scatterers().size(),
                xrs.space_group_info().symbol_and_number(), d_min)  # fmt: skip
    prepared = prepare_structure_factors(
        xrs, sites, d_min=d_min, mean_energy_eV=mean_for_f, table=choice.free_atom_table,
        algorithm=choice.algorithm, form_factor_table=choice.form_factor_table,
    )  # fmt: skip
    channels_t = torch.as_tensor(channels, dtype=torch.float64)
    if sites:
        try:
            model = anomalous_model_from_params(params.anomalous, sites, channels_t, choice.free_atom_table)
            states = site_oxidation_states(params.anomalous, sites) if params.anomalous.model != "free_atom" else [None] * len(sites)
        except (ValueError, FileNotFoundError) as e:
            raise SpreadError(f"anomalous: {e}") from None
        with torch.no_grad():
            fp, fdp = model(channels_t)
        fp, fdp = fp.detach().double(), fdp.detach().double()
    else:
        fp = fdp = torch.zeros((0, len(channels)), dtype=torch.float64)
        states = []
    uc = tuple(float(x) for x in xrs.unit_cell().parameters())
    source = {
        "model_file": str(model_path.resolve()),
        "model_sha256": _sha256(model_path),
        "n_atoms": int(xrs.scatterers().size()),
        "space_group": str(xrs.space_group_info()),
        "space_group_hall": xrs.space_group().type().hall_symbol(),
        "unit_cell": list(uc),
        "d_min_A": float(prepared.d_min),
        "n_reflections": int(prepared.miller_index.shape[0]),
        "f0_algorithm": prepared.algorithm,
        "form_factor_table": choice.form_factor_table,
        "free_atom_table": choice.free_atom_table,
        "non_site_fp_fdp_energy_eV": float(prepared.mean_energy_eV),
        "anomalous_model": params.anomalous.model,
        "method": "cctbx: F(h,E) = F0(h) + sum_s (f'_s(E) + i f''_s(E)) G_s(h)",
    }

    panels = panels64.to(device=device, dtype=dtype)
    fluence = params.beam.photons / (math.pi * (0.5e-6 * params.beam.diameter_um) ** 2)
    bright = crystal_brightness(params, uc)
    background = _background_per_photon(params, panels, energy, dtype, device)
    noise = params.noise
    gain = None
    if noise.enable and noise.gain_error_rms > 0:
        from spread_dials.physics.detector_response import calibration_gain_map

        gain = calibration_gain_map((panels.n_panels, panels.n_slow, panels.n_fast), noise.gain_error_rms,
                                    seed=params.random.seed, device=device, dtype=dtype)  # fmt: skip
    if noise.enable and params.model_errors.panel_gain_rms > 0:
        panel_gain = panel_gain_factors(panels.n_panels, params.model_errors.panel_gain_rms, params.random.seed)
        panel_gain = panel_gain.to(device=device, dtype=dtype).view(-1, 1, 1)
        gain = panel_gain.expand(panels.n_panels, panels.n_slow, panels.n_fast) if gain is None else gain * panel_gain
    response = DetectorResponse(
        psf_fwhm_px=params.psf.fwhm_px,
        poisson=bool(noise.enable),
        calibration_gain=gain,
        quantum_gain=noise.quantum_gain,
        readout_noise_adu=noise.readout_noise_adu if noise.enable else 0.0,
        adc_offset_adu=noise.adc_offset_adu,
    )
    return RunSetup(
        params=params, layout=layout, detector_description=description, panels=panels, channels_eV=channels,
        nominal_weights=nominal, file_spectra=file_spectra, structure=prepared, unit_cell=uc,
        space_group=xrs.space_group_info().type().lookup_symbol(), brightness=bright, f_prime=fp, f_double_prime=fdp,
        structure_factors=prepared.structure_factors(fp, fdp).to(device=device, dtype=dtype), site_states=states,
        structure_source=source, background_per_photon=background, response=response,
        fluence_photons_per_m2=fluence, device=device, dtype=dtype,
    )  # fmt: skip


def crystal_brightness(params, unit_cell: tuple[float, ...]) -> Brightness:
    """Ncells and spot scale of the run (explicit crystal.ncells_abc / spot_scale win), logged."""
    c = params.crystal
    bright = brightness(unit_cell, c.domain_size_A, c.length_um, params.beam.diameter_um,
                        ncells_abc=c.ncells_abc, spot_scale=c.spot_scale)  # fmt: skip
    logger.info(
        "Crystal: Ncells %s (%s), %.4g domains in the beam (%s), %.4g unit cells in the beam (domain %g A, "
        "path %g um, beam %g um)", " x ".join(f"{n:g}" for n in bright.ncells_abc), bright.ncells_source,
        bright.spot_scale, bright.spot_scale_source, bright.cells_in_beam, c.domain_size_A, c.length_um,
        params.beam.diameter_um,
    )  # fmt: skip
    return bright


def _background_per_photon(params, panels: PanelArray, energy: float, dtype, device) -> torch.Tensor | None:
    from spread_dials.physics.background import AIR_F_BG, WATER_F_BG, background_photons
    from spread_dials.physics.beam import make_sources

    layers = []
    if params.background.water_thickness_um > 0:
        layers.append((WATER_F_BG, params.background.water_thickness_um * 1e-3, *WATER))
    if params.background.air_thickness_mm > 0:
        layers.append((AIR_F_BG, params.background.air_thickness_mm, *AIR))
    if not layers:
        return None
    sources = make_sources(
        torch.tensor([energy], dtype=torch.float64), torch.ones(1, dtype=torch.float64), 1.0,
        polarization_fraction=params.beam.polarization_fraction,
    ).to(device=device, dtype=dtype)  # fmt: skip
    materials = [AmorphousMaterial(torch.tensor(table), thickness_mm, density, weight)
                 for table, thickness_mm, density, weight in layers]  # fmt: skip
    with torch.no_grad():
        return background_photons(panels, sources, materials, 1.0, oversample=params.detector.oversample,
                                  compiled=device.type == "cuda")  # fmt: skip


def panel_gain_factors(n_panels: int, rms: float, seed: int) -> torch.Tensor:
    """Fixed per-panel gain factors 1 + rms * N(0, 1) of a run (model errors), from ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9A1E]))
    return torch.as_tensor(1.0 + rms * rng.normal(size=n_panels))


def plan_shot(setup: RunSetup, index: int) -> ShotPlan:
    """The plan of shot ``index``: seeds, orientation and spectrum from (random.seed, index)."""
    params = setup.params
    seeds = shot_seeds(params.random.seed, index)
    if params.crystal.orientation == "random":
        rotation = uniform_rotation(np.random.default_rng(seeds.orientation))
    else:
        from scipy.spatial.transform import Rotation

        rotation = Rotation.from_rotvec(np.radians(params.crystal.fixed_rotation_deg)).as_matrix()
    beam = params.beam
    channels = setup.channels_eV
    if beam.spectrum == "sase":
        _, weights = sase_spectrum(mean_energy_eV(params), beam.fwhm_eV, len(channels), beam.channel_width_eV,
                                   beam.sase.n_spikes, beam.sase.spike_fwhm_eV, seeds.spectrum)  # fmt: skip
    elif beam.spectrum == "file":
        energies, w, shift = setup.file_spectra
        k = index % len(w)
        weights = rebin_spectrum(energies[k], w[k], channels, shift)
    else:
        weights = setup.nominal_weights
    per = params.output.images_per_container
    container = index // per
    assert index in container_shots(container, params.nimages, per)
    errors = params.model_errors
    jitter = errors.energy_jitter_eV * np.random.default_rng(seeds.model_error).normal()
    return ShotPlan(
        index=index, container=container, slot=index - container * per, seeds=seeds, rotation=rotation,
        energies_eV=np.asarray(channels, dtype=np.float64), weights=np.asarray(weights, dtype=np.float64),
        photons=float(beam.photons), fluence_photons_per_m2=setup.fluence_photons_per_m2,
        recorded_offset_eV=float(errors.spectrometer_offset_eV + jitter),
    )  # fmt: skip
