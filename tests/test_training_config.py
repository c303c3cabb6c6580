"""DeepSpeed config loading: clear errors before any compute, CPU fallbacks, the shipped configs."""
import json
from pathlib import Path

import pytest

from lfzh_ds.training.engine import ConfigError, load_deepspeed_config

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

    from lfzh_ds.training.engine import share_cpu_threads

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
