"""spread_dials.util.program and spread_dials.phil.common, through a real toy program run as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from libtbx.phil import parse

from spread_dials.phil import common
from spread_dials.util.program import Sorry, SpreadError, handle_errors

TOY = Path(__file__).with_name("toy_program.py")


def run_toy(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOY), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def assert_one_line_sorry(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Sorry: ") and text in lines[0], lines[0]


@pytest.mark.parametrize("name", ["device_phil", "mp_phil", "output_phil", "random_phil", "common_phil"])
def test_common_scopes_include(name):
    scope = parse(f"include scope spread_dials.phil.common.{name}\nextra = 1\n  .type = int", process_includes=True)
    params = scope.extract()
    assert params.extra == 1
    top = {o.name for o in scope.objects} - {"extra"}
    expected = {"device", "mp", "output", "random"} if name == "common_phil" else {name[: -len("_phil")]}
    assert top == expected


def test_common_defaults_and_help():
    scope = parse(common.common_phil)
    p = scope.extract()
    assert (p.device.name, p.device.dtype) == ("auto", "float32")
    assert (p.mp.method, p.mp.nproc) == ("serial", 1)
    assert (p.output.directory, p.output.prefix, p.output.log) == (".", None, None)
    assert p.random.seed == 0
    for definition in scope.all_definitions():
        assert definition.object.help, f"{definition.path} has no .help"


def test_help(tmp_path):
    r = run_toy(tmp_path, "-h")
    assert r.returncode == 0, r.stderr
    assert "usage: dials.spread_toy [options] [toy.phil]" in r.stdout
    assert "toy_program.py greeting=hello" in r.stdout  # the docstring epilog
    assert "greeting = hi" in r.stdout and "secret" not in r.stdout
    assert not list(tmp_path.iterdir())  # -h writes nothing, not even a log


def test_show_config_expert_and_attributes_levels(tmp_path):
    plain = run_toy(tmp_path, "-c")
    assert plain.returncode == 0, plain.stderr
    assert "name = *auto cpu cuda" in plain.stdout and "method = *serial mpi" in plain.stdout
    assert "secret" not in plain.stdout and "log = None" not in plain.stdout
    expert = run_toy(tmp_path, "-c", "-e", "2")
    assert "secret = 3" in expert.stdout and "log = None" in expert.stdout
    attributes = run_toy(tmp_path, "-c", "-a", "1")
    assert '.help = "Floating-point precision' in attributes.stdout


def test_phil_file_and_key_value(tmp_path):
    (tmp_path / "toy.phil").write_text("greeting = from_file\nrandom.seed = 7\ndevice.dtype = float64\n")
    r = run_toy(tmp_path, "toy.phil", "greeting=from_cli", "output.directory=out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "toy.txt").read_text().splitlines() == ["from_cli", "cpu", "torch.float64"]
    log = (tmp_path / "out" / "dials.spread_toy.log").read_text()
    assert "toy greeting: from_cli (seed 7, device cpu)" in log
    assert "The following parameters have been modified:" in log and "seed = 7" in log
    assert "DIALS 3." in log and "spread_dials" in log
    assert not (tmp_path / "dials.spread_toy.log").exists()


def test_log_file_default_name(tmp_path):
    r = run_toy(tmp_path, "greeting=logged")
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "dials.spread_toy.log").read_text()
    assert "toy greeting: logged" in log and "Device: cpu, float32" in log
    assert "toy greeting: logged" in r.stdout


@pytest.mark.parametrize(
    "arg, text",
    [
        ("bogus=1", "Unknown command line parameter definition: bogus = 1"),
        ("mp.nproc=0", "mp.nproc element is less than the minimum allowed value"),
        ("device.name=gpu", "Not a possible choice for device.name: gpu"),
    ],
)
def test_bad_parameter_is_sorry(tmp_path, arg, text):
    r = run_toy(tmp_path, arg)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"Sorry: {text}"), r.stderr
    if arg == "bogus=1":
        assert_one_line_sorry(r, text)


def test_spread_error_in_run(tmp_path):
    r = run_toy(tmp_path, "fail=True", "greeting=boom", "output.directory=new/sub")
    assert_one_line_sorry(r, "toy failure requested (greeting=boom)")
    assert not list(tmp_path.iterdir())  # no log, and no output directory made for nothing


def test_refused_run_leaves_the_directory_as_it_was(tmp_path, capsys):
    """Refused before its inputs are accepted: the log of the run already in the directory is
    untouched and no temporary log is left.  Refused after: the log keeps the message."""
    from tests.util import toy_program

    def toy(*args: str) -> int:
        with pytest.raises(SystemExit) as info:
            toy_program.run([*args, f"output.directory={tmp_path}"])
            raise SystemExit(0)
        return info.value.code

    assert toy("greeting=first") == 0
    first = (tmp_path / "dials.spread_toy.log").read_text()
    assert toy("fail=True") == 1
    assert (tmp_path / "dials.spread_toy.log").read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dials.spread_toy.log", "toy.txt"]  # no temporary log
    assert toy("fail_after_accept=True") == 1
    log = (tmp_path / "dials.spread_toy.log").read_text()
    assert "toy greeting: hi" in log and "Sorry: toy failure after its inputs were accepted" in log
    assert capsys.readouterr().err.splitlines() == ["Sorry: toy failure requested (greeting=hi)",
                                                    "Sorry: toy failure after its inputs were accepted"]  # fmt: skip


def test_unwritable_output_is_one_line_sorry(tmp_path, read_only_dir):
    """A directory that cannot be written (read-only, which even root cannot write) is one line."""
    r = run_toy(tmp_path, f"output.directory={read_only_dir}")
    assert_one_line_sorry(r, f"cannot write in output.directory {str(read_only_dir)!r}: Read-only file system")
    r = run_toy(tmp_path, f"output.directory={read_only_dir / 'sub'}")
    assert_one_line_sorry(r, "cannot create output.directory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path):
    r = run_toy(tmp_path, "device.name=cuda")
    assert_one_line_sorry(r, "device.name=cuda was requested but")


def test_handle_errors_in_process(capsys):
    @handle_errors
    def bad():
        raise SpreadError("bad input here")

    @handle_errors
    def good(x):
        return x + 1

    with pytest.raises(SystemExit) as info:
        bad()
    assert info.value.code == 1
    assert capsys.readouterr().err == "Sorry: bad input here\n"
    assert good(1) == 2
    assert issubclass(SpreadError, Sorry)


def test_handle_errors_keeps_bugs_visible():
    @handle_errors
    def buggy():
        raise ZeroDivisionError("a bug, not a user error")

    with pytest.raises(ZeroDivisionError):
        buggy()
