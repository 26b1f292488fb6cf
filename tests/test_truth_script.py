"""benchmarks/truth.py: runs on held-out seeds, their timelines, time to truth, the tables."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

from tests.helpers import HANG_GUARD_S, ROOT, children, proc_cmdline, wait_gone

SCRIPT = ROOT / "benchmarks" / "truth.py"
TINY = [
    "train.max_steps=30",
    "train.eval_every=10",
    "dataset.n_samples=2000",
    "train.batch_size=100",
    "eval.n_points=500",
    "eval.grid_cells=32",
    "flow.n_layers=1",
    "ebm.hidden=[16]",
]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True
    )


def test_runs_record_timelines_continue_and_report(tmp_path):
    out = tmp_path / "truth.json"
    first = run(
        "--datasets", "8gaussians", "--seeds", "0", "--jobs", "1", "--out", str(out), *TINY
    )
    assert first.returncode == 0, first.stderr
    (record,) = json.loads(out.read_text())
    assert (record["dataset"], record["seed"], record["label"]) == ("8gaussians", 0, "fce")
    assert record["error"] is None and record["steps"] == 30
    assert [p["step"] for p in record["timeline"]] == [0, 10, 20, 30]
    seconds = [p["seconds"] for p in record["timeline"]]
    assert seconds == sorted(seconds) and seconds[-1] <= record["seconds"]
    assert record["final"]["kl_data_ebm"] == record["timeline"][-1]["kl_data_ebm"]
    # A second batch with another label adds to the file; the same label is not run again.
    again = run(
        "--datasets", "8gaussians", "--seeds", "0", "--jobs", "1", "--out", str(out), *TINY
    )
    assert again.returncode == 0 and len(json.loads(out.read_text())) == 1
    nce = run(
        "--datasets",
        "8gaussians",
        "--seeds",
        "0",
        "--jobs",
        "1",
        "--label",
        "nce",
        "--out",
        str(out),
        *TINY,
        "estimator=nce",
    )
    assert nce.returncode == 0, nce.stderr
    report = run("--report", str(out), "--equal-time", "fce")
    assert report.returncode == 0, report.stderr
    rows = [line for line in report.stdout.splitlines() if line.startswith("| 8gaussians")]
    assert len(rows) == 3  # fce, nce, and the equal-time row
    assert f"{record['final']['kl_data_ebm']:.3f}" in rows[0]


def test_time_to_truth_is_the_first_evaluation_at_or_under_the_target():
    from analysis import truth  # the script's tables

    timeline = [
        {"step": 0, "seconds": 0.0, "kl_data_ebm": 2.0},
        {"step": 500, "seconds": 9.0, "kl_data_ebm": 0.08},
        {"step": 1000, "seconds": 18.0, "kl_data_ebm": 0.12},
        {"step": 1500, "seconds": 27.0, "kl_data_ebm": 0.04},
    ]
    run_ = {"metric": "kl_data_ebm", "timeline": timeline}
    assert truth.first_reach(run_, 0.1) == (9.0, 500)
    assert truth.first_reach(run_, 0.05) == (27.0, 1500)
    assert truth.first_reach(run_, 0.01) is None
    assert truth.at_time(run_, 20.0) == 0.12


def fake(label: str, dataset: str, seed: int, metric: str, **final: float) -> dict:
    """A run as benchmarks/truth.py records it, with only its final metrics."""
    return {
        "label": label,
        "dataset": dataset,
        "seed": seed,
        "metric": metric,
        "final": final,
        "timeline": [],
        "error": None,
        "seconds": 1.0,
        "steps": 1,
    }


def cells(text: str) -> list[list[str]]:
    """The markdown table's lines, header first, as their cells (the rule left out)."""
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ")
    ]


def by_dataset(text: str) -> dict[str, list[str]]:
    return {row[0]: row for row in cells(text)[1:]}


def test_paired_table_differences_seed_by_seed_and_counts_inf_pairs():
    from analysis.truth import paired_table

    runs = [
        # Each run's own metric: FCE's EBM against flow_mle's flow, three seeds.
        *(
            fake("fce", "8gaussians", s, "kl_data_ebm", kl_data_ebm=v)
            for s, v in enumerate((0.10, 0.12, 0.11))
        ),
        *(
            fake("flow_mle", "8gaussians", s, "kl_data_flow", kl_data_flow=v)
            for s, v in enumerate((0.20, 0.21, 0.23))
        ),
        # Seed 3 of fce has no flow_mle partner; seed 2's reverse KL is inf.
        *(
            fake("fce", "checkerboard", s, "kl_data_ebm", kl_flow_data=v)
            for s, v in enumerate((0.5, 0.6, math.inf, 0.4))
        ),
        *(
            fake("flow_mle", "checkerboard", s, "kl_data_flow", kl_flow_data=v)
            for s, v in enumerate((0.5, 0.7, 0.6))
        ),
    ]
    own = by_dataset(paired_table(runs, "fce", "flow_mle"))
    assert own["8gaussians"][1:] == [
        "kl_data_ebm / kl_data_flow",
        "3",
        "3",
        "0, 0",
        "0.110",
        "0.213",
        "-0.103 (SE 0.009)",  # differences -0.10, -0.09, -0.12: std 0.0153 / sqrt(3)
        "3/3",
        "fce better",
    ]
    text = paired_table(runs, "fce", "flow_mle", "kl_flow_data")
    reverse = by_dataset(text)
    # Seeds 0-2 pair; seed 2 is inf for fce: counted, left out of the means, not dropped.
    assert reverse["checkerboard"][1:] == [
        "kl_flow_data",
        "3",
        "2",
        "1, 0",
        "0.550",
        "0.600",
        "-0.050 (SE 0.050)",
        "1/2",
        "tie",  # |-0.05| is not over 2 SE
    ]
    assert reverse["8gaussians"][3:] == ["0", "0, 0", "-", "-", "-", "-", "-"]  # none logged
    assert "counted in 'inf', not averaged" in text
    # One pair: no standard error, no verdict.
    one = by_dataset(paired_table([r for r in runs if r["seed"] == 0], "fce", "flow_mle"))
    assert one["8gaussians"][-3:] == ["-0.100", "1/1", "-"]


def test_divergences_table_shows_inf_seeds_and_what_a_run_does_not_log():
    from analysis.truth import divergences_table

    runs = [
        fake("fce", "checkerboard", 0, "kl_data_ebm", kl_data_ebm=0.1, kl_ebm_data=0.2),
        fake("fce", "checkerboard", 1, "kl_data_ebm", kl_data_ebm=0.3, kl_ebm_data=math.inf),
        fake("fce", "checkerboard", 2, "kl_data_ebm", kl_data_ebm=0.2, kl_ebm_data=0.4),
        fake(
            "flow_mle", "checkerboard", 0, "kl_data_flow", kl_data_flow=0.1, kl_flow_data=math.inf
        ),
    ]
    text = divergences_table(runs)
    header, *table = cells(text)
    assert header[3:] == [
        "kl_data_ebm",
        "kl_ebm_data",
        "js_ebm_data",
        "kl_data_flow",
        "kl_flow_data",
        "js_flow_data",
    ]
    fce, mle = (dict(zip(header, row)) for row in table)
    assert (fce["label"], fce["seeds"], fce["kl_data_ebm"]) == ("fce", "3", "0.200 ± 0.100")
    # Seed 1's inf is counted, never averaged into a number nor dropped.
    assert fce["kl_ebm_data"] == "inf on 1/3; others 0.300 ± 0.141"
    assert fce["js_ebm_data"] == "-" and fce["kl_data_flow"] == "-"  # not logged
    assert mle["kl_flow_data"] == "inf on 1/1" and mle["kl_data_ebm"] == "-"


def write_runs(path, runs: list[dict]):
    path.write_text(json.dumps(runs))
    return str(path)


def test_report_paired_and_divergences_and_their_one_line_errors(tmp_path):
    runs = [
        fake("fce", "rings", s, "kl_data_ebm", kl_data_ebm=0.1 * s, kl_flow_data=math.inf)
        for s in range(2)
    ]
    runs += [fake("nce", "rings", s, "kl_data_ebm", kl_data_ebm=0.2 * s) for s in range(2)]
    path = write_runs(tmp_path / "runs.json", runs)
    done = run("--report", path, "--paired", "fce", "nce", "--divergences")
    assert done.returncode == 0, done.stderr
    assert "| rings | kl_data_ebm | 2 | 2 | 0, 0 | 0.050 | 0.100 |" in done.stdout
    assert "| rings | fce | 2 | 0.050 ± 0.071 | - | - | - | inf on 2/2 | - |" in done.stdout
    for args, message in (
        (
            ["--paired", "fce", "mle"],
            "--paired mle: no run has that label; labels there: fce, nce",
        ),
        (["--paired", "fce", "nce", "--metric", "kl"], "--metric kl: choose from nll_ebm, "),
        (["--metric", "kl_flow_data"], "--metric: only with --paired A B"),
    ):
        refused = run("--report", path, *args)
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.splitlines()[-1].startswith(f"truth.py: error: {message}")
    refused = run("--paired", "fce", "nce")
    assert refused.stderr.splitlines()[-1] == "truth.py: error: --paired: only with --report FILES"
    other = tmp_path / "pilot.json"  # another script's results, with a note
    other.write_text(json.dumps({"note": "pilot", "runs": []}))
    refused = run("--report", path, str(other))
    assert refused.stderr.splitlines()[-1] == (
        f"truth.py: error: --report {other}: not a list of runs as benchmarks/truth.py writes them"
    )


def test_fill_time_runs_the_steps_that_take_the_other_labels_wall_time(tmp_path):
    """FCE's run took 3 s; this estimator's own run did 100 steps in 10 s: 30 steps."""
    budget = write_runs(
        tmp_path / "fce.json",
        [
            {**fake("fce", "8gaussians", 0, "kl_data_ebm"), "seconds": 3.0},
            {**fake("nce", "8gaussians", 0, "kl_data_ebm"), "seconds": 99.0},  # another label
        ],
    )
    rate = write_runs(
        tmp_path / "own.json",
        [
            {**fake("own", "8gaussians", s, "kl_data_ebm"), "steps": 100, "seconds": 10.0}
            for s in (0, 1)
        ],
    )
    out = tmp_path / "filled.json"
    tiny = [o for o in TINY if not o.startswith("train.max_steps=")]
    common = ["--datasets", "8gaussians", "--jobs", "1", "--label", "filled", "--out", str(out)]
    fill = ["--fill-time", budget, "fce", "--rate-from", rate, "own"]
    # Refused in one line before any run: a seed FCE did not run, a max_steps of one's own.
    refused = run(*common, "--seeds", "0", "1", *fill, *tiny)
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1] == (
        f"truth.py: error: --fill-time {budget} fce: no run of 8gaussians seed 1 there"
    )
    refused = run(*common, "--seeds", "0", *fill, *TINY)
    assert refused.stderr.splitlines()[-1] == (
        "truth.py: error: train.max_steps=30: --fill-time sets train.max_steps for each run; "
        "leave it out"
    )
    assert not out.exists()
    done = run(*common, "--seeds", "0", *fill, *tiny)
    assert done.returncode == 0, done.stderr
    (record,) = json.loads(out.read_text())
    assert record["steps"] == 30 and record["target_seconds"] == 3.0
    assert record["overrides"][-1] == "train.max_steps=30"
    assert [p["step"] for p in record["timeline"]] == [0, 10, 20, 30]


def test_nce_against_the_flow_that_flow_mle_saved(tmp_path):
    """--save-flows writes flow_mle's flow per dataset and seed; --noise-flows gives NCE that
    flow as its fixed noise: NCE's evaluation of its noise is flow_mle's final flow, exactly."""
    flows, out = tmp_path / "flows", tmp_path / "truth.json"
    common = ["--datasets", "8gaussians", "--seeds", "0", "--jobs", "1", "--out", str(out)]
    mle = ["--label", "flow_mle", *TINY, "estimator=flow_mle", "train.ema_decay=0"]
    nce = ["--label", "nce_flow", "--noise-flows", str(flows), *TINY, "estimator=nce"]
    refused = run(*common, *nce)
    assert refused.returncode == 2 and not out.exists()
    assert refused.stderr.splitlines()[-1] == (
        f"truth.py: error: --noise-flows {flows}: no 8gaussians_seed0.pt there (write it with "
        "--save-flows, e.g. estimator=flow_mle on 8gaussians seed 0)"
    )
    done = run(*common, "--save-flows", str(flows), *mle)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in flows.iterdir()] == ["8gaussians_seed0.pt"]  # no scratch left
    done = run(*common, *nce)
    assert done.returncode == 0, done.stderr
    saved, contrasted = json.loads(out.read_text())
    assert saved["flow_file"] == str((flows / "8gaussians_seed0.pt").resolve())
    assert contrasted["overrides"][-2:] == [
        "estimator.noise=flow",
        f"estimator.noise_checkpoint={saved['flow_file']}",
    ]
    for metric in ("kl_data_flow", "kl_flow_data"):
        assert contrasted["final"][metric] == saved["final"][metric]


def test_a_killed_batch_takes_its_runs_with_it(tmp_path):
    """SIGTERM to the script (a scheduler's kill, `kill PID`) ends its worker processes too:
    none trains on, orphaned, beside the next batch."""
    batch = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--datasets", "8gaussians", "--seeds", "0", "--jobs", "1",
         "--out", str(tmp_path / "truth.json"), *TINY, "train.max_steps=1000000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        workers: list[int] = []
        deadline = time.monotonic() + 120
        while not workers and time.monotonic() < deadline:
            time.sleep(0.5)
            workers = [p for p in children(batch.pid) if "spawn_main" in proc_cmdline(p)]
        assert workers, "the batch started no worker within 2 minutes"
        time.sleep(3)  # the worker is training now, not starting up
        batch.send_signal(signal.SIGTERM)
        assert batch.wait(timeout=HANG_GUARD_S) == 128 + signal.SIGTERM
        assert wait_gone(workers, 30) == [], "a worker outlived its killed batch"
        assert not (tmp_path / "truth.json").exists()  # no run finished: nothing recorded
    finally:
        if batch.poll() is None:
            batch.kill()
