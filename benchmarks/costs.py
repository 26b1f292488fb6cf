"""What a run costs, per estimator, per experiment and per sweep worker: the table in
docs/performance.md and its summary in README.md, made from the results in benchmarks/results/.

    python benchmarks/costs.py            # print the table
    python benchmarks/costs.py --write    # put them in docs/performance.md and README.md

Every line names the command that measured it and the JSON it reads, so the table is remade,
never retyped, when a benchmark is rerun.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
from pathlib import Path

from analysis.regions import Region, write
from fce.config import DATASET_NAMES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
PERFORMANCE = ROOT / "docs" / "performance.md"
COMMAND = "python benchmarks/costs.py --write"
DEFAULT_STEPS = 5000


def _load(name: str):
    return json.loads((RESULTS / name).read_text())


def _range(runs: list[dict]) -> str:
    times = sorted(r["seconds"] for r in runs)
    return f"{times[0]:.0f} s" if len(times) == 1 else f"{times[0]:.0f}-{times[-1]:.0f} s"


def _seconds(runs: list[dict]) -> str:
    times = sorted(r["seconds"] for r in runs)
    if len(times) == 1:
        return f"{times[0]:.0f} s (one run)"
    return (
        f"{times[0]:.0f} to {times[-1]:.0f} s, median {statistics.median(times):.0f} "
        f"({len(times)} runs)"
    )


def _truth_command(runs: list[dict], name: str) -> str:
    """The benchmarks/truth.py command that made these runs (from what each run records)."""
    run = runs[0]
    words = ["python benchmarks/truth.py"]
    if run["experiment"] != "truth":
        words += ["--experiment", run["experiment"]]
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    if sorted(datasets) != sorted(DATASET_NAMES):
        words += ["--datasets", *datasets]
    seeds = sorted({r["seed"] for r in runs})
    if seeds != [0, 1, 2]:
        words += ["--seeds", *map(str, seeds)]
    label = run["label"]
    words += ["--label", f"'{label}'" if " " in label else label, *run["overrides"]]
    return f"`{' '.join(words)}` ({name})"


def rows() -> list[tuple[str, str, str]]:
    """(what, cost, measured by) per line of the table."""
    speed = _load("speed.json")["default_run"]
    steps = _load("estimator_steps.json")["ms_per_step"]
    scaling = _load("scaling.json")
    fce_run = speed["run_wall_s"]

    def per_step(key: str) -> str:
        ms = steps[key]
        alone = ms * DEFAULT_STEPS / 1e3
        return f"{ms:.1f} ms a step; {DEFAULT_STEPS:,} steps: {alone:.0f} s"

    by_steps = "`python benchmarks/estimator_steps.py --json` (estimator_steps.json)"
    out = [
        (
            "`python run.py` (FCE, Glow, 5,000 steps)",
            f"{fce_run:.0f} s in all, {speed['run_peak_rss_gib']:.2f} GiB",
            "`python benchmarks/speed.py` (speed.json)",
        ),
        (
            "`estimator=fce`",
            f"{steps['fce_ebm_step']:.1f} ms an EBM step, {steps['fce_flow_step']:.1f} ms a "
            "flow step",
            by_steps,
        ),
        ("`estimator=nce`", per_step("nce_step"), by_steps),
        ("`estimator=flow_mle`", per_step("flow_mle_step"), by_steps),
        (
            "`estimator=mle` (grid_cells 128, its default)",
            f"{per_step('mle_step_cells_128')}, "
            f"{steps['mle_step_cells_128'] * DEFAULT_STEPS / 1e3 / fce_run:.1f}x FCE's whole run",
            by_steps,
        ),
        ("`estimator=mle estimator.grid_cells=64`", per_step("mle_step_cells_64"), by_steps),
        ("`estimator=mle estimator.grid_cells=256`", per_step("mle_step_cells_256"), by_steps),
    ]
    smoke = _load("smoke.json")
    out.append(
        (
            f"`experiment=smoke` ({smoke[0]['steps']} steps)",
            _seconds(smoke),
            _truth_command(smoke, "smoke.json, on a shared machine"),
        )
    )
    for label, name in [
        ("FCE", "truth_fce.json"),
        ("NCE", "truth_nce.json"),
        ("flow-MLE", "truth_flow_mle.json"),
        ("exact MLE, grid_cells 64", "truth_mle.json"),
        ("exact MLE, grid_cells 128", "truth_mle128.json"),
    ]:
        runs = _load(name)
        out.append(
            (
                f"`experiment=truth` ({runs[0]['steps']:,} steps), {label}",
                _seconds(runs),
                _truth_command(runs, name),
            )
        )
    pilot = _load("truth_pilot_issue28.json")["runs"]
    time = {(r["label"], r["dataset"], r["seed"]): r["wall_time_s"] for r in pilot}
    ratios = sorted(
        seconds / time[("recipe", *key)]
        for (label, *key), seconds in time.items()
        if label == "covering"
    )
    out.append(
        (
            "`experiment=truth_both` (both models every step)",
            f"{ratios[0]:.1f}-{ratios[-1]:.1f}x `experiment=truth`'s time, the same dataset "
            f"and seed side by side ({len(ratios)} pairs, two runs at a time on a busy machine)",
            "docs/truth.md's pilot (truth_pilot_issue28.json)",
        )
    )
    reference = _load("truth_reference.json")
    out.append(
        (
            f"`experiment=reference` ({reference[0]['steps']:,} steps), FCE",
            _seconds(reference),
            _truth_command(reference, "truth_reference.json"),
        )
    )
    one, two = (next(r for r in scaling["runs"] if r["workers"] == n) for n in (1, 2))
    out.append(
        (
            "`sweep.n_jobs=2` against 1, on 2 idle cores",
            f"{scaling['ratio_2_vs_1']:.2f}x the trials an hour ({two['trials_per_hour']:.0f} "
            f"against {one['trials_per_hour']:.0f}); a trial {two['trial_s_mean']:.0f} s "
            f"against {one['trial_s_mean']:.0f} s",
            "`python benchmarks/scaling.py` (scaling.json)",
        )
    )
    return out


def table() -> str:
    lines = [
        "| what | cost (one thread a run) | measured by (its JSON in benchmarks/results/) |",
        "|---|---|---|",
    ]
    lines += [f"| {what} | {cost} | {source} |" for what, cost, source in rows()]
    return "\n".join(lines) + "\n"


def summary() -> str:
    """README's few lines: the default run, each estimator, each experiment, a second worker."""
    steps = _load("estimator_steps.json")["ms_per_step"]
    fce_run = _load("speed.json")["default_run"]["run_wall_s"]
    scaling = _load("scaling.json")

    def alone(key: str) -> str:
        return f"{steps[key] * DEFAULT_STEPS / 1e3:.0f} s"

    mle = steps["mle_step_cells_128"] * DEFAULT_STEPS / 1e3
    text = (
        f"`python run.py` {fce_run:.0f} s; {DEFAULT_STEPS:,} steps of `estimator=nce` "
        f"{alone('nce_step')}, `flow_mle` {alone('flow_mle_step')}, `mle` {mle:.0f} s "
        f"({mle / fce_run:.1f}x FCE's whole run; `estimator.grid_cells=64`: "
        f"{alone('mle_step_cells_64')}); `experiment=smoke` {_range(_load('smoke.json'))}, "
        f"`truth` {_range(_load('truth_fce.json'))}, "
        f"`reference` {_range(_load('truth_reference.json'))}. `sweep.n_jobs=2` gives "
        f"{scaling['ratio_2_vs_1']:.2f}x the trials an hour where each worker has an idle core, "
        "and nothing where the cores are busy."
    )
    return textwrap.fill(text, width=96, break_on_hyphens=False) + "\n"


# The table in docs/performance.md, its summary in README.md (analysis.regions).
REGIONS = [
    Region(README, "costs summary", COMMAND, summary),
    Region(PERFORMANCE, "costs", COMMAND, table),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="update README.md and the docs")
    args = parser.parse_args(argv)
    if not args.write:
        sys.stdout.write(table())
        return 0
    return write(REGIONS, "costs.py")


if __name__ == "__main__":
    sys.exit(main())
