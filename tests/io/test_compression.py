"""Chunks compressed in worker threads/processes and written with write_direct_chunk: the same
bytes as HDF5's own gzip + shuffle pipeline, decoded bit for bit by h5py here and by Debian's
/usr/bin/python3 h5py with no plugin."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zlib

import h5py
import numpy as np
import pytest

from spread_dials.detectors.simple import simple_detector
from spread_dials.io.compression import (
    ChunkCompressor,
    compress_chunk,
    decompress_chunk,
    default_workers,
    shuffle_bytes,
    unshuffle_bytes,
)
from spread_dials.io.nxmx import NXmxWriter, write_nxmx


def _layout():
    return simple_detector(64, 48, 0.172, 90.0, 2, 2, gap_mm=1.5, thickness_mm=0.32, mu_per_mm=3.0)


def _counts(shape, seed=0) -> np.ndarray:
    """Photon counts like a still's: mostly 0-3, a few bright pixels, some negative (offsets)."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(0.5, 1.0, size=shape)).astype(np.int32)
    bright = rng.random(shape) < 1e-3
    counts[bright] = rng.integers(-5, 2**31 - 1, size=int(bright.sum()), dtype=np.int64)
    return counts


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.int32, np.float32, np.float64])
def test_shuffle_round_trip(dtype):
    chunk = (np.arange(7 * 5) * 37 % 251).astype(dtype).reshape(7, 5)
    shuffled = shuffle_bytes(chunk)
    assert shuffled.dtype == np.uint8 and shuffled.size == chunk.nbytes
    size = np.dtype(dtype).itemsize
    # byte j of element e sits at j * n + e
    raw = chunk.reshape(-1).view(np.uint8)
    assert all(shuffled[j * chunk.size + e] == raw[e * size + j] for e in (0, 3, 34) for j in range(size))
    assert np.array_equal(unshuffle_bytes(shuffled.tobytes(), dtype, chunk.shape), chunk)
    for compression in ("gzip", "none"):
        encoded = compress_chunk(chunk, compression, level=3)
        assert encoded.nbytes == chunk.nbytes and encoded.seconds >= 0
        assert np.array_equal(decompress_chunk(encoded.data, dtype, chunk.shape, compression), chunk)


def test_chunks_are_the_bytes_hdf5_writes(tmp_path):
    """h5py's own gzip(level) + shuffle chunk == compress_chunk's bytes (same zlib), for int32 and uint16."""
    for dtype, level in ((np.int32, 4), (np.uint16, 1), (np.int32, 9)):
        image = _counts((3, 48, 64), seed=level).astype(dtype)
        with h5py.File(tmp_path / f"h5py_{level}.h5", "w") as h5:
            ds = h5.create_dataset("d", data=image, chunks=(1, 48, 64), compression="gzip", compression_opts=level,
                                   shuffle=True)  # fmt: skip
            for k in range(3):
                mask, stored = ds.id.read_direct_chunk((k, 0, 0))
                assert mask == 0
                assert zlib.decompress(stored) == shuffle_bytes(image[k]).tobytes()
                assert stored == compress_chunk(image[k], "gzip", level).data, (dtype, level, k)


def test_isal_chunks_are_standard_deflate():
    """ISA-L's chunks inflate with zlib to HDF5's shuffled bytes, at every level (levels above 3
    use 3), and differ from zlib's encoding (so the encoder really changed)."""
    image = _counts((2, 48, 64), seed=11)
    for level in (1, 2, 3, 6):
        chunk = compress_chunk(image[0], "gzip", level, encoder="isal")
        assert zlib.decompress(chunk.data) == shuffle_bytes(image[0]).tobytes()
        assert np.array_equal(decompress_chunk(chunk.data, np.int32, image[0].shape), image[0])
    assert compress_chunk(image[0], "gzip", 1, encoder="isal").data != compress_chunk(image[0], "gzip", 1).data
    assert compress_chunk(image[1], "gzip", 6, encoder="isal").data == compress_chunk(image[1], "gzip", 3, encoder="isal").data
    with pytest.raises(ValueError, match="deflate encoder"):
        ChunkCompressor(0, "gzip", 1, encoder="lzma")


@pytest.mark.parametrize("workers, kind, encoder", [(0, "thread", "zlib"), (2, "thread", "zlib"),
                                                    (2, "process", "zlib"), (3, "thread", "isal")])  # fmt: skip
def test_direct_chunk_container_equals_input_bit_for_bit(tmp_path, workers, kind, encoder):
    """A container written with worker-compressed direct chunks decodes (through the declared
    gzip + shuffle filters) to the input pixels; its chunks equal those of h5py's own pipeline."""
    layout = _layout()
    images = _counts((3, 4, 48, 64), seed=5)
    wavelengths = [1.30, 1.31, 1.32]
    with ChunkCompressor(workers, "gzip", 4, kind=kind, encoder=encoder) as compressor:
        direct = write_nxmx(tmp_path / "direct.h5", layout, images, wavelengths, compressor=compressor)
    reference = write_nxmx(tmp_path / "h5py.h5", layout, images, wavelengths, direct_chunk_write=False)
    with h5py.File(direct, "r") as a, h5py.File(reference, "r") as b:
        da, db = a["/entry/data/data"], b["/entry/data/data"]
        assert da.compression == "gzip" and da.shuffle and da.compression_opts == 4 and da.chunks == (1, 48, 64)
        got = da[()]
        assert got.dtype == np.int32 and np.array_equal(got, images.reshape(3, 4 * 48, 64))
        assert got.tobytes() == images.tobytes()
        assert np.array_equal(a["/entry/instrument/beam/incident_wavelength"][()], wavelengths)
        if encoder == "zlib":  # HDF5's own bytes
            for i in range(3):
                for k in range(4):
                    assert da.id.read_direct_chunk((i, k * 48, 0)) == db.id.read_direct_chunk((i, k * 48, 0))
            assert da.id.get_storage_size() == db.id.get_storage_size()


def test_uncompressed_direct_chunks(tmp_path):
    layout = _layout()
    images = _counts((2, 4, 48, 64), seed=2)
    with ChunkCompressor(2, "none") as compressor:
        path = write_nxmx(tmp_path / "raw.h5", layout, images, [1.3, 1.4], compression="none", compressor=compressor)
    with h5py.File(path, "r") as h5:
        data = h5["/entry/data/data"]
        assert data.compression is None and np.array_equal(data[()], images.reshape(2, 4 * 48, 64))


@pytest.mark.parametrize("encoder", ["zlib", "isal"])
def test_readable_by_debian_python_without_plugins(tmp_path, encoder):
    """/usr/bin/python3 (Debian h5py 3.7, HDF5 1.10) with no HDF5_PLUGIN_PATH decodes every pixel."""
    layout = _layout()
    images = _counts((2, 4, 48, 64), seed=9)
    with ChunkCompressor(2, "gzip", 6, encoder=encoder) as compressor:
        path = write_nxmx(tmp_path / "c.h5", layout, images, [1.3, 1.4], compression_level=6, compressor=compressor)
    script = (
        "import hashlib, sys, h5py, numpy as np\n"
        "with h5py.File(sys.argv[1], 'r') as h5:\n"
        "    d = h5['/entry/data/data']\n"
        "    a = np.ascontiguousarray(d[()], dtype='<i4')\n"
        "    print(d.compression, d.shuffle, a.shape, hashlib.sha256(a.tobytes()).hexdigest())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HDF5_", "PYTHON", "VIRTUAL_ENV"))}
    result = subprocess.run(["/usr/bin/python3", "-c", script, str(path)], check=False, capture_output=True, text=True,
                            env=env, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    want = hashlib.sha256(images.reshape(2, 4 * 48, 64).astype("<i4").tobytes()).hexdigest()
    assert result.stdout.split() == ["gzip", "True", "(2,", "192,", "64)", want]


def test_compressor_must_match_the_container(tmp_path):
    with ChunkCompressor(0, "gzip", 4) as compressor:
        with pytest.raises(ValueError, match="does not match"):
            NXmxWriter(tmp_path / "a.h5", _layout(), 1, compression_level=5, compressor=compressor)
        with pytest.raises(ValueError, match="does not match"):
            NXmxWriter(tmp_path / "a.h5", _layout(), 1, compression="none", compressor=compressor)
    with pytest.raises(ValueError):
        ChunkCompressor(1, "lz4")
    assert default_workers() >= 1 and default_workers(ranks_per_node=1000) == 1
    assert 1 <= default_workers(encoder="isal") <= min(4, default_workers())


def test_prepare_then_store_in_any_order(tmp_path):
    """prepare_image before the file is open; store from the owning thread; write statistics."""
    layout = _layout()
    images = _counts((2, 4, 48, 64), seed=3)
    with ChunkCompressor(2, "gzip", 4) as compressor:
        writer = NXmxWriter(tmp_path / "p.h5", layout, 2, compressor=compressor)
        prepared = [writer.prepare_image(i, images[i], 1.3 + i / 10) for i in (1, 0)]
        with writer:
            for p in prepared:
                writer.store(p)
    assert writer.raw_bytes == images.nbytes and 0 < writer.stored_bytes < images.nbytes
    assert writer.compress_seconds > 0 and writer.write_seconds > 0
    with h5py.File(tmp_path / "p.h5", "r") as h5:
        assert np.array_equal(h5["/entry/data/data"][()], images.reshape(2, 192, 64))
        assert np.allclose(h5["/entry/instrument/beam/incident_wavelength"][()], [1.3, 1.4])


def test_submit_image_groups_consecutive_chunks():
    """An image's panels go out in tasks of consecutive panels (about four per worker); in order,
    their chunks are the per-panel encodings."""
    image = _counts((10, 48, 64), seed=4)
    with ChunkCompressor(1, "gzip", 2) as compressor:
        tasks = compressor.submit_image(image)
        chunks = [chunk for future in tasks for chunk in future.result()]
    assert [len(f.result()) for f in tasks] == [3, 3, 3, 1]
    assert [c.data for c in chunks] == [compress_chunk(panel, "gzip", 2).data for panel in image]
