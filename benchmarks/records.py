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

__all__ = ["append_record", "read_records"]


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
