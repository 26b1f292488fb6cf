"""The package's one file lock (fce.filelock), which the MLflow store's and the Optuna
storage's locks both take."""

from __future__ import annotations

import fcntl

import pytest

from fce.filelock import file_lock, sqlite_lock
from fce.sweep.locks import STUDY_LOCK, schema_lock
from fce.tracking.housekeeping import store_lock


def held(path) -> bool:
    """Whether another holder has ``path`` locked: a fresh open is a lock of its own, so it
    conflicts even within this process."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def test_a_file_lock_excludes_others_until_released(tmp_path):
    path = tmp_path / "made" / "here.lock"
    with file_lock(path):
        assert held(path)
    assert not held(path)


def test_a_failure_inside_releases_the_lock(tmp_path):
    path = tmp_path / "x.lock"
    with pytest.raises(RuntimeError), file_lock(path):
        raise RuntimeError
    assert not held(path)


def test_the_store_and_the_study_lock_files_beside_a_sqlite_database_differ(tmp_path):
    # A sweep opens the MLflow store while it holds its study's lock: one file for both would
    # wait for ever on itself.
    url = f"sqlite:///{tmp_path / 'same.db'}"
    with schema_lock(url), store_lock(url):
        assert held(tmp_path / f"same.db{STUDY_LOCK}") and held(tmp_path / "same.db.lock")


def test_other_databases_take_no_lock_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with sqlite_lock("postgresql+psycopg://u@h/db", ".lock"), store_lock("http://h:5000"):
        pass
    assert list(tmp_path.iterdir()) == []
