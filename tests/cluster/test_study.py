"""Optuna studies on PostgreSQL, logged to the MLflow tracking server, as several machines would
run them: independent `sweeps/tune.py` processes that share only the database and the server."""

from __future__ import annotations

import signal
import time

import pytest
from mlflow.tracking import MlflowClient

from fce.storage import APPLICATION_NAME, POOL_OVERFLOW, POOL_SIZE
from tests.cluster.helpers import (
    STUDY_TINY,
    children_by_trial,
    finish,
    machine,
    mlflow_runs,
    start,
    study_args,
    trials,
    wait_until,
)
from tests.helpers import HANG_GUARD_S

pytestmark = pytest.mark.cluster

MAX_STEPS = int(next(a for a in STUDY_TINY if a.startswith("train.max_steps=")).split("=")[1])


def trial_dirs(directory, name):
    # A study's trials are under <study name>-<the study's key>.
    return {p.name for p in directory.glob(f"multirun/optuna/{name}-*/trial_*")}


def test_two_machines_share_one_study_on_postgres_and_log_to_the_tracking_server(
    cluster, name, tmp_path
):
    client = MlflowClient(tracking_uri=cluster.tracking_uri)
    # A run that has nothing to do with the study, named by MLFLOW_RUN_ID on machine b: MLflow's
    # fluent API would log into it; the sweep's trials must still be children of the study.
    decoy = client.create_run(client.create_experiment(f"{name}-decoy")).info.run_id
    args = study_args(cluster, name, "sweep.n_trials=8")
    a = start(args, machine(tmp_path, "a"), cluster.env())
    b = start(args, machine(tmp_path, "b"), cluster.env(MLFLOW_RUN_ID=decoy))
    finish(a), finish(b)

    done = trials(cluster, name)
    assert sorted(t.number for t in done) == list(range(8))
    assert {t.state.name for t in done} == {"COMPLETE"}
    ran_a, ran_b = trial_dirs(tmp_path / "a", name), trial_dirs(tmp_path / "b", name)
    assert ran_a and ran_b and not ran_a & ran_b, (ran_a, ran_b)  # both worked, none twice
    assert len(ran_a | ran_b) == 8

    client, found = mlflow_runs(cluster, name)
    parents = [r for r in found if r.info.run_name == f"study-{name}"]
    assert len(parents) == 1, [r.info.run_name for r in found]
    parent = parents[0]
    by_trial = children_by_trial(found)
    assert sorted(by_trial) == list(range(8))
    for trial in done:
        (run,) = by_trial[trial.number]
        run_id = run.info.run_id
        assert trial.user_attrs["mlflow_run_id"] == run_id
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.tags["optuna.state"] == "COMPLETE"
        # Artifacts went through the server (no shared filesystem with the client).
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        for key, value in trial.params.items():
            assert float(run.data.params[key]) == pytest.approx(value)
        # The objective Optuna saw at each evaluation is the metric history MLflow holds.
        history = client.get_metric_history(run_id, "nll_ebm")
        assert {m.step: m.value for m in history} == pytest.approx(trial.intermediate_values)
        assert trial.value == pytest.approx(max(history, key=lambda m: m.step).value)
        values = client.get_metric_history(run_id, "value")
        assert len({m.step for m in values}) == MAX_STEPS
        panels = [f.path for f in client.list_artifacts(run_id, "densities")]
        assert panels and all(p.endswith(".png") for p in panels)
        local = client.download_artifacts(run_id, panels[-1], str(tmp_path / "fetched"))
        with open(local, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    best = min(done, key=lambda t: t.value)
    parent = client.get_run(parent.info.run_id)
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.metrics["best_nll_ebm"] == pytest.approx(best.value)
    decoy_run = client.get_run(decoy)
    assert not any(k.startswith("optuna.") for k in decoy_run.data.tags)
    assert not decoy_run.data.metrics


def test_a_worker_killed_mid_trial_is_failed_by_the_heartbeat_and_the_study_goes_on(
    cluster, name, tmp_path
):
    args = study_args(cluster, name, "sweep.n_trials=8", "train.max_steps=300")
    a = start(args, machine(tmp_path, "a"), cluster.env())
    b = start(args, machine(tmp_path, "b"), cluster.env())
    started = wait_until(
        lambda: list((tmp_path / "b").glob(f"multirun/optuna/{name}-*/trial_*/config.yaml")),
        timeout=HANG_GUARD_S,
        what="machine b to start a trial",
    )
    killed = int(started[0].parent.name.removeprefix("trial_"))
    # Into the trial: its MLflow run exists and Optuna knows it (a run writes its config.yaml
    # before it opens its MLflow run).
    wait_until(
        lambda: "mlflow_run_id" in trials(cluster, name)[killed].user_attrs,
        timeout=HANG_GUARD_S,
        what="the trial's MLflow run",
    )
    time.sleep(1.0)
    b.send_signal(signal.SIGKILL)
    b.wait()
    assert trials(cluster, name)[killed].state.name in ("RUNNING", "FAIL")
    output_a = finish(a)  # machine a goes on to the study's total

    done = trials(cluster, name)
    # A RUNNING trial counts towards the total until it is failed: if a ran out of trials
    # before the grace period ended, the next start fails it (below); if not, a ran another
    # in its place (a killed trial does not count).
    assert len(done) in (8, 9)
    assert done[killed].state.name in ("FAIL", "RUNNING")
    # The study's own run settings (a continuation with others is refused).
    more = study_args(cluster, name, "sweep.n_trials=10", "train.max_steps=300")
    rerun = finish(start(more, tmp_path / "b", cluster.env()))
    assert "stopped beating; marked FAIL" in output_a + rerun

    done = trials(cluster, name)
    assert sorted(t.number for t in done) == list(range(11))  # ten finished, one killed
    states = {t.number: t.state.name for t in done}
    assert states[killed] == "FAIL"
    assert [n for n, s in states.items() if s != "COMPLETE"] == [killed], states
    params = [tuple(sorted(t.params.items())) for t in done if t.state.name == "COMPLETE"]
    assert len(set(params)) == len(params) == 10  # no trial run twice

    _, found = mlflow_runs(cluster, name)
    by_trial = children_by_trial(found)
    assert sorted(by_trial) == list(range(11))
    assert all(len(runs) == 1 for runs in by_trial.values()), by_trial
    (dead,) = by_trial[killed]
    assert dead.info.status == "KILLED" and dead.data.tags["optuna.state"] == "FAIL"
    assert {r.info.status for n, (r,) in by_trial.items() if n != killed} == {"FINISHED"}
    assert "RUNNING" not in {r.info.status for r in found}


def test_connections_to_postgres_stay_bounded_with_four_workers(cluster, name, tmp_path):
    workers = 4
    proc = start(
        study_args(cluster, name, "sweep.n_trials=8", f"sweep.n_jobs={workers}"),
        machine(tmp_path, "a"),
        cluster.env(),
    )
    optuna_peak = mlflow_peak = 0
    while proc.poll() is None:
        optuna_peak = max(optuna_peak, cluster.connections("optuna", APPLICATION_NAME))
        mlflow_peak = max(mlflow_peak, cluster.connections("mlflow"))
        time.sleep(0.1)
    output = finish(proc)
    assert {t.state.name for t in trials(cluster, name)} == {"COMPLETE"}, output[-3000:]
    print(f"peak connections with {workers} workers: optuna {optuna_peak}, mlflow {mlflow_peak}")
    # Every worker and the driver hold one pooled connection, and at most one more at once.
    assert workers <= optuna_peak <= (POOL_SIZE + POOL_OVERFLOW) * (workers + 1)
    # The tracking server's pools: 2 + 2 overflow per engine, two engines (runs, registry) in
    # each of its processes (the parent and 2 workers), as sweeps/cluster/cluster.sh sets them.
    assert 1 <= mlflow_peak <= (2 + 2) * 2 * 3


@pytest.mark.parametrize("server", ["postgres", "mlflow"])
def test_a_server_restarted_mid_study_leaves_no_trial_running(cluster, name, tmp_path, server):
    args = study_args(cluster, name, "sweep.n_trials=8", "sweep.n_jobs=2", "train.max_steps=200")
    proc = start(args, machine(tmp_path, "a"), cluster.env())
    wait_until(
        lambda: sum(t.state.name == "COMPLETE" for t in trials(cluster, name)) >= 2,
        timeout=HANG_GUARD_S,
        what="two trials to complete",
        interval=1.0,
    )
    restarted = time.time()
    cluster.script("restart", server)
    output = finish(proc)

    done = trials(cluster, name)
    # Eight finished; a trial cut off by the restarted database fails without counting.
    assert len(done) >= 8
    states = [t.state.name for t in done]
    assert set(states) <= {"COMPLETE", "FAIL"}, states  # nothing left RUNNING
    # The study went on: trials started after the restart completed.
    after = [t for t in done if t.datetime_start.timestamp() > restarted]
    assert any(t.state.name == "COMPLETE" for t in after), (states, output[-3000:])
    _, found = mlflow_runs(cluster, name)
    by_trial = children_by_trial(found)
    for trial in done:
        runs = by_trial.get(trial.number, [])
        if trial.state.name == "COMPLETE":
            assert [r.info.status for r in runs] == ["FINISHED"], trial.number
        else:  # failed before or after its MLflow run began
            assert len(runs) <= 1 and {r.info.status for r in runs} <= {"FAILED", "KILLED"}
    assert "RUNNING" not in {r.info.status for r in found}
