"""JSON-lines result files of the benchmarks: one record per line, appended as each result comes,
read back to resume a run or to summarise one.

A run killed in the middle of an append (a device call's deadline) can leave a last line without
its newline: readers skip it with a note, and a resuming writer cuts it off first (the file
rewritten under a temporary name and renamed), so the rerun makes that record again and the file
stays one whole record per line.  A broken line anywhere else is an error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

__all__ = ["append_record", "read_records", "reset_gpu_peak", "gpu_peak_bytes"]


def read_records(path: Path, repair: bool = False) -> list[dict]:
    """The records of ``path`` ([] when it does not exist).

    Args:
        path: a JSON-lines file.
        repair: cut an unfinished last line off the file (a writer about to append).

    Raises:
        SystemExit: ("Sorry: ...") a line other than an unfinished last one is not JSON.
    """
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise SystemExit(f"Sorry: {path}, line {number} is not a JSON record: remove it") from None
    if tail.strip():
        print(f"{path}: an unfinished last line (an interrupted run) left out", file=sys.stderr)
        if repair:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text[: len(text) - len(tail)])
            tmp.replace(path)
    return records


def append_record(path: Path, record: dict) -> None:
    """Append ``record`` to ``path`` as one line, in one write, flushed to disk."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def reset_gpu_peak(device) -> None:
    """Start a new peak of torch's GPU memory on ``device`` (a torch.device; nothing off a GPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_bytes(device) -> int | None:
    """Peak bytes torch allocated on ``device`` since the last :func:`reset_gpu_peak` (None off a GPU)."""
    if device.type != "cuda":
        return None
    import torch

    return int(torch.cuda.max_memory_allocated(device))
