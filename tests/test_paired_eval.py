"""benchmarks/paired_eval.py: two evaluations of the same problems, compared pair by pair."""

from __future__ import annotations

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from paired_eval import compare


def test_paired_evaluation_compares_the_same_problems(tmp_path):

    def write(name, correct):
        rows = [{"index": i, "strict_correct": c, "lenient_correct": c, "strict_format": True, "soft_format": True,
                 "reasoning_copied": False, "completion_tokens": 10, "reasoning_tokens": 5} for i, c in enumerate(correct)]  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "problems.jsonl").write_text("\n".join(map(json.dumps, rows)))
        return str(tmp_path / name)

    table = compare(write("a", [False, False, True, False]), write("b", [True, False, True, True]))
    assert table["strict_correct"]["base"][0] == 0.25 and table["strict_correct"]["other"][0] == 0.75
    mean, half = table["strict_correct"]["difference"]
    assert mean == 0.5 and half > 0  # paired: two problems gained, none lost
    assert "notebook_strict_format" not in table  # these records predate that grade
