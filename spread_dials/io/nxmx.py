"""Multi-image NXmx HDF5 containers that stock DIALS reads with no plugin (dxtbx ``FormatNXmx``).

The layout follows shared/docs/DIALS_NOTES.md section 1(a), verified with Debian's DIALS 3.12:

    /entry                        NXentry, definition = "NXmx"
    /entry/data/data              (n, P * n_slow, n_fast) counts, panels stacked along slow,
                                  one chunk per panel (1, n_slow, n_fast), gzip + shuffle
    /entry/sample                 NXsample without depends_on: stills (no scan, no goniometer)
    /entry/instrument/beam        incident_wavelength (n,) in angstrom, one per image
    /entry/instrument/detector    sensor_material "Si", sensor_thickness (mm),
        transformations/          NXtransformations: one axis per group of the detector tree
        panel000 ... panelNNN     NXdetector_module, zero-padded so HDF5's alphabetical order
                                  is the panel order
    /entry/spread                 NXcollection beside the images (ignored by dxtbx):
        spectrum_energies_eV (n, m), spectrum_weights (n, m) and any per-image truth arrays

The detector tree of a :class:`~spread_dials.detectors.layout.DetectorLayout` is written as a
chain of NeXus transformations: every group is one axis (a translation, or a rotation with the
group's origin as its offset when its frame is rotated) that depends on its parent's axis, and
every panel's ``module_offset`` depends on its group's axis.  dxtbx turns each axis of a chain
into a hierarchy group, so the file reads back as a hierarchical detector with the same global
panel frames.  Vectors are stored in the McStas frame, ``diag(-1, 1, -1)`` times imgCIF.

A container is written to a temporary name next to its final path and renamed only when every
image is in it (``spread_dials.util.atomic``), so a reader never meets a partial container.

Pixels are compressed chunk by chunk (one chunk per panel) by a
:class:`~spread_dials.io.compression.ChunkCompressor`, in parallel when it has workers, with
HDF5's own shuffle + deflate encoding, and stored with ``write_direct_chunk``; the dataset
declares the gzip + shuffle pipeline, so every HDF5 reader decodes it with no plugin.
:meth:`NXmxWriter.prepare_image` (compression submitted, no HDF5 call: any thread) and
:meth:`NXmxWriter.store` (waits for the chunks and writes them: the thread that owns the file)
let a caller compress image i + 1 while image i is written; :meth:`NXmxWriter.write_image` does
both.

Example::

    layout = simple_detector(64, 48, 0.172, 90.0, 2, 2, thickness_mm=0.32, mu_per_mm=3.0)
    with NXmxWriter("images_000.h5", layout, n_images=3) as writer:
        for i in range(3):
            writer.write_image(i, counts[i], wavelength_A=1.3, spectrum=(energies_eV, weights))
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from spread_dials.detectors.layout import DetectorLayout, Group, PanelFrame
from spread_dials.io.compression import ChunkCompressor, CompressedChunk
from spread_dials.util.atomic import atomic_path

#: temporary files of containers that HDF5 failed to close (a full disk): the process must end
#: with os._exit, as HDF5's exit handler would crash trying to close them again
HDF5_UNCLOSED: list[str] = []


def hdf5_errno(error: BaseException) -> int | None:
    """The system errno behind an HDF5 failure, if any: h5py raises RuntimeError or OSError and
    puts HDF5's "errno = N" in the message (28 for a full disk)."""
    if isinstance(error, OSError) and error.errno:
        return error.errno
    found = re.search(r"errno = (\d+)", str(error))
    return int(found.group(1)) if found else None

__all__ = [
    "COMPRESSIONS",
    "HDF5_UNCLOSED",
    "hdf5_errno",
    "MCSTAS",
    "MIN_SENSOR_THICKNESS_MM",
    "NXmxWriter",
    "PreparedImage",
    "panel_module_names",
    "write_nxmx",
]

#: imgCIF (dxtbx lab frame) <-> McStas (NeXus); the matrix is its own inverse
MCSTAS = np.diag([-1.0, 1.0, -1.0])
#: compressions readable by stock /usr/bin/dials.* with no environment variables
COMPRESSIONS = ("gzip", "none")
#: dxtbx needs a sensor thickness > 0 (its parallax strategy asserts it); a layout without a
#: sensor model is written with this thickness, which makes dxtbx's px <-> mm mapping exact
MIN_SENSOR_THICKNESS_MM = 1e-6
_DETECTOR = "/entry/instrument/detector"
_IDENTITY_TOL = 1e-12


def panel_module_names(n_panels: int) -> list[str]:
    """NXdetector_module names ``panel000`` ... in panel order (zero-padded: HDF5 sorts names)."""
    width = max(3, len(str(max(n_panels - 1, 0))))
    return [f"panel{k:0{width}d}" for k in range(n_panels)]


def _count_panels(node: Group | PanelFrame) -> int:
    if isinstance(node, PanelFrame):
        return 1
    return sum(_count_panels(child) for child in node.children)


@dataclass
class PreparedImage:
    """An image on its way into a container: its chunks being compressed, and its metadata.

    Made by :meth:`NXmxWriter.prepare_image`, written by :meth:`NXmxWriter.store`.

    Attributes:
        index: the image's slot in the container.
        wavelength_A: its wavelength (A).
        spectrum: (energies_eV, weights) or None.
        chunks: futures of the compression tasks, each a list of consecutive panels'
            :class:`~spread_dials.io.compression.CompressedChunk`, or None when the writer
            stores through h5py's own filter pipeline.
        pixels: the (P * n_slow, n_fast) pixels in the container's dtype, for h5py's own
            pipeline (None with chunks).
    """

    index: int
    wavelength_A: float
    spectrum: tuple[np.ndarray, np.ndarray] | None
    chunks: list[Future] | None
    pixels: np.ndarray | None = None


def _unit(v: Sequence[float]) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _frame_rotation(fast: Sequence[float], slow: Sequence[float]) -> np.ndarray:
    """Rotation matrix (columns fast, slow, normal) of a local frame, orthonormalised."""
    f = _unit(fast)
    s = np.asarray(slow, dtype=np.float64)
    s = _unit(s - (s @ f) * f)
    return np.stack([f, s, np.cross(f, s)], axis=1)


def _rotation_vector(r: np.ndarray) -> np.ndarray:
    """Axis * angle (rad) of a rotation matrix (robust near 0 and pi)."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(r).as_rotvec()


def _translation(parent: h5py.Group, name: str, vector_imgcif: np.ndarray, depends_on: str) -> h5py.Dataset:
    """A translation axis of length |v| along v (McStas), depending on ``depends_on``."""
    v = MCSTAS @ np.asarray(vector_imgcif, dtype=np.float64)
    length = float(np.linalg.norm(v))
    direction = v / length if length > 0 else np.array([0.0, 0.0, 1.0])  # a panel at the origin
    ds = parent.create_dataset(name, data=length)
    ds.attrs["transformation_type"] = np.bytes_("translation")
    ds.attrs["vector"] = direction
    ds.attrs["units"] = np.bytes_("mm")
    ds.attrs["depends_on"] = np.bytes_(depends_on)
    return ds


def _group_axis(parent: h5py.Group, name: str, node: Group, depends_on: str) -> h5py.Dataset:
    """One axis for a group's local frame: a translation, or a rotation offset to the origin."""
    rotation = _frame_rotation(node.fast_axis, node.slow_axis)
    if np.abs(rotation - np.eye(3)).max() <= _IDENTITY_TOL:
        return _translation(parent, name, np.asarray(node.origin_mm, dtype=np.float64), depends_on)
    rotvec = _rotation_vector(MCSTAS @ rotation @ MCSTAS)
    angle = float(np.linalg.norm(rotvec))
    ds = parent.create_dataset(name, data=math.degrees(angle))
    ds.attrs["transformation_type"] = np.bytes_("rotation")
    ds.attrs["vector"] = rotvec / angle
    ds.attrs["units"] = np.bytes_("deg")
    ds.attrs["offset"] = MCSTAS @ np.asarray(node.origin_mm, dtype=np.float64)
    ds.attrs["offset_units"] = np.bytes_("mm")
    ds.attrs["depends_on"] = np.bytes_(depends_on)
    return ds


def _axis_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "group"
    candidate, k = base, 1
    while candidate in taken:
        candidate, k = f"{base}_{k}", k + 1
    taken.add(candidate)
    return candidate


def _write_detector(det: h5py.Group, layout: DetectorLayout) -> list[str]:
    """Transformations for the groups and one NXdetector_module per panel; return module names."""
    transformations = det.create_group("transformations")
    transformations.attrs["NX_class"] = np.bytes_("NXtransformations")
    taken: set[str] = set()
    panels: list[tuple[PanelFrame, str]] = []  # (panel, the axis it depends on), depth-first

    def visit(node: Group | PanelFrame, depends_on: str) -> None:
        if isinstance(node, PanelFrame):
            panels.append((node, depends_on))
            return
        axis = _group_axis(transformations, _axis_name(node.name, taken), node, depends_on)
        for child in node.children:
            visit(child, axis.name)

    visit(layout.root, ".")
    n_fast, n_slow = (int(x) for x in layout.image_size)
    names = panel_module_names(len(panels))
    for k, ((panel, depends_on), name) in enumerate(zip(panels, names)):
        mod = det.create_group(name)
        mod.attrs["NX_class"] = np.bytes_("NXdetector_module")
        mod.attrs["panel_name"] = np.bytes_(panel.name)
        mod.create_dataset("data_origin", data=np.array([k * n_slow, 0], dtype="i8"))
        mod.create_dataset("data_size", data=np.array([n_slow, n_fast], dtype="i8"))
        offset = _translation(mod, "module_offset", np.asarray(panel.origin_mm, dtype=np.float64), depends_on)
        rotation = _frame_rotation(panel.fast_axis, panel.slow_axis)
        for axis_name, axis, size in (
            ("fast_pixel_direction", rotation[:, 0], layout.pixel_size_mm[0]),
            ("slow_pixel_direction", rotation[:, 1], layout.pixel_size_mm[1]),
        ):
            ds = mod.create_dataset(axis_name, data=float(size))
            ds.attrs["transformation_type"] = np.bytes_("translation")
            ds.attrs["vector"] = MCSTAS @ axis
            ds.attrs["offset"] = np.zeros(3)
            ds.attrs["units"] = np.bytes_("mm")
            ds.attrs["depends_on"] = np.bytes_(offset.name)
    return names


class NXmxWriter:
    """Write one multi-image NXmx container, atomically (temporary name, renamed when complete).

    Arguments:
        path: the final file name (its directory must exist).
        layout: the detector: frame tree, image size, pixel size, sensor thickness (mm).
        n_images: images the container will hold; every one must be written before it closes.
        n_channels: spectral channels per image for ``/entry/spread/spectrum_*`` (0: none).
        compression: "gzip" (with the shuffle filter) or "none".
        compression_level: gzip level 1-9.
        dtype: pixel type (int32 counts by default).
        sensor_material: NeXus sensor material ("Si"; dxtbx knows Si, CdTe, GaAs).
        saturation_value, underload_value: optional NXdetector limits (dxtbx's trusted range).
        attributes: extra attributes of ``/entry/spread`` (provenance).
        compressor: the pool that encodes the chunks (shared between containers); its
            compression and level must be the writer's.  None: a pool of its own with no
            workers (the calling thread compresses).
        direct_chunk_write: store chunks encoded by the compressor with ``write_direct_chunk``
            (default); False: let h5py's filter pipeline compress in the calling thread.

    Use as a context manager: leaving the block normally with every image written renames the
    file into place; an exception (or missing images) removes the temporary file instead.

    Attributes (running totals): ``raw_bytes`` and ``stored_bytes`` of the pixel chunks,
    ``compress_seconds`` (in the workers, summed), ``write_seconds`` (HDF5 calls in
    :meth:`store`) and ``wait_seconds`` (:meth:`store` waiting for the workers).
    """

    def __init__(
        self,
        path: str | Path,
        layout: DetectorLayout,
        n_images: int,
        *,
        n_channels: int = 0,
        compression: str = "gzip",
        compression_level: int = 4,
        dtype: Any = np.int32,
        sensor_material: str = "Si",
        saturation_value: int | None = None,
        underload_value: int | None = None,
        attributes: dict[str, Any] | None = None,
        compressor: ChunkCompressor | None = None,
        direct_chunk_write: bool = True,
    ) -> None:
        if n_images < 1:
            raise ValueError(f"a container needs at least one image, not {n_images}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, not {compression!r}")
        self.path = Path(path)
        self.layout = layout
        self.n_images = int(n_images)
        self.n_channels = int(n_channels)
        self.compression = compression
        self.compression_level = int(compression_level)
        self.dtype = np.dtype(dtype)
        self.sensor_material = sensor_material
        self.saturation_value = saturation_value
        self.underload_value = underload_value
        self.attributes = dict(attributes or {})
        self._stack: contextlib.ExitStack | None = None
        self._h5: h5py.File | None = None
        self._written = np.zeros(self.n_images, dtype=bool)
        self.n_panels = _count_panels(layout.root)
        if compressor is None:
            compressor = ChunkCompressor(0, compression, self.compression_level if compression == "gzip" else 0)
        elif (compressor.compression, compressor.shuffle) != (compression, True) or (
            compression == "gzip" and compressor.level != self.compression_level
        ):
            raise ValueError(f"{compressor!r} does not match the container's compression={compression!r} "
                             f"level={self.compression_level}")  # fmt: skip
        self.compressor = compressor
        self.direct_chunk_write = bool(direct_chunk_write)
        self.raw_bytes = 0
        self.stored_bytes = 0
        self.compress_seconds = 0.0
        self.write_seconds = 0.0
        self.wait_seconds = 0.0

    @property
    def is_open(self) -> bool:
        """True between entering the with-block and leaving it."""
        return self._h5 is not None

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "NXmxWriter":
        stack = contextlib.ExitStack()
        self._tmp = tmp = stack.enter_context(atomic_path(self.path))
        try:
            self._h5 = h5py.File(tmp, "w")
        except BaseException:
            stack.__exit__(*sys.exc_info())
            raise
        self._stack = stack
        try:
            self._write_structure()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        h5, stack = self._h5, self._stack
        self._h5 = self._stack = None
        if h5 is not None:
            try:
                h5.close()
            except (RuntimeError, OSError) as error:  # e.g. the disk filled up: HDF5 could not flush
                # HDF5 1.10 keeps a file it failed to close, and a second close (or the library's
                # own at exit) crashes the process: the caller must end it without HDF5's exit
                # handlers (see HDF5_UNCLOSED)
                HDF5_UNCLOSED.append(str(self._tmp))
                number = hdf5_errno(error)
                failure = OSError(number, os.strerror(number), str(self.path)) if number else error
                if stack is not None:
                    stack.__exit__(type(failure), failure, None)  # removes the temporary file
                raise failure from None
        if exc_type is None and not self._written.all():
            missing = np.flatnonzero(~self._written).tolist()
            exc_type = RuntimeError
            exc = RuntimeError(f"{self.path.name}: images {missing[:10]} were never written")
            tb = None
            if stack is not None:
                stack.__exit__(exc_type, exc, tb)
            raise exc
        if stack is not None:
            return bool(stack.__exit__(exc_type, exc, tb))
        return False

    # -- writing ---------------------------------------------------------------------------
    def _write_structure(self) -> None:
        h5 = self._h5
        layout = self.layout
        n_fast, n_slow = (int(x) for x in layout.image_size)
        entry = h5.create_group("entry")
        entry.attrs["NX_class"] = np.bytes_("NXentry")
        entry.create_dataset("definition", data=np.bytes_("NXmx"))
        data = entry.create_group("data")
        data.attrs["NX_class"] = np.bytes_("NXdata")
        data.attrs["signal"] = np.bytes_("data")
        sample = entry.create_group("sample")
        sample.attrs["NX_class"] = np.bytes_("NXsample")
        sample.create_dataset("name", data=np.bytes_("crystal"))
        source = entry.create_group("source")
        source.attrs["NX_class"] = np.bytes_("NXsource")
        source.create_dataset("name", data=np.bytes_("XFEL (simulated by spread_dials)"))
        instrument = entry.create_group("instrument")
        instrument.attrs["NX_class"] = np.bytes_("NXinstrument")
        instrument.create_dataset("name", data=np.bytes_("spread_dials simulation"))
        beam = instrument.create_group("beam")
        beam.attrs["NX_class"] = np.bytes_("NXbeam")
        wl = beam.create_dataset("incident_wavelength", shape=(self.n_images,), dtype="f8")
        wl.attrs["units"] = np.bytes_("angstrom")
        det = instrument.create_group("detector")
        det.attrs["NX_class"] = np.bytes_("NXdetector")
        det.create_dataset("sensor_material", data=np.bytes_(self.sensor_material))
        thickness = det.create_dataset("sensor_thickness", data=max(float(layout.thickness_mm), MIN_SENSOR_THICKNESS_MM))
        thickness.attrs["units"] = np.bytes_("mm")
        if self.saturation_value is not None:
            det.create_dataset("saturation_value", data=int(self.saturation_value))
        if self.underload_value is not None:
            det.create_dataset("underload_value", data=int(self.underload_value))
        names = _write_detector(det, layout)
        if len(names) != self.n_panels:
            raise RuntimeError(f"wrote {len(names)} detector modules for {self.n_panels} panels")
        filters: dict[str, Any] = {}
        if self.compression == "gzip":
            filters = {"compression": "gzip", "compression_opts": self.compression_level, "shuffle": True}
        data.create_dataset(
            "data",
            shape=(self.n_images, self.n_panels * n_slow, n_fast),
            dtype=self.dtype,
            chunks=(1, n_slow, n_fast),
            fillvalue=0,
            **filters,
        )
        spread = entry.create_group("spread")
        spread.attrs["NX_class"] = np.bytes_("NXcollection")
        spread.attrs["description"] = np.bytes_(
            "spread_dials ground truth beside the images: spectra and per-image values (row i is image i)"
        )
        for key, value in self.attributes.items():
            spread.attrs[key] = value
        if self.n_channels > 0:
            for name, units in (("spectrum_energies_eV", "eV"), ("spectrum_weights", "")):
                ds = spread.create_dataset(name, shape=(self.n_images, self.n_channels), dtype="f8")
                ds.attrs["units"] = np.bytes_(units)
            spread["spectrum_weights"].attrs["description"] = np.bytes_("fraction of the pulse's photons per channel")

    def prepare_image(
        self,
        index: int,
        image: np.ndarray,
        wavelength_A: float,
        spectrum: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> PreparedImage:
        """Check image ``index`` ((P, n_slow, n_fast) pixels) and submit its chunks for compression.

        Makes no HDF5 call, so it may run in another thread than :meth:`store`, and before the
        container is open.  Pixels are cast to the container's dtype (floats are rounded to
        nearest and clipped to an integer type's range first).
        """
        if not 0 <= index < self.n_images:
            raise IndexError(f"image index {index} outside 0..{self.n_images - 1}")
        n_fast, n_slow = (int(x) for x in self.layout.image_size)
        image = np.asarray(image)
        if image.shape != (self.n_panels, n_slow, n_fast):
            raise ValueError(f"image shape {image.shape} != (panels, slow, fast) {(self.n_panels, n_slow, n_fast)}")
        if self.n_channels > 0:
            if spectrum is None:
                raise ValueError("this container stores spectra: give spectrum=(energies_eV, weights)")
            energies, weights = (np.asarray(a, dtype=np.float64).reshape(-1) for a in spectrum)
            if energies.size != self.n_channels or weights.size != self.n_channels:
                raise ValueError(f"spectrum must have {self.n_channels} channels, got {energies.size}, {weights.size}")
            spectrum = (energies, weights)
        pixels = np.ascontiguousarray(_cast(image, self.dtype))
        if self.direct_chunk_write:
            chunks = self.compressor.submit_image(pixels)
            return PreparedImage(int(index), float(wavelength_A), spectrum, chunks)
        return PreparedImage(int(index), float(wavelength_A), spectrum, None, pixels.reshape(self.n_panels * n_slow, n_fast))

    def store(self, prepared: PreparedImage) -> None:
        """Write a prepared image into the open container (waiting for its chunks in order)."""
        if self._h5 is None:
            raise RuntimeError("NXmxWriter.store outside its with-block")
        data = self._h5["/entry/data/data"]
        index = prepared.index
        if prepared.chunks is None:
            t0 = time.perf_counter()
            data[index] = prepared.pixels
            self.write_seconds += time.perf_counter() - t0
            self.raw_bytes += prepared.pixels.nbytes
            self.stored_bytes = data.id.get_storage_size()  # every chunk so far
        else:
            n_slow = int(self.layout.image_size[1])
            k = 0  # panel: the tasks hold consecutive panels
            for future in prepared.chunks:
                t0 = time.perf_counter()
                task: list[CompressedChunk] = future.result()
                t1 = time.perf_counter()
                for chunk in task:
                    data.id.write_direct_chunk((index, k * n_slow, 0), chunk.data, 0)
                    self.compress_seconds += chunk.seconds
                    self.raw_bytes += chunk.nbytes
                    self.stored_bytes += len(chunk.data)
                    k += 1
                self.wait_seconds += t1 - t0
                self.write_seconds += time.perf_counter() - t1
            prepared.chunks = None  # let the compressed bytes go
        t0 = time.perf_counter()
        self._h5["/entry/instrument/beam/incident_wavelength"][index] = prepared.wavelength_A
        if prepared.spectrum is not None:
            self._h5["/entry/spread/spectrum_energies_eV"][index] = prepared.spectrum[0]
            self._h5["/entry/spread/spectrum_weights"][index] = prepared.spectrum[1]
        self.write_seconds += time.perf_counter() - t0
        self._written[index] = True

    def write_image(
        self,
        index: int,
        image: np.ndarray,
        wavelength_A: float,
        spectrum: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Store image ``index``: (P, n_slow, n_fast) pixels, its wavelength (A) and spectrum.

        Pixels are cast to the container's dtype (floats are rounded to nearest and
        clipped to an integer type's range first).
        """
        if self._h5 is None:
            raise RuntimeError("NXmxWriter.write_image outside its with-block")
        self.store(self.prepare_image(index, image, wavelength_A, spectrum))

    def write_array(self, name: str, values: np.ndarray, units: str | None = None, description: str | None = None) -> None:
        """Store an array under ``/entry/spread/<name>`` (e.g. per-image truth, row i = image i)."""
        if self._h5 is None:
            raise RuntimeError("NXmxWriter.write_array outside its with-block")
        ds = self._h5["/entry/spread"].create_dataset(name, data=np.asarray(values))
        if units is not None:
            ds.attrs["units"] = np.bytes_(units)
        if description is not None:
            ds.attrs["description"] = np.bytes_(description)


def _cast(image: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(dtype)
        image = np.clip(np.rint(image), info.min, info.max)
    return image.astype(dtype, copy=False)


def write_nxmx(
    path: str | Path,
    layout: DetectorLayout,
    images: np.ndarray | Sequence[np.ndarray],
    wavelengths_A: Sequence[float],
    spectra: tuple[np.ndarray, np.ndarray] | None = None,
    **options: Any,
) -> Path:
    """Write ``images`` ((n, P, n_slow, n_fast)) with one wavelength (A) each, atomically.

    Arguments:
        spectra: optional (energies_eV, weights), each (n, m).
        options: passed to :class:`NXmxWriter` (compression, dtype, ...).
    """
    n = len(images)
    if len(wavelengths_A) != n:
        raise ValueError(f"{n} images but {len(wavelengths_A)} wavelengths")
    n_channels = 0 if spectra is None else int(np.asarray(spectra[0]).shape[-1])
    with NXmxWriter(path, layout, n, n_channels=n_channels, **options) as writer:
        for i in range(n):
            spectrum = None if spectra is None else (spectra[0][i], spectra[1][i])
            writer.write_image(i, images[i], float(wavelengths_A[i]), spectrum)
    return Path(path)
