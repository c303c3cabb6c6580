"""The GPU fp16 recipe rehearsed on CPU: ds_configs/zero2.json as users have it (fp16, dynamic loss scaling,
hysteresis 2, ZeRO-2), DeepSpeed's real fp16 ZeRO-2 optimizer, the real `deepspeed` launcher with 2 processes.

``LFZH_REHEARSE_FP16_ON_CPU=1`` keeps fp16 on the CPU accelerator. One uninterrupted 4-step run is the reference
for every check; it gets infinite gradients injected in steps 2 and 4 (``LFZH_FAULT=inf_grad_at_step=2+4``). With
zero2.json's hysteresis of 2 the first overflow only uses up the hysteresis and the second halves the scale, so the
trace is 65536, 65536, 65536, 32768 with 0, 1, 1, 2 skipped steps; a run killed in step 3 and resumed from step 2
reproduces it only if the scaler's state (scale and remaining hysteresis) came back with the checkpoint.
"""
import shutil

import pytest
from test_pretrain import REPO, files, finished_run, pretrain, shards, train_losses  # noqa: F401 (files, shards: fixtures)

from lfzh_ds.loading import load_model
from lfzh_ds.run_folder import read_latest_tag
from lfzh_ds.training.metrics import read_metrics

pytestmark = pytest.mark.slow

STEPS = 4
OVERFLOWS = "inf_grad_at_step=2+4"
ZERO2 = REPO / "ds_configs" / "zero2.json"


@pytest.fixture(autouse=True, scope="module")
def rehearse_fp16():
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("LFZH_REHEARSE_FP16_ON_CPU", "1")
        yield


def pretrain_fp16(shards, files, run_dir, *extra, nproc=2, fault=OVERFLOWS):
    return pretrain(shards, files, run_dir, "--max-steps", str(STEPS), "--eval-interval", "0", *extra, nproc=nproc,
                    fault=fault, ds_config=ZERO2, timeout=400)


@pytest.fixture(scope="module")
def reference(shards, files, tmp_path_factory):
    return finished_run(tmp_path_factory, "fp16_reference", lambda run_dir: pretrain_fp16(shards, files, run_dir))


def scale_trace(run_dir) -> list[tuple[float, int]]:
    return [(r["loss_scale"], r["skipped_steps"]) for r in read_metrics(run_dir)[0]]


def test_fp16_trains_with_a_dynamic_loss_scale_that_overflows_skip_and_halve(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, output = reference
    assert "LFZH_REHEARSE_FP16_ON_CPU=1: rehearsing the GPU fp16 recipe on the CPU accelerator" in output
    assert "fp16 is not available" not in output
    assert "precision fp16, ZeRO stage 2" in output
    assert "micro-batch 2 x accumulation 16 x 2 processes" in output
    assert scale_trace(run_dir) == [(65536.0, 0), (65536.0, 1), (65536.0, 1), (32768.0, 2)]
    train = read_metrics(run_dir)[0]
    assert all(0 < r["loss"] < 11 for r in train)  # the injected inf reaches the gradients, not the loss
    # A skipped step leaves the learning-rate schedule where it was: the rate of step 3 is that of step 2.
    assert train[1]["lr"] == train[2]["lr"]
    acc = EventAccumulator(str(next((run_dir / "tensorboard").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss_scale")] == [65536.0, 65536.0, 65536.0, 32768.0]
    assert [e.value for e in acc.Scalars("train/skipped_steps")] == [0, 1, 1, 2]


def test_fp16_run_killed_and_resumed_has_the_same_losses_and_loss_scale(reference, shards, files, tmp_path):
    run_dir = tmp_path / "run"
    killed = pretrain_fp16(shards, files, run_dir, fault=f"{OVERFLOWS},kill_at_step=3")
    assert killed.returncode != 0
    assert read_latest_tag(run_dir / "checkpoints") == "step_2"
    resumed = pretrain_fp16(shards, files, run_dir, "--resume")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "at step 2 (128 samples consumed)" in resumed.output
    assert train_losses(run_dir) == train_losses(reference[0])  # bit for bit
    assert scale_trace(run_dir) == scale_trace(reference[0])
    ours, theirs = load_model(run_dir), load_model(reference[0])
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert a.equal(b), name


def test_fp16_checkpoint_resumes_on_one_process_through_a_universal_checkpoint(reference, shards, files, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir, ignore=shutil.ignore_patterns("step_4", "tensorboard"))
    (run_dir / "checkpoints" / "latest").write_text("step_2\n")
    resumed = pretrain_fp16(shards, files, run_dir, "--resume", nproc=1)
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "resuming a 2-process checkpoint on 1 processes" in resumed.output
    assert (run_dir / "checkpoints" / "step_2_universal" / "zero").is_dir()
    # The scaler's state comes from our client state (a universal load starts DeepSpeed's at 65536, hysteresis 2):
    # step 4's overflow halves the scale as in the 2-process run.
    assert scale_trace(run_dir) == scale_trace(reference[0])
    ours, theirs = train_losses(run_dir), train_losses(reference[0])
    for step in (3, 4):  # measured equal (zero2.json's warm-up rate is still ~0); ZeRO may reduce in another order
        assert abs(ours[step] - theirs[step]) < 1e-3, (step, ours[step], theirs[step])


def test_fp16_nonfinite_loss_still_stops_the_run(shards, files, tmp_path):
    run_dir = tmp_path / "run"
    result = pretrain_fp16(shards, files, run_dir, "--max-steps", "2", "--max-nonfinite-steps", "2",
                           fault="nan_from_step=1")
    assert result.returncode == 3, result.output[-4000:]
    assert "the loss was not finite for 2 consecutive steps (steps 1-2); stopping" in result.output
    assert "No checkpoint was saved before it" in result.output
    assert scale_trace(run_dir) == [(65536.0, 1), (32768.0, 2)]  # every NaN step is also an overflow
