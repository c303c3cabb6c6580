"""Continuing a run: the learning rate after a resume with a later end, a second phase on other data
(`--continue-from`), and the mask rate chosen at training time (`--masking dynamic --mask-prob`).

In-process runs (one process, no launcher) of a tiny model on shards built without Ray: seconds each.
"""
import json
import socket

import numpy as np
import pytest
import torch

from lfzh_ds.loading import load_model
from lfzh_ds.masking import whole_word_spans
from lfzh_ds.shards import ShardDataset
from lfzh_ds.training.metrics import read_metrics

TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 128, "attention_window": 32, "sparse_block_size": 16}
DS_CONFIG = {
    "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "steps_per_print": 1000,
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "eps": 1e-6, "weight_decay": 0.01, "torch_adam": True}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-3,
                                                      "warmup_num_steps": 2, "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 2},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def in_process(monkeypatch, frugal_torch):
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LFZH_FAULT", raising=False)


@pytest.fixture
def setup(tmp_path, shard_folder):
    (tmp_path / "ds.json").write_text(json.dumps(DS_CONFIG))
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_MODEL))
    short = shard_folder({"train": [[40] * 12], "validation": [[40] * 2]}, name="short", seq_len=64)
    long = shard_folder({"train": [[90] * 12], "validation": [[90] * 2]}, name="long", seq_len=128)
    return tmp_path, short, long


def pretrain(tmp_path, data, run_dir, *extra, model=True) -> int:
    from launch.pretrain import main

    model_args = ["--model-config", str(tmp_path / "tiny.json")] if model else []
    return main(["--deepspeed_config", str(tmp_path / "ds.json"), "--data", str(data), "--output-dir", str(run_dir),
                 "--save-interval", "2", "--keep-checkpoints", "0", "--eval-interval", "0", "--log-interval", "1",
                 *model_args, *extra])


def rates(run_dir) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(run_dir)[0]}


def optimizer_state(run_dir, step):
    """The flat AdamW state (step, exp_avg_sq) of a one-process ZeRO-2 checkpoint."""
    (path,) = (run_dir / "checkpoints" / f"step_{step}").glob("*optim_states.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    groups = list(state["base_optimizer_state"]["state"].values())  # one flat partition per parameter group
    assert len({int(adam["step"]) for adam in groups}) == 1
    return int(groups[0]["step"]), torch.cat([adam["exp_avg_sq"] for adam in groups])


# ---------------------------------------------------------------------------------------------- learning rate

def test_continuing_a_finished_run_decays_on_from_its_rate_without_a_jump(setup, in_process, capsys):
    tmp_path, short, _ = setup
    run_dir = tmp_path / "run"
    assert pretrain(tmp_path, short, run_dir, "--max-steps", "4") == 0
    lr4 = rates(run_dir)[4]
    assert lr4 > 0
    capsys.readouterr()
    assert pretrain(tmp_path, short, run_dir, "--max-steps", "6", "--resume") == 0
    assert "decays on from where it was to 0 at step 6" in capsys.readouterr().out
    lr = rates(run_dir)
    # linear from step 4's rate to 0 after step 6: never above where the run was
    assert [lr[5], lr[6]] == pytest.approx([lr4 * 2 / 3, lr4 / 3], rel=1e-9)
    state = json.loads((run_dir / "checkpoints" / "step_6" / "training_state.json").read_text())
    assert state["lr_knots"] == [[4, pytest.approx(lr4)], [7, 0.0]] and state["learning_rate"] == lr[6]
    # resumed again with the same end and a re-warm: from step 6's rate up to the peak at step 7, then down
    assert pretrain(tmp_path, short, run_dir, "--max-steps", "8", "--resume", "--rewarm-steps", "1") == 0
    lr = rates(run_dir)
    assert [lr[7], lr[8]] == pytest.approx([2e-3, 1e-3], rel=1e-9)


def test_rewarm_climbs_back_to_the_peak_then_decays(setup, in_process):
    tmp_path, short, _ = setup
    run_dir = tmp_path / "run"
    assert pretrain(tmp_path, short, run_dir, "--max-steps", "4") == 0
    assert pretrain(tmp_path, short, run_dir, "--max-steps", "8", "--resume", "--rewarm-steps", "2") == 0
    lr = rates(run_dir)
    lr4 = lr[4]  # knots (4, lr4), (6, 2e-3 the peak), (9, 0)
    assert [lr[k] for k in (5, 6, 7, 8)] == pytest.approx([(lr4 + 2e-3) / 2, 2e-3, 2e-3 * 2 / 3, 2e-3 / 3], rel=1e-9)


# ---------------------------------------------------------------------------------------------- second phase

def test_a_second_phase_on_longer_sequences_keeps_weights_optimizer_state_and_step(setup, in_process, capsys):
    tmp_path, short, long = setup
    phase1, phase2 = tmp_path / "phase1", tmp_path / "phase2"
    assert pretrain(tmp_path, short, phase1, "--max-steps", "4") == 0
    capsys.readouterr()
    assert pretrain(tmp_path, long, phase2, "--continue-from", str(phase1), "--max-steps", "5", model=False) == 0
    out = capsys.readouterr().out
    assert f"continuing {phase1 / 'checkpoints' / 'step_4'} (step 4, weights and optimizer state)" in out
    assert "128-token sequences" in out
    assert sorted(rates(phase2)) == [5]  # the step counter goes on
    # AdamW's own state went on: its step count is 5, and every second moment is at least beta2 times the old one
    # (a fresh optimizer would hold (1 - beta2) g^2 after one step)
    step1, v1 = optimizer_state(phase1, 4)
    step2, v2 = optimizer_state(phase2, 5)
    assert (step1, step2) == (4, 5)
    assert bool((v2 >= 0.999 * v1 * (1 - 1e-6)).all())
    # the weights moved by one update from phase 1's, far less than a fresh initialisation differs from them
    before, after = load_model(phase1).state_dict(), load_model(phase2).state_dict()
    moved = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert 0 < moved < 1e-2
    assert json.loads((phase2 / "args.json").read_text())["continue_from"] == str(phase1)


def test_a_second_phase_refuses_a_model_too_short_for_the_data(setup, in_process, capsys):
    tmp_path, short, long = setup
    (tmp_path / "tiny.json").write_text(json.dumps({**TINY_MODEL, "max_position_embeddings": 64}))
    phase1 = tmp_path / "phase1"
    assert pretrain(tmp_path, short, phase1, "--max-steps", "2") == 0
    capsys.readouterr()
    assert pretrain(tmp_path, long, tmp_path / "phase2", "--continue-from", str(phase1), "--max-steps", "3",
                    model=False) == 2
    err = capsys.readouterr().err
    assert "hold sequences of 128 tokens but the model has max_position_embeddings=64" in err
    assert pretrain(tmp_path, long, tmp_path / "phase2b", "--continue-from", str(tmp_path / "nowhere"),
                    "--max-steps", "3", model=False) == 2
    assert "--continue-from" in capsys.readouterr().err


def test_the_upstreams_route_a_short_phase_lengthened_then_a_long_phase(setup, in_process, capsys):
    """A 64-position run, its step folder lengthened to 128 positions (launch/convert.py), then trained on 128-token
    sequences from there with --init-from and --start-step: the schedule goes on, the weights are the lengthened
    ones, and the lengthened model gives the short one's logits on the short data."""
    from launch.convert import main as convert_main

    tmp_path, short, long = setup
    (tmp_path / "tiny.json").write_text(json.dumps({**TINY_MODEL, "max_position_embeddings": 64}))
    phase1 = tmp_path / "phase1"
    assert pretrain(tmp_path, short, phase1, "--max-steps", "4") == 0
    convert_main(["--from", str(phase1 / "checkpoints" / "step_2"), "--to", str(tmp_path / "long_model"),
                  "--max-pos", "128"])
    assert "positions 64 -> 128 (trained rows tiled" in capsys.readouterr().out
    short_model, long_model = load_model(phase1 / "checkpoints" / "step_2"), load_model(tmp_path / "long_model")
    batch = ShardDataset(short, "validation")[0]
    inputs = {"input_ids": batch["input_ids"][None].long()}
    assert torch.allclose(short_model(**inputs).logits, long_model(**inputs).logits, atol=1e-5)

    phase2 = tmp_path / "phase2"
    assert pretrain(tmp_path, long, phase2, "--init-from", str(tmp_path / "long_model"), "--start-step", "2",
                    "--max-steps", "4", model=False) == 0
    assert sorted(rates(phase2)) == [3, 4]
    assert rates(phase2)[3] == pytest.approx(rates(phase1)[3], rel=1e-6)  # the schedule goes on where step 2 was
    assert load_model(phase2).config.max_position_embeddings == 128


# ---------------------------------------------------------------------------------------------- mask rate

def test_dynamic_masking_masks_the_share_chosen_at_training_time(shard_folder):
    folder = shard_folder({"train": [[60] * 20]}, seq_len=64, mask_prob=0.15, max_predictions=20)
    for rate in (0.15, 0.3, 0.5):
        data = ShardDataset(folder, "train", masking="dynamic", mask_prob=rate, seed=3)
        for i in range(len(data)):
            sample = data[i]
            maskable = int(((sample["attention_mask"] == 1) & (sample["labels"] != -100)).sum())
            real = int(data.sequence(i)[2]) - 3  # [CLS], [SEP] between documents, [SEP] at the end
            target = int(np.floor(rate * real + 0.5))
            assert abs(maskable - target) <= 1  # words of two tokens: within one token of the target
    with pytest.raises(ValueError, match="masking='dynamic'"):
        ShardDataset(folder, "train", masking="static", mask_prob=0.3)


def test_character_masks_split_words_and_whole_word_masks_never_do(shard_folder):
    folder = shard_folder({"train": [[60] * 20]}, seq_len=64, word_len=2)
    split_words = {}
    for unit in ("word", "character"):
        data = ShardDataset(folder, "train", masking="dynamic", mask_prob=0.3, mask_unit=unit, seed=3)
        split_words[unit] = 0
        for i in range(len(data)):
            ids, starts, num_tokens = data.sequence(i)
            masked = data[i]["labels"].numpy() != -100
            for begin, length in zip(*whole_word_spans(ids[:num_tokens], starts[:num_tokens])):
                part = masked[begin:begin + length]
                split_words[unit] += int(part.any() and not part.all())
    assert split_words["word"] == 0 and split_words["character"] > 20
    with pytest.raises(ValueError, match="mask_unit must be"):
        ShardDataset(folder, "train", masking="dynamic", mask_unit="sentence")


def test_mixed_masks_split_words_in_some_sequences_only_and_repeat_exactly(shard_folder):
    folder = shard_folder({"train": [[60] * 20] * 4}, seq_len=32, word_len=2)
    data = ShardDataset(folder, "train", masking="dynamic", mask_prob=0.3, mask_unit="mixed", seed=3)
    again = ShardDataset(folder, "train", masking="dynamic", mask_prob=0.3, mask_unit="mixed", seed=3)
    splitting = []
    for i in range(len(data)):
        ids, starts, num_tokens = data.sequence(i)
        labels = data[i]["labels"]
        assert torch.equal(labels, again[i]["labels"])
        masked = labels.numpy() != -100
        splits = [masked[b:b + n].any() and not masked[b:b + n].all()
                  for b, n in zip(*whole_word_spans(ids[:num_tokens], starts[:num_tokens]))]
        splitting.append(any(splits))
    # a sequence masked by characters splits some word here (30% of two-token words); one masked by words never does
    assert len(data) >= 8 and 0 < sum(splitting) < len(splitting)


def test_mask_unit_is_recorded_and_needs_dynamic_masks(setup, in_process, capsys):
    tmp_path, short, _ = setup
    run_dir = tmp_path / "run"
    assert pretrain(tmp_path, short, run_dir, "--max-steps", "2", "--mask-unit", "character") == 2
    assert "--mask-unit character chooses the masks at training time: it needs --masking dynamic" in \
        capsys.readouterr().err
    assert pretrain(tmp_path, short, run_dir, "--max-steps", "2", "--masking", "dynamic", "--mask-unit",
                    "character") == 0
    assert json.loads((run_dir / "checkpoints" / "step_2" / "training_state.json").read_text())["mask_unit"] == \
        "character"
    capsys.readouterr()
    assert pretrain(tmp_path, short, run_dir, "--max-steps", "4", "--resume", "--mask-unit", "word") == 2
    assert "--mask-unit word differs from the --mask-unit character of the run being resumed" in \
        capsys.readouterr().err


def test_mask_prob_with_static_masks_or_against_the_checkpoint_is_refused(setup, in_process, capsys):
    tmp_path, short, _ = setup
    run_dir = tmp_path / "run"
    assert pretrain(tmp_path, short, run_dir, "--max-steps", "2", "--mask-prob", "0.3") == 2
    assert "--mask-prob 0.3 chooses the masks at training time: it needs --masking dynamic" in capsys.readouterr().err
    assert pretrain(tmp_path, short, run_dir, "--max-steps", "2", "--masking", "dynamic", "--mask-prob", "0.3") == 0
    assert json.loads((run_dir / "checkpoints" / "step_2" / "training_state.json").read_text())["mask_prob"] == 0.3
    capsys.readouterr()
    assert pretrain(tmp_path, short, run_dir, "--max-steps", "4", "--resume", "--mask-prob", "0.2") == 2
    assert "--mask-prob 0.2 differs from the run being resumed" in capsys.readouterr().err


def test_a_resumed_run_keeps_the_window_mode_its_checkpoint_was_trained_with(setup, in_process, capsys):
    tmp_path, short, _ = setup
    (tmp_path / "tiny.json").write_text(json.dumps({**TINY_MODEL, "sparse_window_mode": "block"}))
    run_dir = tmp_path / "run"
    assert pretrain(tmp_path, short, run_dir, "--max-steps", "2") == 0
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_MODEL))  # no mode: token, the default now
    capsys.readouterr()
    assert pretrain(tmp_path, short, run_dir, "--max-steps", "4", "--resume") == 0
    assert "trained with sparse_window_mode 'block': keeping it" in capsys.readouterr().out
    assert json.loads((run_dir / "checkpoints" / "step_4" / "config.json").read_text())["sparse_window_mode"] == "block"


def test_unigram_output_bias_starts_the_run_at_the_frequency_baseline(setup, in_process, capsys):
    """With the output bias at the training tokens' log frequencies, the untrained model's validation BPC is that of
    the frequency table (up to the tiny contribution of random hidden states); without it, a uniform guess."""
    tmp_path, short, _ = setup
    assert pretrain(tmp_path, short, tmp_path / "run", "--max-steps", "1", "--eval-interval", "1",
                    "--output-bias-init", "unigram") == 0
    first = read_metrics(tmp_path / "run")[1][0]
    assert first["step"] == 0 and abs(first["val_bpc"] - first["frequency_baseline_bpc"]) < 0.3
    assert pretrain(tmp_path, short, tmp_path / "plain", "--max-steps", "1", "--eval-interval", "1") == 0
    assert read_metrics(tmp_path / "plain")[1][0]["val_bpc"] > 14.0


# ---------------------------------------------------------------------------------------------- starting points

def paired_corpus(shard_folder, pairs=10, length=600):
    """Documents of two-token words (A_i, B_i) in random order: A_i is always followed by B_i, B_i by any A_j."""
    rng = np.random.default_rng(7)
    first = 1000 + 2 * np.arange(pairs)
    words = rng.integers(0, pairs, size=length // 2)
    tokens = np.stack([first[words], first[words] + 1], axis=1).ravel()
    return shard_folder({"train": [[length]]}, seq_len=64, tokens={"train": [tokens]}), first


def test_cooccurrence_vectors_put_a_word_s_two_characters_closest(shard_folder):
    from lfzh_ds.training.initialization import cooccurrence_vectors

    folder, first = paired_corpus(shard_folder)
    data = ShardDataset(folder, "train")
    ids, vectors = cooccurrence_vectors(data, dim=16)
    again_ids, again = cooccurrence_vectors(data, dim=16)
    assert np.array_equal(ids, again_ids) and np.array_equal(vectors, again)  # deterministic
    row = {int(t): i for i, t in enumerate(ids)}
    for a in first:
        dots = {int(t): float(vectors[row[int(a)]] @ vectors[row[int(t)]]) for t in ids if t >= 1000 and t != a}
        assert max(dots, key=dots.get) == a + 1  # B_i, of all the corpus's other characters


def test_cooccurrence_embedding_init_changes_only_the_corpus_tokens(shard_folder, frugal_torch):
    from lfzh_ds.configuration import LongformerZhConfig
    from lfzh_ds.modeling import LongformerZhForMaskedLM
    from lfzh_ds.training.initialization import COOCCURRENCE_SCALE, init_word_embeddings_from_cooccurrence

    folder, first = paired_corpus(shard_folder)
    model = LongformerZhForMaskedLM(LongformerZhConfig(**TINY_MODEL))
    before = model.bert.embeddings.word_embeddings.weight.detach().clone()
    init_word_embeddings_from_cooccurrence(model, ShardDataset(folder, "train"))
    after = model.bert.embeddings.word_embeddings.weight.detach()
    changed = (after != before).any(dim=1).nonzero().ravel().tolist()
    assert set(first.tolist()) | set((first + 1).tolist()) <= set(changed) and len(changed) <= 2 * len(first) + 3
    assert float(after[changed].std()) == pytest.approx(COOCCURRENCE_SCALE * 0.02, rel=0.2)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight  # still tied


def test_starting_points_are_for_models_trained_from_scratch(setup, in_process, capsys):
    tmp_path, short, _ = setup
    phase1 = tmp_path / "phase1"
    assert pretrain(tmp_path, short, phase1, "--max-steps", "2", "--embedding-init", "cooccurrence") == 0
    capsys.readouterr()
    assert pretrain(tmp_path, short, tmp_path / "phase2", "--continue-from", str(phase1), "--max-steps", "3",
                    "--embedding-init", "cooccurrence", model=False) == 2
    assert "--embedding-init cooccurrence is for a model trained from scratch" in capsys.readouterr().err


def test_training_softmax_over_the_training_tokens_is_kept_on_resume(setup, in_process, capsys):
    """--output-vocab training: the same start, so the first step's loss is below the full softmax's (fewer
    columns share the probability); a resumed run keeps the choice and refuses another."""
    tmp_path, short, _ = setup
    losses = {}
    for choice in ("all", "training"):
        run_dir = tmp_path / choice
        assert pretrain(tmp_path, short, run_dir, "--max-steps", "2", "--output-vocab", choice) == 0
        losses[choice] = read_metrics(run_dir)[0][0]["loss"]
    assert losses["training"] < losses["all"] - 0.1
    run_dir = tmp_path / "training"
    assert pretrain(tmp_path, short, run_dir, "--max-steps", "3", "--resume") == 0
    state = json.loads((run_dir / "checkpoints" / "step_3" / "training_state.json").read_text())
    assert state["output_vocab"] == "training"
    capsys.readouterr()
    assert pretrain(tmp_path, short, run_dir, "--max-steps", "4", "--resume", "--output-vocab", "all") == 2
    assert "--output-vocab all differs from the --output-vocab training of the run being resumed" in \
        capsys.readouterr().err
