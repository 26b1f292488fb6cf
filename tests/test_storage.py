"""The sweep's Optuna storage: the study's total and its one-time attributes (on SQLite here;
tests/cluster runs the same against PostgreSQL with independent processes)."""

from __future__ import annotations

import pytest

from fce.storage import StudyFull, StudyStorage, engine_options


def test_no_trial_is_created_past_the_total(tmp_path):
    import optuna

    storage = StudyStorage(f"sqlite:///{tmp_path / 'optuna.db'}", max_trials=3)
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({})  # a waiting trial counts too; the first ask takes it
    asked = [study.ask().number for _ in range(3)]
    with pytest.raises(StudyFull, match="3 trials"):
        study.ask()
    assert asked == [0, 1, 2] and len(study.trials) == 3


def test_a_study_attribute_is_claimed_once(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first, second = StudyStorage(url), StudyStorage(url)
    optuna.create_study(study_name="s", storage=first)
    study_id = first.get_study_id_from_name("s")
    made = []

    def make(label: str):
        made.append(label)
        return label

    assert first.claim_study_user_attr(study_id, "parent", lambda: make("a")) == "a"
    assert second.claim_study_user_attr(study_id, "parent", lambda: make("b")) == "a"
    assert made == ["a"]
    assert optuna.load_study(study_name="s", storage=url).user_attrs == {"parent": "a"}


def test_server_connections_are_pooled_small_and_pinged():
    options = engine_options("postgresql+psycopg://u:p@host/db")
    assert options["pool_size"] + options["max_overflow"] == 2
    assert options["pool_pre_ping"] is True
    assert options["connect_args"] == {"application_name": "fce-sweep"}
    assert "pool_size" not in engine_options("sqlite:///x.db")
