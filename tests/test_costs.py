"""The costs table of README.md and docs/performance.md: benchmarks/costs.py's, from the JSON
(tests/test_generated_docs.py checks that the files hold what it makes)."""

from __future__ import annotations

import importlib.util

from tests.helpers import ROOT

_spec = importlib.util.spec_from_file_location("costs", ROOT / "benchmarks" / "costs.py")
costs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(costs)


def test_every_estimator_and_experiment_has_a_cost():
    table = costs.table()
    for group in ("estimator", "experiment"):
        for name in sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")):
            assert f"`{group}={name}" in table, f"{group}={name} has no line in the costs table"


def test_the_dearest_estimator_line_reads_its_json():
    ms = costs._load("estimator_steps.json")["ms_per_step"]["mle_step_cells_128"]
    (line,) = [cost for what, cost, _ in costs.rows() if what.startswith("`estimator=mle` ")]
    assert line.startswith(f"{ms:.1f} ms a step; 5,000 steps: {ms * 5:.0f} s")
