"""benchmarks/records.py: an interrupted append is left out and cut off on resume; a broken line
elsewhere is a Sorry."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from records import append_record, read_records  # noqa: E402


def test_an_unfinished_last_line_is_left_out_and_cut_off_on_resume(tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    assert read_records(path) == []
    append_record(path, {"replicate": 0})
    append_record(path, {"replicate": 1})
    whole = path.read_text()
    path.write_text(whole + json.dumps({"replicate": 2, "theta": [1.0]})[:9])  # killed mid-write
    assert read_records(path) == [{"replicate": 0}, {"replicate": 1}]
    assert "unfinished last line" in capsys.readouterr().err
    assert path.read_text() != whole  # a reader leaves the file alone
    assert read_records(path, repair=True) == [{"replicate": 0}, {"replicate": 1}]
    assert path.read_text() == whole
    append_record(path, {"replicate": 2})
    assert [r["replicate"] for r in read_records(path)] == [0, 1, 2]
    assert not list(tmp_path.glob(".*tmp"))


def test_a_broken_line_inside_the_file_is_a_sorry(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"replicate": 0}\n{"repl\n{"replicate": 2}\n')
    with pytest.raises(SystemExit, match=r"^Sorry: .*line 2 is not a JSON record"):
        read_records(path)
