"""Checkpoint bookkeeping that needs no processes: keep-N, leftovers of interrupted saves, locating a checkpoint."""
import pytest

from lfzh_ds.training.checkpoint import (prune_checkpoints, read_latest_tag, remove_incomplete_checkpoints,
                                         resolve_checkpoint, step_of_tag)


def make_run(tmp_path, steps, latest, universal=()):
    ckpt = tmp_path / "run" / "checkpoints"
    for step in steps:
        (ckpt / f"step_{step}").mkdir(parents=True)
        (ckpt / f"step_{step}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    for step in universal:
        (ckpt / f"step_{step}_universal" / "zero").mkdir(parents=True)
    (ckpt / "latest").write_text(f"step_{latest}\n")
    return ckpt


def names(ckpt):
    return sorted(p.name for p in ckpt.iterdir() if p.is_dir())


def test_tags_carry_their_step():
    assert step_of_tag("step_3000") == 3000
    assert step_of_tag("step_12_universal") == 12
    assert step_of_tag("global_step12") is None


def test_keep_n_removes_the_oldest_and_their_universal_copies(tmp_path):
    ckpt = make_run(tmp_path, [100, 200, 300, 400], latest=400, universal=[100, 300])
    assert prune_checkpoints(ckpt, keep=2) == ["step_100", "step_100_universal", "step_200"]
    assert names(ckpt) == ["step_300", "step_300_universal", "step_400"]


def test_keep_zero_keeps_everything(tmp_path):
    ckpt = make_run(tmp_path, [1, 2, 3], latest=3)
    assert prune_checkpoints(ckpt, keep=0) == []
    assert names(ckpt) == ["step_1", "step_2", "step_3"]


def test_folders_newer_than_latest_are_interrupted_saves(tmp_path):
    ckpt = make_run(tmp_path, [2, 4, 6], latest=4)
    assert remove_incomplete_checkpoints(ckpt) == ["step_6"]
    assert names(ckpt) == ["step_2", "step_4"]
    assert read_latest_tag(ckpt) == "step_4"


def test_resolve_accepts_a_run_a_checkpoints_folder_or_a_tag(tmp_path):
    ckpt = make_run(tmp_path, [2, 4], latest=4)
    assert resolve_checkpoint(tmp_path / "run") == (ckpt, "step_4")
    assert resolve_checkpoint(ckpt) == (ckpt, "step_4")
    assert resolve_checkpoint(ckpt / "step_2") == (ckpt, "step_2")


def test_resolve_explains_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no DeepSpeed checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    ckpt = make_run(tmp_path, [2], latest=2)
    (ckpt / "latest").write_text("step_9\n")
    with pytest.raises(FileNotFoundError, match="names 'step_9', which does not exist"):
        resolve_checkpoint(tmp_path / "run")


def test_a_training_checkpoint_is_told_apart_from_a_model_folder(tmp_path):
    from lfzh_ds.training.checkpoint import is_training_checkpoint

    ckpt = make_run(tmp_path, [2], latest=2)
    assert is_training_checkpoint(tmp_path / "run") and is_training_checkpoint(ckpt / "step_2")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert not is_training_checkpoint(tmp_path / "model")


def test_pruning_keeps_the_newest_complete_checkpoints_and_leaves_newer_leftovers_alone(tmp_path):
    """Folders newer than `latest` are an interrupted save's (remove_incomplete_checkpoints deals with them): they
    neither count among the kept checkpoints nor get pruned."""
    ckpt = make_run(tmp_path, [2, 4, 6, 8], latest=4)
    assert prune_checkpoints(ckpt, keep=2) == []
    assert names(ckpt) == ["step_2", "step_4", "step_6", "step_8"]
    assert prune_checkpoints(ckpt, keep=1) == ["step_2"]
    assert names(ckpt) == ["step_4", "step_6", "step_8"]
