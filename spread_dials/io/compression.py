"""HDF5's shuffle and deflate filters in Python, for parallel compression and direct chunk writes.

A 16.5 Mpixel Jungfrau 16M image is 66 MB of int32: compressing it through h5py's filter
pipeline runs in the caller's thread, one chunk after another (~0.5 s per image on one core).
Here every chunk is compressed on its own in a pool of worker threads (zlib and numpy release
the GIL) or processes, and the compressed bytes go to the file with
``h5py.Dataset.id.write_direct_chunk``.  The dataset keeps its declared gzip + shuffle filter
pipeline, so any HDF5 reader (h5py, dxtbx, stock ``/usr/bin/dials.*``, no plugin) decodes it.

The bytes are HDF5's own: the shuffle filter stores byte 0 of every element, then byte 1 of
every element, and so on (``H5Z__filter_shuffle``; trailing bytes of a partial element are
copied as they are), and the deflate filter is zlib's ``compress2`` at the dataset's level,
which is ``zlib.compress`` (zlib stream with header and Adler-32).  With the same zlib, a chunk
compressed here is byte-for-byte the chunk HDF5 writes itself (tests/io/test_compression.py).

The deflate encoder may instead be Intel's ISA-L (``encoder="isal"``, the python-isal package:
a maintained binding whose ``isal_zlib`` mirrors the zlib module): it writes standard zlib
streams, which HDF5's deflate filter and any zlib decode, about 4.7 times faster than zlib at
level 1 and ~10 % smaller on still-like counts (benchmarks/RESULTS.md).  Its levels are 0-3;
higher requested levels use 3.

Example::

    with ChunkCompressor(workers=4, compression="gzip", level=4) as compressor:
        futures = [compressor.submit(chunk) for chunk in image]      # (P, n_slow, n_fast)
        for k, future in enumerate(futures):
            dset.id.write_direct_chunk((i, k * n_slow, 0), future.result().data, 0)
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import zlib
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CHUNK_COMPRESSIONS",
    "DEFLATE_ENCODERS",
    "POOL_KINDS",
    "ChunkCompressor",
    "CompressedChunk",
    "available_cpus",
    "compress_chunk",
    "compress_chunks",
    "decompress_chunk",
    "default_workers",
    "local_ranks",
    "shuffle_bytes",
    "unshuffle_bytes",
]

#: chunk encodings: "gzip" is HDF5's shuffle + deflate pipeline, "none" the raw bytes
CHUNK_COMPRESSIONS = ("gzip", "none")
#: deflate encoders of "gzip" chunks (both write zlib streams that HDF5's deflate filter decodes)
DEFLATE_ENCODERS = ("isal", "zlib")
#: worker kinds of a ChunkCompressor
POOL_KINDS = ("thread", "process")
#: ISA-L's highest deflate level
ISAL_MAX_LEVEL = 3


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under an MPI binding)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


#: environment variables in which MPI launchers give the number of ranks on this node
_LOCAL_SIZE_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE")


def local_ranks() -> int:
    """Processes of this MPI job on this node (from the launcher's environment); 1 without MPI."""
    for name in _LOCAL_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


#: Auto compression workers per process with the isal encoder: on a 16-core H100 machine the
#: PSII shot loop ran at 15.9 images/s with 4 threads and 14.2 with 15 (benchmarks/RESULTS.md);
#: more threads only contend with the simulating thread
ISAL_AUTO_WORKERS = 4


def default_workers(ranks_per_node: int | None = None, encoder: str = "zlib") -> int:
    """Compression workers when the user says Auto: the cores left after the simulating thread
    (at most :data:`ISAL_AUTO_WORKERS` for the isal encoder, which needs few).

    Arguments:
        ranks_per_node: processes sharing this machine's cores (None: from the MPI launcher's
            environment).  A process bound to fewer cores than the machine has (an MPI binding)
            counts its own cores only.
        encoder: the deflate encoder (one of DEFLATE_ENCODERS).
    """
    cpus = available_cpus()
    ranks = local_ranks() if ranks_per_node is None else max(1, int(ranks_per_node))
    if ranks > 1 and cpus >= (os.cpu_count() or cpus):  # not bound: share the machine
        cpus //= ranks
    workers = max(1, cpus - 1)
    return min(workers, ISAL_AUTO_WORKERS) if encoder == "isal" else workers


def shuffle_bytes(chunk: np.ndarray) -> np.ndarray:
    """HDF5's shuffle filter: byte j of every element, for j = 0 .. itemsize - 1, as uint8.

    The chunk's bytes are taken in C order, as they are stored (native, little-endian here).
    """
    chunk = np.ascontiguousarray(chunk)
    size = chunk.dtype.itemsize
    raw = chunk.reshape(-1).view(np.uint8)
    if size == 1:
        return raw
    return np.ascontiguousarray(raw.reshape(-1, size).T).reshape(-1)


def unshuffle_bytes(data: bytes | np.ndarray, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Invert :func:`shuffle_bytes`: the (shape) array of ``dtype`` whose shuffled bytes are ``data``."""
    dtype = np.dtype(dtype)
    raw = np.frombuffer(data, dtype=np.uint8)
    if dtype.itemsize > 1:
        raw = np.ascontiguousarray(raw.reshape(dtype.itemsize, -1).T)
    return raw.view(dtype).reshape(shape)


@dataclass(frozen=True)
class CompressedChunk:
    """One encoded chunk: the bytes for ``write_direct_chunk`` and what making them took.

    Attributes:
        data: the encoded chunk (shuffle + zlib for "gzip", raw bytes for "none").
        nbytes: bytes of the chunk before encoding.
        seconds: time spent encoding (in the worker).
    """

    data: bytes
    nbytes: int
    seconds: float


def _deflate(encoder: str):
    """The ``compress(data, level)`` function of a deflate encoder."""
    if encoder == "zlib":
        return zlib.compress
    if encoder == "isal":
        try:
            from isal import isal_zlib
        except ImportError as e:
            raise ImportError("the isal deflate encoder needs python-isal (pip install isal); "
                              "or choose the zlib encoder") from e  # fmt: skip

        return lambda data, level: isal_zlib.compress(data, min(level, ISAL_MAX_LEVEL))
    raise ValueError(f"deflate encoder must be one of {', '.join(DEFLATE_ENCODERS)}, not {encoder!r}")


def compress_chunk(
    chunk: np.ndarray, compression: str = "gzip", level: int = 4, shuffle: bool = True, encoder: str = "zlib"
) -> CompressedChunk:
    """Encode one chunk as HDF5's filter pipeline would (shuffle, then deflate at ``level`` with
    ``encoder``; zlib gives HDF5's own bytes)."""
    t0 = time.perf_counter()
    chunk = np.ascontiguousarray(chunk)
    if compression == "gzip":
        data = _deflate(encoder)(shuffle_bytes(chunk) if shuffle else chunk.reshape(-1).view(np.uint8), level)
    elif compression == "none":
        data = chunk.tobytes()
    else:
        raise ValueError(f"chunk compression must be one of {', '.join(CHUNK_COMPRESSIONS)}, not {compression!r}")
    return CompressedChunk(data, chunk.nbytes, time.perf_counter() - t0)


def compress_chunks(
    chunks: np.ndarray, compression: str = "gzip", level: int = 4, shuffle: bool = True, encoder: str = "zlib"
) -> list[CompressedChunk]:
    """:func:`compress_chunk` of each ``chunks[i]`` (one worker task for several chunks)."""
    return [compress_chunk(chunk, compression, level, shuffle, encoder) for chunk in chunks]


def decompress_chunk(data: bytes, dtype: Any, shape: tuple[int, ...], compression: str = "gzip",
                     shuffle: bool = True) -> np.ndarray:  # fmt: skip
    """Decode a chunk written by :func:`compress_chunk` (or by HDF5 with the same filters)."""
    if compression == "none":
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    raw = zlib.decompress(data)
    if shuffle:
        return unshuffle_bytes(raw, dtype, shape)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


#: niceness added to compression threads: the simulating thread keeps its core when all are busy
WORKER_NICENESS = 5


def _lower_priority() -> None:
    """Lower the calling thread's scheduling priority (Linux: threads have their own nice value).

    The main thread feeds the GPU with many short kernel launches and slows down beside busy
    compression threads (measured on a 16-core GPU machine: 0.09 s per still alone, 0.19 s
    beside 15 threads); a lower priority lets the scheduler prefer it.  Its effect alone was not
    measured: it came with other changes (benchmarks/RESULTS.md)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + WORKER_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at the same priority
        pass


class _Inline(Executor):
    """An executor that runs each call at once in the caller's thread (workers = 0)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001  handed to the caller through the future
            future.set_exception(e)
        return future


class ChunkCompressor:
    """A pool that encodes chunks in parallel with HDF5's filters.

    Arguments:
        workers: worker threads or processes; 0 encodes in the caller's thread.
        compression: "gzip" (shuffle + deflate) or "none".
        level: deflate level 1-9.
        shuffle: apply the shuffle filter before deflate (as the dataset declares).
        encoder: deflate encoder of "gzip" chunks, one of DEFLATE_ENCODERS.
        kind: "thread" (zlib and numpy release the GIL: no copies between processes) or
            "process" (spawned processes: each chunk is pickled to a worker and back).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, workers: int = 0, compression: str = "gzip", level: int = 4, shuffle: bool = True,
                 kind: str = "thread", encoder: str = "zlib") -> None:  # fmt: skip
        if compression not in CHUNK_COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(CHUNK_COMPRESSIONS)}, not {compression!r}")
        if kind not in POOL_KINDS:
            raise ValueError(f"kind must be one of {', '.join(POOL_KINDS)}, not {kind!r}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, not {workers}")
        if compression == "gzip" and not 0 <= level <= 9:
            raise ValueError(f"deflate level must be 0-9, not {level}")
        if compression == "gzip":
            _deflate(encoder)  # fails here, not in a worker, when the encoder is missing
        self.workers = int(workers)
        self.compression = compression
        self.level = int(level)
        self.shuffle = bool(shuffle)
        self.encoder = encoder
        self.kind = kind
        self._executor: Executor
        if self.workers == 0:
            self._executor = _Inline()
        elif kind == "thread":
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="spread-compress",
                                                initializer=_lower_priority)  # fmt: skip
        else:
            # spawn, not fork: the parent may hold a CUDA context and torch's threads
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def __repr__(self) -> str:
        return (f"ChunkCompressor(workers={self.workers}, compression={self.compression!r}, level={self.level}, "
                f"encoder={self.encoder!r}, kind={self.kind!r})")  # fmt: skip

    def submit(self, chunk: np.ndarray) -> Future[CompressedChunk]:
        """Encode one chunk in a worker; the future's result is a :class:`CompressedChunk`."""
        return self._executor.submit(compress_chunk, chunk, self.compression, self.level, self.shuffle, self.encoder)

    def submit_image(self, chunks: np.ndarray) -> list[Future[list[CompressedChunk]]]:
        """Encode ``chunks[0]``, ``chunks[1]``, ... (e.g. the panels of an image) in tasks of a few
        chunks each: about four tasks per worker, so that the workers share the image evenly
        while each task is long next to the handing over of tasks between threads (the
        simulating thread shares the interpreter with them).  Each future's result is the list
        of its chunks, in order."""
        n = len(chunks)
        per_task = max(1, -(-n // (4 * max(1, self.workers))))
        return [self._executor.submit(compress_chunks, chunks[i : i + per_task], self.compression, self.level,
                                      self.shuffle, self.encoder) for i in range(0, n, per_task)]  # fmt: skip

    def close(self, cancel: bool = False) -> None:
        """Stop the workers (after the submitted chunks, or dropping those not started)."""
        self._executor.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self) -> ChunkCompressor:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(cancel=exc_type is not None)
