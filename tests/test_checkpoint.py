from __future__ import annotations

import pytest
import torch

from fce import checkpoint


def state(step: int) -> dict:
    return {"trainer": {"step": step, "weights": torch.randn(3)}, "config": {"seed": 0}}


def test_save_is_atomic_and_keeps_the_two_newest(tmp_path):
    for step in (10, 20, 30):
        path = checkpoint.save(state(step), tmp_path, step)
        assert path.name == f"step_{step:07d}.pt"
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step_0000020.pt",
        "step_0000030.pt",
    ]
    assert not list(tmp_path.glob("*.tmp"))
    loaded = checkpoint.load(tmp_path / "step_0000030.pt")
    assert loaded["trainer"]["step"] == 30 and loaded["format"] == checkpoint.FORMAT


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    for step in (10, 20):
        checkpoint.save(state(step), tmp_path / "checkpoints", step)
    newest = tmp_path / "checkpoints" / "step_0000020.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    path, loaded, warnings = checkpoint.resolve(tmp_path)
    assert path.name == "step_0000010.pt" and loaded["trainer"]["step"] == 10
    assert len(warnings) == 1 and "step_0000020.pt" in warnings[0]


def test_unreadable_or_foreign_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match=r"garbage.pt: not a readable checkpoint"):
        checkpoint.load(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.zeros(1)}, foreign)
    with pytest.raises(checkpoint.CheckpointError, match=r"foreign.pt: not an FCE checkpoint"):
        checkpoint.load(foreign)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.resolve(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint file or run"):
        checkpoint.resolve(tmp_path / "absent")


def test_every_checkpoint_unreadable_is_an_error(tmp_path):
    checkpoint.save(state(5), tmp_path, 5)
    (tmp_path / "step_0000005.pt").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="every checkpoint"):
        checkpoint.resolve(tmp_path)


def test_a_checkpoint_names_its_trackers_run_under_either_key():
    # The key names no tracking backend; checkpoints written before the rename still resume
    # into their own run.
    from fce.train import tracked_run

    assert tracked_run({"tracker_run_id": "a"}) == "a"
    assert tracked_run({"mlflow_run_id": "b"}) == "b"
    assert tracked_run({"tracker_run_id": None}) is None


def test_a_checkpoint_read_twice_is_read_from_disk_once_and_each_gets_its_own_copy(
    tmp_path, monkeypatch
):
    # A resume asks for its checkpoint twice (the command line's saved settings, the run's
    # state): one read of the file; a caller that moves its tensors does not move the other's.
    from fce import checkpoint

    path = checkpoint.save({"trainer": {"w": torch.zeros(3)}}, tmp_path, 7)
    reads = []
    real = checkpoint._read
    monkeypatch.setattr(checkpoint, "_read", lambda p: reads.append(p) or real(p))
    first = checkpoint.load(path)
    first["trainer"]["w"].add_(1.0)
    second = checkpoint.load(path)
    assert len(reads) == 1 and second["trainer"]["w"].tolist() == [0.0, 0.0, 0.0]
    checkpoint.save({"trainer": {"w": torch.ones(3)}}, tmp_path, 7)  # the file changed
    assert checkpoint.load(path)["trainer"]["w"].tolist() == [1.0, 1.0, 1.0]
    assert len(reads) == 2
