"""benchmarks/reproduce/make_results.py: seeds grouped per config, mean ± std over the complete seeds only,
the seed-spread rule, and docs/results.md's tables generated from results.json as committed."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from benchmarks.reproduce.make_results import (RESULTS, Stat, best_valid, exceeds_spread, final_test_ppl, group,
                                                 stat, tables)
from benchmarks.results import markers

REPO = Path(__file__).resolve().parents[1]


def run(test: float | None, history: list[tuple[int, float]] = ()) -> dict:
    metrics = {"history": [{"step": s, "valid": {"ppl": v}} for s, v in history]}
    if test is not None:
        metrics["test"] = {"ppl": test}
    return {"complete": test is not None, "metrics": metrics}


def test_seeds_group_by_config_and_only_complete_seeds_count():
    runs = {"wt_a_n8_s1": run(42.0), "wt_a_n8_s0": run(40.0), "wt_a_n8_s2": run(None),  # s2 stopped
            "wt_a_n8_extra_s0": run(50.0), "bundled_l6": run(1.0)}
    groups = group(runs)
    assert set(groups) == {"wt_a_n8", "wt_a_n8_extra"}  # no _sN: not a seeded run
    assert list(groups["wt_a_n8"]) == [0, 1, 2]
    s = stat(groups["wt_a_n8"], final_test_ppl)
    assert s.seeds == (0, 1) and s.values == (40.0, 42.0)
    # by hand: mean 41, sample std sqrt(((40-41)^2 + (42-41)^2) / (2-1)) = sqrt(2)
    assert s.mean == 41.0 and math.isclose(s.std, math.sqrt(2))
    assert s.text() == "41.00 ± 1.41" and s.per_seed() == "40.00 / 42.00"
    one = stat(groups["wt_a_n8_extra"], final_test_ppl)
    assert one.std is None and one.text() == "50.00 (1 seed)"


def test_best_valid_is_the_lowest_evaluation_and_its_step():
    assert best_valid(run(1.0, [(0, 9000.0), (1000, 60.0), (2000, 47.5), (3000, 49.0)])) == (47.5, 2000)


def test_seed_spread_rule_by_hand():
    # pooled std of (40, 42) and (44, 46): sqrt((1+1+1+1) / 2) = sqrt(2); |Δ| = 4 > 2·sqrt(2) = 2.83, apart
    assert exceeds_spread(Stat((0, 1), (40.0, 42.0)), Stat((0, 1), (44.0, 46.0))) is True
    # |Δ| = 2.5 < 2.83 although the ranges do not overlap
    assert exceeds_spread(Stat((0, 1), (40.0, 42.0)), Stat((0, 1), (42.5, 44.5))) is False
    # far apart in the mean, but the seeds overlap
    assert exceeds_spread(Stat((0, 1), (40.0, 50.0)), Stat((0, 1), (49.0, 70.0))) is False
    # one seed a side: the other side's spread alone (std sqrt(2)); 45 vs mean 41: 4 > 2.83
    assert exceeds_spread(Stat((0, 1), (40.0, 42.0)), Stat((0,), (45.0,))) is True
    assert exceeds_spread(Stat((0,), (40.0,)), Stat((0,), (45.0,))) is None


def test_results_doc_tables_are_generated_from_results_json():
    begin, end = markers("results-tables")
    doc = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    block = re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), doc, re.S).group(1)
    assert block == tables(json.loads(RESULTS.read_text())).strip()
