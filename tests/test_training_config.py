"""DeepSpeed config loading: clear errors before any compute, CPU fallbacks, the shipped configs."""
import json
import re
from pathlib import Path

import pytest

from lfzh_ds.training.ds_config import ConfigError, load_deepspeed_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "ds_configs"


def write(tmp_path, config: dict, name="ds.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


def base(**overrides) -> dict:
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    config.update(overrides)
    return config


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.json does not exist"):
        load_deepspeed_config(tmp_path / "nope.json", world_size=2)


def test_invalid_json_gives_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"train_batch_size": 8,\n "optimizer": }')
    with pytest.raises(ConfigError, match=r"broken\.json is not valid JSON: .* line 2"):
        load_deepspeed_config(path, world_size=1)


def test_unknown_top_level_key_is_rejected_with_a_suggestion(tmp_path):
    path = write(tmp_path, {"train_batch_szie": 8, "train_micro_batch_size_per_gpu": 1})
    with pytest.raises(ConfigError, match=r'unknown top-level key "train_batch_szie" \(did you mean "train_batch_size"\?\)'):
        load_deepspeed_config(path, world_size=1)


def test_sparse_attention_block_points_to_the_model_config(tmp_path):
    path = write(tmp_path, base(sparse_attention={"mode": "bslongformer", "block": 16}))
    with pytest.raises(ConfigError) as err:
        load_deepspeed_config(path, world_size=1)
    assert '"sparse_attention" block is not supported' in str(err.value)
    assert '"attention_backend": "block_sparse"' in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("config, world, message", [
    (base(train_batch_size=10, train_micro_batch_size_per_gpu=2), 2,
     r"train_batch_size=10 does not divide by train_micro_batch_size_per_gpu=2 x 2 processes = 4"),
    (base(train_batch_size=8, gradient_accumulation_steps=3), 2,
     r"train_batch_size=8 must equal train_micro_batch_size_per_gpu=2 x gradient_accumulation_steps=3 x 2 processes = 12"),
    (base(train_micro_batch_size_per_gpu=0), 1, r'"train_micro_batch_size_per_gpu" must be a positive integer'),
])
def test_batch_sizes_that_do_not_divide_are_explained(tmp_path, config, world, message):
    with pytest.raises(ConfigError, match=message):
        load_deepspeed_config(write(tmp_path, config), world_size=world)


@pytest.mark.parametrize("world, accumulation", [(1, 32), (2, 16), (4, 8), (8, 4)])
def test_zero2_keeps_2_to_the_18_tokens_per_step_on_any_process_count(world, accumulation):
    resolved = load_deepspeed_config(CONFIGS / "zero2.json", world_size=world)
    assert resolved.gradient_accumulation_steps == accumulation
    assert resolved.global_batch_size * 4096 == 2 ** 18
    assert "262,144 tokens per step" in resolved.describe_batch(4096)


def test_fp16_on_the_cpu_accelerator_falls_back_to_fp32_in_one_line(tmp_path):
    resolved = load_deepspeed_config(CONFIGS / "zero2.json", world_size=4, run_dir=tmp_path)
    assert resolved.precision == "fp32" and "fp16" not in resolved.config
    fp16_lines = [n for n in resolved.notes if "fp16" in n]
    assert fp16_lines == ["fp16 is not available on the CPU accelerator: training in fp32 instead "
                          f"({CONFIGS / 'zero2.json'} asks for fp16; ds_configs/cpu.json selects fp32 or bf16 explicitly)"]
    assert resolved.config["optimizer"]["params"]["torch_adam"] is True
    assert resolved.config["tensorboard"]["output_path"] == str(tmp_path / "tensorboard")


@pytest.mark.parametrize("value, kept", [("1", True), ("0", False), ("yes", False)])
def test_fp16_rehearsal_on_the_cpu_accelerator_is_an_explicit_opt_in(tmp_path, monkeypatch, value, kept):
    monkeypatch.setenv("LFZH_REHEARSE_FP16_ON_CPU", value)
    resolved = load_deepspeed_config(CONFIGS / "zero2.json", world_size=2, run_dir=tmp_path)
    assert (resolved.precision == "fp16") is kept
    if kept:
        assert resolved.config["fp16"]["initial_scale_power"] == 16  # the file's block, untouched
        assert [n for n in resolved.notes if "fp16" in n] == [
            "LFZH_REHEARSE_FP16_ON_CPU=1: rehearsing the GPU fp16 recipe on the CPU accelerator (DeepSpeed's fp16 "
            "optimizer and dynamic loss scaling; slower than fp32, for tests only)"]
    else:
        assert any("training in fp32 instead" in n for n in resolved.notes)


def test_auto_total_steps_comes_from_max_steps(tmp_path):
    resolved = load_deepspeed_config(CONFIGS / "cpu.json", world_size=2, max_steps=300)
    assert resolved.config["scheduler"]["params"]["total_num_steps"] == 300
    with pytest.raises(ConfigError, match="no --max-steps"):
        load_deepspeed_config(CONFIGS / "cpu.json", world_size=2)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_every_shipped_config_passes_deepspeeds_own_validation(name, monkeypatch):
    from deepspeed.runtime.config import DeepSpeedConfig

    resolved = load_deepspeed_config(CONFIGS / name, world_size=1, max_steps=100)
    DeepSpeedConfig(resolved.config)  # raises on any unknown nested key or bad value


def test_zero3_offload_config_drops_offloading_on_the_cpu_accelerator():
    resolved = load_deepspeed_config(CONFIGS / "zero3_offload.json", world_size=2)
    zero = resolved.config["zero_optimization"]
    assert zero["stage"] == 3 and "offload_optimizer" not in zero and "offload_param" not in zero
    assert any("offload_optimizer and offload_param dropped" in n for n in resolved.notes)
    assert resolved.config["optimizer"]["params"]["torch_adam"] is True


def test_launcher_processes_on_one_cpu_machine_split_its_cores(monkeypatch):
    import os

    import torch

    from lfzh_ds.training.distributed import share_cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
        monkeypatch.setenv("LOCAL_SIZE", "2")
        assert share_cpu_threads() == 4 and torch.get_num_threads() == 4
        monkeypatch.setenv("LOCAL_SIZE", "16")
        assert share_cpu_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
        assert share_cpu_threads() is None and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("key, value", [("log_level", "info"), ("use_data_before_expert_parallelism", False),
                                        ("managed_gradient_accumulation", False), ("vocabulary_size", 21128)])
def test_top_level_keys_deepspeed_reads_are_accepted(tmp_path, key, value):
    from deepspeed.runtime.config import DeepSpeedConfig

    resolved = load_deepspeed_config(write(tmp_path, base(**{key: value})), world_size=1)
    assert resolved.config[key] == value
    DeepSpeedConfig(resolved.config)  # and DeepSpeed itself takes it


def test_the_old_misspelling_of_a_top_level_key_is_rejected(tmp_path):
    path = write(tmp_path, base(use_data_before_expert_parallel_=True))
    with pytest.raises(ConfigError, match=r'"use_data_before_expert_parallel_" \(did you mean '
                                          r'"use_data_before_expert_parallelism"\?\)'):
        load_deepspeed_config(path, world_size=1)


def cpu_config_with(change) -> dict:
    config = json.loads((CONFIGS / "cpu.json").read_text())
    change(config)
    return config


@pytest.mark.parametrize("change, message", [
    (lambda c: c["scheduler"]["params"].update(warmup_num_step=10),
     r'unknown key "scheduler\.params\.warmup_num_step" \(did you mean "warmup_num_steps"\?\)'),
    (lambda c: c["scheduler"]["params"].pop("total_num_steps"),
     r'"scheduler\.params" lacks "total_num_steps", which has no default'),
    (lambda c: c["scheduler"].update(type="WarmupDecayLr"),
     r'"scheduler\.type": "WarmupDecayLr" is not a scheduler DeepSpeed knows \(did you mean "WarmupDecayLR"\?\)'),
    (lambda c: c["optimizer"]["params"].update(lrr=1e-3),
     r'unknown key "optimizer\.params\.lrr" \(did you mean "lr"\?\)'),
    (lambda c: c["optimizer"].update(type="AdamWW"),
     r'"optimizer\.type": "AdamWW" is not an optimizer DeepSpeed knows \(did you mean "AdamW"\?\)'),
    (lambda c: c["optimizer"]["params"].update(max_grad_norm=1.0), r'use the top-level "gradient_clipping"'),
])
def test_unknown_optimizer_or_scheduler_names_and_params_name_the_key(tmp_path, change, message):
    path = write(tmp_path, cpu_config_with(change))
    with pytest.raises(ConfigError, match=message) as err:
        load_deepspeed_config(path, world_size=1, max_steps=10)
    assert str(err.value).startswith(f"{path}: ")


def test_torch_optimizers_and_schedulers_are_checked_against_their_signatures(tmp_path):
    config = base(optimizer={"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
                  scheduler={"type": "StepLR", "params": {"step_size": 10, "gamma": 0.5}})
    load_deepspeed_config(write(tmp_path, config), world_size=1)
    config["scheduler"]["params"]["step"] = 10
    with pytest.raises(ConfigError, match=r'unknown key "scheduler\.params\.step" \(did you mean "step_size"\?\)'):
        load_deepspeed_config(write(tmp_path, config), world_size=1)


@pytest.mark.parametrize("name", ["zero2.json", "zero2_bf16.json", "zero3_offload.json"])
def test_max_steps_beyond_a_fixed_total_num_steps_is_refused(name):
    assert load_deepspeed_config(CONFIGS / name, world_size=2, max_steps=15000).total_num_steps == 15000
    with pytest.raises(ConfigError) as err:
        load_deepspeed_config(CONFIGS / name, world_size=2, max_steps=30000)
    assert str(err.value).startswith(f"{CONFIGS / name}: scheduler.params.total_num_steps is 15000 but --max-steps "
                                     "is 30000: the learning rate would reach its minimum at step 15000")


@pytest.mark.parametrize("given, world, expected", [
    ({"train_batch_size": 12}, 3, (12, 4, 1)),                                               # micro = total / processes
    ({"train_batch_size": 24, "gradient_accumulation_steps": 2}, 3, (24, 4, 2)),              # micro = total / (accum x p)
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 3, (24, 4, 2)),  # total = micro x accum x p
    ({"train_micro_batch_size_per_gpu": 4}, 3, (12, 4, 1)),                                   # accumulation defaults to 1
], ids=["total", "total_accum", "micro_accum", "micro"])
def test_the_missing_batch_numbers_are_derived_from_the_given_ones_and_the_process_count(tmp_path, given, world,
                                                                                          expected):
    """Whichever two (or one) of the three numbers a config gives, the rest follow from
    train_batch_size = micro-batch x accumulation x processes (hand-computed for 3 processes)."""
    config = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, **given}
    resolved = load_deepspeed_config(write(tmp_path, config), world_size=world)
    assert (resolved.global_batch_size, resolved.micro_batch_size, resolved.gradient_accumulation_steps) == expected
    assert resolved.global_batch_size == resolved.micro_batch_size * resolved.gradient_accumulation_steps * world


@pytest.mark.parametrize("given, message", [
    ({"train_batch_size": 10}, r"train_batch_size=10 does not divide by 3 processes; use a multiple of 3"),
    ({"train_batch_size": 20, "gradient_accumulation_steps": 2},
     r"train_batch_size=20 does not divide by gradient_accumulation_steps=2 x 3 processes = 6"),
    ({"gradient_accumulation_steps": 2}, r'give "train_batch_size" or "train_micro_batch_size_per_gpu"'),
])
def test_batch_numbers_that_cannot_be_completed_are_explained(tmp_path, given, message):
    path = write(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, **given})
    with pytest.raises(ConfigError, match=message):
        load_deepspeed_config(path, world_size=3)


@pytest.mark.parametrize("change, key", [
    (lambda c: c.update(gradient_clipping="auto"), "gradient_clipping"),
    (lambda c: c["optimizer"]["params"].update(lr="auto"), "optimizer.params.lr"),
])
def test_auto_anywhere_but_total_num_steps_is_refused_naming_the_key(tmp_path, change, key):
    """Only scheduler.params.total_num_steps understands "auto" (it follows --max-steps); an HF-style "auto" elsewhere
    would reach DeepSpeed as a string."""
    path = write(tmp_path, cpu_config_with(change))
    with pytest.raises(ConfigError, match=rf'"{re.escape(key)}": "auto" is only understood for '
                                          r'scheduler\.params\.total_num_steps'):
        load_deepspeed_config(path, world_size=1, max_steps=10)


def test_an_explicit_torch_adam_choice_is_kept_on_the_cpu_accelerator(tmp_path):
    config = base()
    config["optimizer"]["params"]["torch_adam"] = False
    resolved = load_deepspeed_config(write(tmp_path, config), world_size=1)
    assert resolved.config["optimizer"]["params"]["torch_adam"] is False
    assert not any("torch_adam" in note for note in resolved.notes)


def test_overrides_replace_the_files_blocks_and_are_checked_like_them(tmp_path):
    """Fine-tuning sets its own batch sizes and schedule on top of a pretraining config (``overrides``); they win over
    the file's values and go through the same checks."""
    schedule = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-5,
                                                     "warmup_num_steps": 2, "total_num_steps": 20}}
    resolved = load_deepspeed_config(CONFIGS / "zero2.json", world_size=2, max_steps=20, overrides={
        "train_batch_size": 12, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2,
        "scheduler": schedule})
    assert (resolved.global_batch_size, resolved.micro_batch_size, resolved.gradient_accumulation_steps) == (12, 3, 2)
    assert resolved.config["scheduler"] == schedule and resolved.total_num_steps == 20
    with pytest.raises(ConfigError, match=r'unknown key "scheduler\.params\.warmup_num_step"'):
        load_deepspeed_config(CONFIGS / "zero2.json", world_size=2, max_steps=20, overrides={
            "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_step": 2, "total_num_steps": 20}}})


def test_an_empty_validation_split_is_explained_by_the_fraction_the_manifest_records():
    """No validation sequences: with --val-fraction 0 the message says so; with a fraction the corpus was too small
    for, it says that instead of suggesting a --val-fraction 0 the user never passed."""
    from argparse import Namespace

    from lfzh_ds.training.pretraining import check_validation_request

    args = Namespace(data="shards", eval_interval=10, eval_sequences=None, final_eval_sequences=None)
    empty = {"shards": [], "rows": 0, "documents": 0}

    def refusal(val_fraction):
        manifest = {"config": {"val_fraction": val_fraction},
                    "splits": {"train": {"shards": [{"rows": 40}], "documents": 12}, "validation": empty}}
        with pytest.raises(ConfigError) as err:
            check_validation_request(args, manifest)
        return str(err.value)

    small = refusal(0.05)
    assert small.startswith("--data shards: the validation split is empty (preprocessed with --val-fraction 0.05, "
                            "but none of its 12 documents fell in it (about 0.6 expected): too few documents for the "
                            "fraction")
    assert "--val-fraction 0?" not in small and "--eval-interval 0" in small
    assert "preprocessed with --val-fraction 0?" in refusal(0.0)
    check_validation_request(Namespace(**{**vars(args), "eval_interval": 0}), {})  # no validation asked for
