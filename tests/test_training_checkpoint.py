"""Checkpoint bookkeeping that needs no processes: keep-N, leftovers of interrupted saves, locating a checkpoint."""
import pytest

from lfzh_ds.run_folder import read_latest_tag, resolve_checkpoint, step_of_tag
from lfzh_ds.training.checkpoint import prune_checkpoints, remove_incomplete_checkpoints


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
    from lfzh_ds.run_folder import is_training_checkpoint

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


def write_state(ckpt, step, **state):
    import json

    (ckpt / f"step_{step}" / "training_state.json").write_text(json.dumps({"step": step, **state}))


def test_a_blank_latest_file_is_no_checkpoint(tmp_path):
    from lfzh_ds.training.checkpoint import find_resume_point

    ckpt = make_run(tmp_path, [2], latest=2)
    (ckpt / "latest").write_text("\n")
    assert read_latest_tag(ckpt) is None and find_resume_point(tmp_path / "run") is None
    with pytest.raises(FileNotFoundError, match="holds no DeepSpeed checkpoint"):
        resolve_checkpoint(tmp_path / "run")


def test_the_resume_point_is_latest_with_its_counters_and_a_dangling_latest_is_explained(tmp_path):
    from lfzh_ds.training.checkpoint import find_resume_point

    ckpt = make_run(tmp_path, [2, 4], latest=4)
    # a state file from another version: an unknown counter is ignored, a missing one keeps its default
    write_state(ckpt, 4, samples_consumed=32, seed=7, counter_of_a_newer_version=1)
    point = find_resume_point(tmp_path / "run")
    assert point.tag == "step_4" and point.universal_tag == "step_4_universal"
    assert (point.state.step, point.state.samples_consumed, point.state.seed, point.state.masking) == (4, 32, 7, None)
    (ckpt / "latest").write_text("step_6\n")
    with pytest.raises(FileNotFoundError, match=r"names 'step_6', but .*step_6 does not exist; point `latest` at an "
                                                r"existing step_N folder"):
        find_resume_point(tmp_path / "run")


def test_a_client_state_not_written_by_pretraining_is_refused():
    from lfzh_ds.training.checkpoint import client_training_state

    with pytest.raises(KeyError, match="ckpt/step_2 has no 'lfzh_ds' client state"):
        client_training_state({"other": {"step": 2}}, "ckpt/step_2")
    state, rng = client_training_state({"lfzh_ds": {"step": 2, "samples_consumed": 16, "rng": [{"x": 1}]}}, "here")
    assert (state.step, state.samples_consumed, rng) == (2, 16, [{"x": 1}])


def test_a_finished_universal_copy_is_reused_and_a_half_written_one_is_redone(tmp_path):
    from lfzh_ds.training.checkpoint import convert_to_universal

    ckpt = make_run(tmp_path, [2], latest=2)
    (ckpt / "step_2_universal" / "zero").mkdir(parents=True)
    (ckpt / "step_2_universal" / "training_state.json").write_text('{"step": 2}')
    assert convert_to_universal(ckpt, "step_2") == "step_2_universal"  # complete: no conversion runs
    (ckpt / "step_2_universal" / "training_state.json").unlink()  # interrupted before the counters were copied
    with pytest.raises(RuntimeError, match="converting .*step_2 to a universal checkpoint failed"):
        convert_to_universal(ckpt, "step_2")  # redone (and DeepSpeed's converter refuses this fake checkpoint)


# ---------------------------------------------------------------------------------------------- resumed settings

def resume_settings(tmp_path, saved: dict, seed=None, masking=None, total_num_steps=10, **flags):
    from lfzh_ds.training.checkpoint import CheckpointManager
    from lfzh_ds.training.ds_config import ResolvedConfig
    from lfzh_ds.training.pretraining import PretrainSettings, resumed_settings

    settings = PretrainSettings(deepspeed_config="ds.json", data="shards", output_dir=str(tmp_path / "run"),
                                model_config="tiny.json", max_steps=total_num_steps, seed=seed, masking=masking,
                                **flags)
    resolved = ResolvedConfig(source="ds.json", config={"scheduler": {"params": {"total_num_steps": total_num_steps}}},
                              world_size=1)
    ckpt = tmp_path / "run" / "checkpoints"
    if not ckpt.is_dir():
        make_run(tmp_path, [4], latest=4)
    write_state(ckpt, 4, **saved)
    checkpoints = CheckpointManager(tmp_path / "run", keep=0, resume=True)
    said = []
    return resumed_settings(settings, checkpoints, resolved, said.append), said


def test_a_resumed_run_takes_its_checkpoints_seed_and_masking_and_refuses_other_ones(tmp_path):
    from lfzh_ds.training.ds_config import ConfigError

    saved = dict(seed=7, masking="dynamic", total_num_steps=10)
    args, said = resume_settings(tmp_path, saved)  # no flags: the checkpoint's, not the defaults (42, static)
    assert (args.seed, args.masking, said) == (7, "dynamic", [])
    args, _ = resume_settings(tmp_path, saved, seed=7, masking="dynamic")  # the same values may be repeated
    assert (args.seed, args.masking) == (7, "dynamic")
    with pytest.raises(ConfigError, match=r"--seed 8 differs from the --seed 7 of the run being resumed \(.*step_4"):
        resume_settings(tmp_path, saved, seed=8)
    with pytest.raises(ConfigError, match="--masking static differs from the --masking dynamic"):
        resume_settings(tmp_path, saved, masking="static")
    # a checkpoint from before masking was recorded takes the flag
    args, _ = resume_settings(tmp_path, dict(seed=7, masking=None), masking="static")
    assert (args.seed, args.masking) == (7, "static")


def test_a_resumed_run_says_when_its_schedule_now_ends_at_another_step(tmp_path):
    _, said = resume_settings(tmp_path, dict(seed=1, masking="static", total_num_steps=10), total_num_steps=20)
    assert len(said) == 1 and "total_num_steps changes from 10 (the checkpoint's) to 20" in said[0]
    # by default the rate decays on from where it was (no jump up); the old stretch is asked for by name
    assert "from step 5 on the learning rate decays on from where it was to 0 at step 20" in said[0]
    _, said = resume_settings(tmp_path, dict(seed=1, masking="static", total_num_steps=10), total_num_steps=20,
                              stretch_schedule=True)
    assert "from step 5 on the learning rate follows the new schedule (--stretch-schedule)" in said[0]
    _, said = resume_settings(tmp_path, dict(seed=1, masking="static", total_num_steps=10), total_num_steps=20,
                              rewarm_steps=30)
    assert "climbs back to its peak over 30 steps (--rewarm-steps), then decays to 0 at step 20" in said[0]
    _, said = resume_settings(tmp_path, dict(seed=1, masking="static", total_num_steps=None), total_num_steps=20)
    assert said == []  # an older checkpoint did not record its schedule


# ---------------------------------------------------------------------------------------------- one resume mechanism

# The one message a resumed run gives for a kept setting given another value, pretraining's and fine-tuning's alike.
REFUSAL = (r"^(?P<setting>\S+) (?P<given>.+) differs from the (?P<recorded>.+ of the )?(?P<what>run|fine-tuning) being "
           r"resumed \((?P<where>.*step_4/training_state\.json)(?P<after>: .+)?\): a resumed run continues with its own "
           r"settings\. .+, or start a new run in another --output-dir$")


def test_pretraining_and_finetuning_refuse_a_changed_kept_setting_by_one_rule_and_one_message(tmp_path):
    """Each objective declares what a resume keeps (``kept_settings``) and how its checkpoints record it
    (``recorded_settings``); the checkpoint manager compares them the same way for both."""
    import re
    from types import SimpleNamespace

    from lfzh_ds.finetuning import RESUMED_SETTINGS, Classification, FinetuneSettings
    from lfzh_ds.training.checkpoint import CheckpointManager
    from lfzh_ds.training.ds_config import ConfigError
    from lfzh_ds.training.pretraining import MaskedLM, PretrainSettings

    def manager(run, **saved):
        make_run(run, [4], latest=4)
        write_state(run / "run" / "checkpoints", 4, **saved)
        return CheckpointManager(run / "run", keep=0, resume=True)

    def refusal(checkpoints, declared, recorded_of, what):
        with pytest.raises(ConfigError) as err:
            checkpoints.keep_settings(declared, recorded_of, what=what)
        match = re.match(REFUSAL, str(err.value))
        assert match, str(err.value)
        return match.groupdict()

    pretraining = manager(tmp_path / "pre", seed=7, masking="dynamic", mask_prob=0.3, mask_unit="word",
                          output_vocab="all")
    flags = dict(deepspeed_config="ds.json", data="shards", output_dir="run", model_config="m.json", max_steps=9)
    kept = pretraining.keep_settings(MaskedLM.kept_settings(PretrainSettings(**flags)), MaskedLM.recorded_settings,
                                     what="run")
    assert kept == {"seed": 7, "masking": "dynamic", "mask_unit": "word", "output_vocab": "all", "mask_prob": 0.3}
    seed = refusal(pretraining, MaskedLM.kept_settings(PretrainSettings(**flags, seed=8)), MaskedLM.recorded_settings,
                   "run")
    assert (seed["setting"], seed["given"], seed["recorded"], seed["what"]) == ("--seed", "8", "--seed 7 of the ", "run")
    rate = refusal(pretraining, MaskedLM.kept_settings(PretrainSettings(**flags, mask_prob=0.2)),
                   MaskedLM.recorded_settings, "run")
    assert (rate["setting"], rate["given"], rate["recorded"], rate["after"]) == ("--mask-prob", "0.2", None, ": 0.3")

    settings = FinetuneSettings(model_dir="model", output_dir="ft", deepspeed_config="ds.json", learning_rate=1e-3)
    task = SimpleNamespace(train=[0] * 5, dev=[0] * 2)
    recorded = {**{name: getattr(settings, name) for name in RESUMED_SETTINGS}, "documents": {"train": 5, "dev": 2}}
    finetuning = manager(tmp_path / "ft", seed=0, objective={"settings": recorded, "best": None, "history": []})
    assert finetuning.keep_settings(Classification.kept_settings(settings, task), Classification.recorded_settings,
                                    what="fine-tuning") == recorded
    changed = FinetuneSettings(**{**settings.__dict__, "learning_rate": 2e-3})
    lr = refusal(finetuning, Classification.kept_settings(changed, task), Classification.recorded_settings,
                 "fine-tuning")
    assert (lr["setting"], lr["given"], lr["recorded"], lr["what"]) == ("learning_rate", "0.002", "0.001 of the ",
                                                                         "fine-tuning")
    documents = refusal(finetuning, Classification.kept_settings(settings, SimpleNamespace(train=[0] * 6, dev=[0] * 2)),
                        Classification.recorded_settings, "fine-tuning")
    assert documents["setting"] == "documents" and "'train': 5" in documents["recorded"]


def test_a_training_state_of_the_former_layout_loads_and_is_saved_in_the_same_layout():
    """Checkpoints written before pretraining's kept settings left TrainingState's own fields hold them at the top
    level of training_state.json and of the client state (with the RNG states and the loss scaler): they load,
    pretraining reads its settings from them, and a state is saved in that layout still."""
    from lfzh_ds.training.checkpoint import TrainingState, client_training_state
    from lfzh_ds.training.pretraining import MaskedLM

    old = {"step": 4, "samples_consumed": 32, "tokens_seen": 4096, "global_batch_size": 8, "world_size": 2, "seed": 7,
           "skipped_steps": 0, "elapsed_seconds": 1.5, "zero_stage": 2, "masking": "dynamic", "total_num_steps": 10,
           "learning_rate": 2e-5, "mask_prob": 0.3, "lr_knots": None, "mask_unit": "character",
           "output_vocab": "training", "objective": None}
    state, rng = client_training_state({"lfzh_ds": {**old, "rng": [{"python": 1}], "loss_scaler": None}}, "here")
    assert (state.step, state.samples_consumed, state.tokens_seen, state.world_size, state.learning_rate) == \
        (4, 32, 4096, 2, 2e-5)
    assert rng == [{"python": 1}] and state.masking == "dynamic"
    assert state.settings == {"masking": "dynamic", "mask_prob": 0.3, "mask_unit": "character",
                              "output_vocab": "training"}
    assert MaskedLM.recorded_settings(state) == {"seed": 7, "masking": "dynamic", "mask_prob": 0.3,
                                                 "mask_unit": "character", "output_vocab": "training"}
    assert state.to_dict() == old  # the same keys and values
    # older still: no masking recorded; a state of a newer version: an unknown key is carried along, not refused
    older = TrainingState.from_dict({"step": 2, "seed": 1})
    assert older.masking is None and MaskedLM.recorded_settings(older)["masking"] is None
