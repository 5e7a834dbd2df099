"""Write files atomically: a reader sees the old file or the complete new one, never half of one.

The new content goes to a temporary file in the same directory (so ``os.replace`` is a rename on
one filesystem), is flushed and fsync'ed, and only then replaces the final name.  If the writer
fails or is killed, no file appears at the final name (a stray hidden ``.<name>.tmp*`` may remain
after a hard kill; an exception removes it).

Example::

    with atomic_write("summary.json", "w") as f:
        json.dump(result, f)
    with atomic_path("images_000.h5") as tmp:   # for writers that want a path (h5py, as_file)
        with h5py.File(tmp, "w") as h5:
            ...
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Union

__all__ = ["atomic_path", "atomic_write", "temporary_beside", "write_bytes_atomic", "write_text_atomic"]

PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (best effort: not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_beside(final: Path) -> Path:
    """An empty, unique file next to ``final`` that keeps its suffix (``.a.tmpXYZ.h5``)."""
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.stem}.tmp", suffix=final.suffix)
    os.close(fd)
    # mkstemp makes 0600 files; give the result the permissions an ordinary open() would
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it to ``path``.

    Arguments:
        path: the final file name; its directory must exist.

    The temporary file exists (empty) when yielded; writers may overwrite or replace it.  On an
    exception the temporary file is removed and ``path`` is left as it was.
    """
    final = Path(path)
    tmp = temporary_beside(final)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file for writing (``mode`` "w" or "wb"); it becomes ``path`` on success."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; return the path."""
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)
