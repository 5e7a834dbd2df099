"""benchmarks/spread_campaign.py's design fingerprint: the key of the records' ``parameters`` and
of the mid-replicate checkpoints holds what decides a replicate's answer and nothing else (a
checkpoint carried to another output directory, or rerun with other shards, must resume)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from spread_campaign import checkpoint_path, design_fingerprint, read_params  # noqa: E402

from spread_dials.util import phil_lite  # noqa: E402

SMOKE = str(REPO / "phil" / "campaign" / "ci_smoke.phil")


def _fingerprint(*overrides: str) -> str:
    return design_fingerprint(read_params([SMOKE], list(overrides), use_libtbx=False))


def test_where_and_how_a_replicate_runs_leaves_the_fingerprint_alone():
    base = _fingerprint()
    assert _fingerprint("output.directory=elsewhere", "output.name=other") == base
    assert _fingerprint("ladder.shards=8", "ladder.shard=5", "ladder.n=1000", "ladder.replicates=8") == base
    assert _fingerprint("mpi=True", "device=cuda") == base


def test_what_decides_the_answer_changes_the_fingerprint():
    base = _fingerprint()
    changed = [_fingerprint(o) for o in ("case.truth_shift=1.5", "ladder.seed=2", "refine.sum_channels=True", "refine.macrocycles=2")]
    assert base not in changed and len(set(changed)) == len(changed)


def test_the_checkpoint_is_named_without_the_shard():
    names = {checkpoint_path(phil_lite.as_namespace(read_params([SMOKE], [f"ladder.shards={k}", "ladder.shard=0"], use_libtbx=False)),
                             "abc", 4, 0) for k in (1, 8)}  # fmt: skip
    assert len(names) == 1
