"""spread_dials.util.phil_lite (the PHIL reader of machines without libtbx) against libtbx.phil:
every campaign file under phil/campaign/ and a few hand-written texts give the same values
through both; values the reader must give are written out here, not taken from either reader."""

from __future__ import annotations

import sys
from pathlib import Path

import libtbx.phil
import pytest

from spread_dials.util import phil_lite

REPO = Path(__file__).resolve().parents[2]
CAMPAIGN_FILES = sorted((REPO / "phil" / "campaign").glob("*.phil"))

sys.path.insert(0, str(REPO / "benchmarks"))
import spread_campaign  # noqa: E402  (a script's module, found through the path above)

MASTER = """
a {
  n = 30
    .type = ints(value_min=1)
    .help = "numbers, over
             two lines"
  x = None
    .type = float
  c = *one two
    .type = choice
  s = hello world
    .type = str
  b = False
    .type = bool
  fl = 1 2.5
    .type = floats
  st = None
    .type = strings
  deep {
    k = 3
      .type = int
  }
}
top = bench_data
  .type = str
"""


def _libtbx(master: str, texts: list[str], overrides: list[str] = ()) -> dict:
    m = libtbx.phil.parse(master)
    interp = m.command_line_argument_interpreter()
    sources = [libtbx.phil.parse(t) for t in texts] + [interp.process(a) for a in overrides]
    working, unused = m.fetch(sources=sources, track_unused_definitions=True)
    assert not unused
    return {d.path: d.object.extract() for d in working.all_definitions()}


def _lite(master: str, texts: list[str], overrides: list[str] = ()) -> dict:
    m = phil_lite.parse_master(master)
    return phil_lite.apply_overrides(m, phil_lite.fetch(m, [(t, "test") for t in texts]), list(overrides))


USER_TEXTS = [
    "",
    "a.n = 300,1000 3000\na { c = two\n x = 1e-3 }\ntop = \"my dir\" # comment\na.st = FE1 \"FE2 x\"\n",
    "a {\n  deep.k = 5   # five\n  b = True\n}\n# a comment line\na.fl = None\n",
    "a\n{\n  deep\n  {\n    k = -2\n  }\n  s = 'single quoted'\n}\n",
    "a.n = 1\na.n = 2 3\n",  # the last definition wins
]


@pytest.mark.parametrize("text", USER_TEXTS)
def test_texts_read_the_same_as_libtbx(text):
    assert _lite(MASTER, [text]) == _libtbx(MASTER, [text])


def test_known_values():
    values = _lite(MASTER, [USER_TEXTS[1]])
    assert values["a.n"] == [300, 1000, 3000]
    assert values["a.x"] == 0.001 and values["a.c"] == "two" and values["top"] == "my dir"
    assert values["a.st"] == ["FE1", "FE2 x"] and values["a.s"] == "hello world" and values["a.deep.k"] == 3
    assert _lite(MASTER, [USER_TEXTS[2]])["a.fl"] is None


def test_command_line_overrides_match_libtbx():
    args = ["n=5,6", "a.c=two", "k=9", "x=None", "st=p q"]
    lite = _lite(MASTER, [USER_TEXTS[1]], args)
    assert lite == _libtbx(MASTER, [USER_TEXTS[1]], args)
    assert lite["a.n"] == [5, 6] and lite["a.deep.k"] == 9 and lite["a.x"] is None and lite["a.st"] == ["p", "q"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("a.nope = 1", "unknown parameter 'a.nope'"),
        ("a.c = three", "must be one of"),
        ("a.deep.k = 2.5", "not a valid int"),
        ("a.b = maybe", "not a valid bool"),
        ("a {\n  n = 1\n", "not closed"),
        ("include scope x.y", "not supported"),
    ],
)
def test_bad_texts_raise(text, message):
    with pytest.raises(phil_lite.PhilError, match=message):
        _lite(MASTER, [text])


def test_ambiguous_and_unknown_overrides_raise():
    master = phil_lite.parse_master("p { k = 1\n .type = int\n}\nq { k = 2\n .type = int\n}\n")
    values = phil_lite.fetch(master, [])
    with pytest.raises(phil_lite.PhilError, match="ambiguous"):
        phil_lite.apply_overrides(master, values, ["k=3"])
    with pytest.raises(phil_lite.PhilError, match="unknown parameter"):
        phil_lite.apply_overrides(master, values, ["z=3"])
    assert phil_lite.apply_overrides(master, values, ["q.k=3"]) == {"p.k": 1, "q.k": 3}


def test_campaign_files_exist():
    names = {p.stem for p in CAMPAIGN_FILES}
    assert {"ci_smoke", "rubredoxin_ladder", "ferredoxin_ladder", "calibration", "psii_20k", "controls_spoil_hkl",
            "controls_shuffle_channels", "controls_null"} <= names  # fmt: skip


@pytest.mark.parametrize("path", CAMPAIGN_FILES, ids=lambda p: p.name)
def test_every_campaign_file_reads_the_same_through_both(path):
    lite = spread_campaign.read_params([str(path)], [], use_libtbx=False)
    full = spread_campaign.read_params([str(path)], [], use_libtbx=True)
    assert lite == full
    overrides = ["n=5,6", "control=spoil_hkl", "grid.pixel_mm=0.2", "case.truth_states=2 3", "output.name=x y"]
    assert spread_campaign.read_params([str(path)], overrides, use_libtbx=False) == spread_campaign.read_params(
        [str(path)], overrides, use_libtbx=True
    )


def test_campaign_files_say_what_the_issue_asks():
    read = {p.stem: spread_campaign.read_params([str(p)], [], use_libtbx=False) for p in CAMPAIGN_FILES}
    assert read["rubredoxin_ladder"]["ladder.n"] == [300, 1000, 3000, 10000, 20000]
    assert read["ferredoxin_ladder"]["case.name"] == "ferredoxin"
    assert read["psii_20k"]["ladder.n"] == [20000] and read["psii_20k"]["case.name"] == "psii"
    assert read["calibration"]["ladder.replicates"] >= 100 and read["calibration"]["case.truth_prior_sigma_eV"] > 0
    assert read["controls_null"]["case.truth_states"] == [2, 2]
    assert {read[k]["control"] for k in ("controls_spoil_hkl", "controls_shuffle_channels")} == {"spoil_hkl",
                                                                                                 "shuffle_channels"}
    assert read["ci_smoke"]["ladder.n"] == [2, 4] and read["ci_smoke"]["detector.type"] == "grid"


def test_old_flags_map_to_phil(capsys):
    assert spread_campaign.main(["--case", "ferredoxin", "--n", "3,4", "--out", "elsewhere", "--truth-shift", "1.5",
                                 "--phil-reader", "lite", "--show-phil"]) == 0  # fmt: skip
    shown = dict(line.split(" = ", 1) for line in capsys.readouterr().out.splitlines())
    assert shown["case.name"] == "ferredoxin" and shown["ladder.n"] == "[3, 4]"
    assert shown["output.directory"] == "elsewhere" and shown["case.truth_shift"] == "[1.5]"


def test_a_bad_campaign_file_is_one_sorry(tmp_path, capsys):
    bad = tmp_path / "bad.phil"
    bad.write_text("ladder.n = three\n")
    for reader in ("lite", "libtbx"):
        assert spread_campaign.main([str(bad), "--phil-reader", reader, "--show-phil"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("Sorry: ") and "three" in err[0], err
