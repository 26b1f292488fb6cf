"""The sweep's Optuna storage: small pinged pools on a database server (tests/cluster counts
the connections against a real PostgreSQL with four workers)."""

from __future__ import annotations

from fce.storage import POOL_OVERFLOW, POOL_SIZE, StudyStorage, engine_options


def test_server_connections_are_pooled_small_and_pinged():
    options = engine_options("postgresql+psycopg://u:p@host/db")
    assert options["pool_size"] + options["max_overflow"] == POOL_SIZE + POOL_OVERFLOW == 3
    assert options["pool_pre_ping"] is True and options["pool_recycle"] > 0
    assert options["connect_args"] == {"application_name": "fce-sweep"}
    assert "pool_size" not in engine_options("sqlite:///x.db")


def test_a_sqlite_storage_waits_for_the_write_lock(tmp_path):
    import optuna

    storage = StudyStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    assert len(study.trials) == 2
    assert engine_options(storage.url)["connect_args"] == {"timeout": 60}
