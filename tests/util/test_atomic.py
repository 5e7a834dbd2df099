"""spread_dials.util.atomic: the final name holds the old file or the complete new one."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from spread_dials.util.atomic import atomic_path, atomic_write, write_bytes_atomic, write_text_atomic

PROBE = Path(__file__).with_name("atomic_probe.py")


def test_writes_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    assert write_text_atomic(target, '{"a": 1}') == target
    assert target.read_text() == '{"a": 1}'
    write_bytes_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "x.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == 0o644


@pytest.mark.parametrize("existing", [None, "old content"])
def test_exception_leaves_final_name_alone(tmp_path, existing):
    target = tmp_path / "out.txt"
    if existing is not None:
        target.write_text(existing)
    with pytest.raises(RuntimeError, match="interrupted"), atomic_write(target) as f:
        f.write("half of the new")
        raise RuntimeError("interrupted")
    if existing is None:
        assert not target.exists()
    else:
        assert target.read_text() == existing
    assert [p.name for p in tmp_path.iterdir()] == ([] if existing is None else ["out.txt"])


def test_killed_writer_leaves_no_file_at_final_name(tmp_path):
    target = tmp_path / "images_000.h5"
    proc = subprocess.Popen([sys.executable, str(PROBE), str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        temporaries = [p for p in tmp_path.iterdir() if p != target]
        assert len(temporaries) == 1 and temporaries[0].stat().st_size == 8000
        assert temporaries[0].name.startswith(".images_000.tmp") and temporaries[0].suffix == ".h5"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()


def test_atomic_path_for_writers_that_take_a_name(tmp_path):
    target = tmp_path / "table.refl"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".refl" and tmp.exists()
        tmp.unlink()  # e.g. a writer that creates its file afresh
        tmp.write_bytes(b"refl")
        assert not target.exists()
    assert target.read_bytes() == b"refl"
    assert [p.name for p in tmp_path.iterdir()] == ["table.refl"]


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"), atomic_write("never.txt", "a"):
        pass
