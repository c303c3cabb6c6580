"""launch/evaluate.py and the metrics file it reads (the launcher-driven BPC check is in test_pretrain.py)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from launch.evaluate import main
from lfzh_ds.training.metrics import read_metrics, truncate_after

REPO = Path(__file__).resolve().parent.parent


def write_metrics(run_dir: Path, steps: int = 20) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [{"kind": "val", "step": 0, "val_loss": 9.9, "val_bpc": 9.9 / math.log(2)}]
    for s in range(1, steps + 1):
        loss = 10.0 - 0.2 * s
        lines.append({"kind": "train", "step": s, "loss": loss, "bpc": loss / math.log(2), "lr": 1e-3 * s / steps,
                      "loss_scale": 1.0, "tokens": 100 * s, "samples": 8 * s, "wall_time": 1.0 * s})
        if s % 10 == 0:
            lines.append({"kind": "val", "step": s, "val_loss": loss, "val_bpc": loss / math.log(2)})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_curves_subcommand_writes_a_png_next_to_the_metrics(tmp_path):
    run_dir = tmp_path / "run"
    write_metrics(run_dir)
    result = subprocess.run([sys.executable, "launch/evaluate.py", "curves", "--run", str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # as a script, the way users run it
    assert result.returncode == 0, result.stderr
    png = run_dir / "curves.png"
    assert f"wrote {png}" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_of_a_folder_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["curves", "--run", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_bpc_of_a_missing_model_names_the_path(tmp_path, capsys):
    assert main(["bpc", "--model", str(tmp_path / "m"), "--data", str(tmp_path)]) == 2
    assert f"{tmp_path / 'm'} does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from lfzh_ds.configuration import LongformerZhConfig
    from lfzh_ds.modeling import LongformerZhForMaskedLM

    path = tmp_path_factory.mktemp("tiny_model")
    config = LongformerZhConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=128, attention_window=64)
    LongformerZhForMaskedLM(config).save_pretrained(path)
    return path


def shards_without_validation(data_dir: Path) -> Path:
    """A manifest as launch/preprocess.py --val-fraction 0 writes it (the train split is not read here)."""
    from lfzh_ds.constants import SCHEMA_VERSION, VOCAB_MD5

    data_dir.mkdir()
    empty = {"shards": [], "rows": 0, "tokens": 0, "documents": 0}
    (data_dir / "manifest.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "vocab_md5": VOCAB_MD5, "config": {"seq_len": 128, "dupe_factor": 2},
        "splits": {"train": empty, "validation": empty}}))
    return data_dir


def test_bpc_of_no_tokens_is_nan_not_zero():
    from lfzh_ds.training.evaluation import BpcResult

    result = BpcResult(cross_entropy_sum=0.0, masked_tokens=0, sequences=0)
    assert math.isnan(result.loss) and math.isnan(result.bpc)
    assert f"{result.bpc:.3f}" == "nan"
    assert BpcResult(cross_entropy_sum=2 * math.log(2), masked_tokens=2, sequences=1).bpc == 1.0


def test_bpc_of_zero_sequences_or_an_empty_split_is_refused(tiny_model, tmp_path, capsys):
    data = shards_without_validation(tmp_path / "shards")
    assert main(["bpc", "--model", str(tiny_model), "--data", str(data), "--max-sequences", "0"]) == 2
    assert "--max-sequences 0: evaluate at least 1 sequence" in capsys.readouterr().err
    assert main(["bpc", "--model", str(tiny_model), "--data", str(data)]) == 2
    assert f"--data {data}: the validation split is empty" in capsys.readouterr().err


def test_bpc_of_missing_shards_names_the_folder(tiny_model, tmp_path, capsys):
    assert main(["bpc", "--model", str(tiny_model), "--data", str(tmp_path / "nothing")]) == 2
    assert f"no manifest.json in {tmp_path / 'nothing'}" in capsys.readouterr().err


def test_read_metrics_splits_train_and_val_lines_sorted_by_step(tmp_path):
    write_metrics(tmp_path / "run", steps=20)
    train, val = read_metrics(tmp_path / "run")
    assert [r["step"] for r in train] == list(range(1, 21))
    assert [r["step"] for r in val] == [0, 10, 20]


def test_resuming_drops_the_interrupted_runs_tail_and_a_cut_line(tmp_path):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, steps=20)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 21, "lo')  # a line cut short by SIGKILL
    dropped = truncate_after(run_dir / "metrics.jsonl", 10)
    assert dropped == 12  # steps 11-20, the val line at 20, the cut line
    train, val = read_metrics(run_dir)
    assert train[-1]["step"] == 10 and [v["step"] for v in val] == [0, 10]


@pytest.mark.parametrize("bad", ["not json\n"])
def test_a_corrupt_metrics_line_is_reported_with_its_line_number(tmp_path, bad):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n' + bad)
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON line"):
        read_metrics(tmp_path)


def test_bpc_is_the_mean_cross_entropy_of_every_masked_token_in_bits(tiny_model, shard_folder, capsys):
    """Oracle: the model's full logits, cross-entropy summed over every predicted token of the first static copy
    of each validation sequence, divided by their number and by ln 2. Batches of 3 hold different numbers of
    masked tokens (padded rows predict fewer), so a mean of batch means or a wrong copy shows."""
    import torch
    import torch.nn.functional as F

    from lfzh_ds.modeling import LongformerZhForMaskedLM
    from lfzh_ds.shards import ShardDataset

    data = shard_folder({"validation": [[30], [100], [10], [200, 20]]}, seq_len=64, dupe_factor=2)
    ds = ShardDataset(data, "validation", masking="static")
    assert ds.num_rows == 8 and len(ds) == 16
    model = LongformerZhForMaskedLM.from_pretrained(tiny_model).eval()
    total, count, per_row = 0.0, 0, []
    with torch.no_grad():
        for row in range(ds.num_rows):  # index row < num_rows: copy 0 of that row
            sample = ds[row]
            logits = model(input_ids=sample["input_ids"][None], attention_mask=sample["attention_mask"][None]).logits[0]
            labelled = sample["labels"] != -100
            total += F.cross_entropy(logits[labelled].double(), sample["labels"][labelled], reduction="sum").item()
            count += int(labelled.sum())
            per_row.append(int(labelled.sum()))
    assert len(set(per_row)) > 2  # the rows really differ in their number of masked tokens

    assert main(["bpc", "--model", str(tiny_model), "--data", str(data), "--batch-size", "3", "--json"]) == 0
    measured = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert measured["sequences"] == 8 and measured["masked_tokens"] == count
    assert measured["loss"] == pytest.approx(total / count, rel=1e-5)
    assert measured["bpc"] == pytest.approx(total / count / math.log(2), rel=1e-5)


def test_filler_batches_that_keep_processes_in_step_are_not_counted(tiny_model, shard_folder):
    """Validation pads a process's work with forwards of sample 0 (ZeRO-3 needs the same number on every process);
    those must not add to the sums."""
    from lfzh_ds.modeling import LongformerZhForMaskedLM
    from lfzh_ds.shards import ShardDataset
    from lfzh_ds.training.evaluation import masked_lm_cross_entropy

    ds = ShardDataset(shard_folder({"validation": [[100, 100]]}, seq_len=64), "validation")
    model = LongformerZhForMaskedLM.from_pretrained(tiny_model).eval()
    plain = masked_lm_cross_entropy(model, ds, [1, 2, 3], batch_size=2)
    padded = masked_lm_cross_entropy(model, ds, [1, 2, 3], batch_size=2, num_batches=4)
    assert (padded.masked_tokens, padded.sequences) == (plain.masked_tokens, plain.sequences) == (plain.masked_tokens, 3)
    assert padded.cross_entropy_sum == pytest.approx(plain.cross_entropy_sum, rel=1e-6)
    with pytest.raises(ValueError, match="num_batches=1 is fewer than the 2 batches needed"):
        masked_lm_cross_entropy(model, ds, [1, 2, 3], batch_size=2, num_batches=1)


# ---------------------------------------------------------------------------------------------- interval, baseline

def test_bootstrap_interval_matches_the_normal_approximation_of_a_known_distribution():
    """400 sequences of 50 masked tokens each with i.i.d. per-token cross-entropy (mean 6, sd 2 nats): the 95%
    interval of the BPC is mean +- 1.96 sd / sqrt(20000) / ln 2 = +-0.0196 bits; the bootstrap must agree."""
    import numpy as np

    from lfzh_ds.training.evaluation import BpcResult

    rng = np.random.default_rng(0)
    per_token = rng.normal(6.0, 2.0, size=(400, 50))
    per_sequence = np.stack([per_token.sum(axis=1), np.full(400, 50.0)], axis=1)
    result = BpcResult(float(per_token.sum()), 20000, 400, per_sequence)
    low, high = result.bpc_interval()
    half = 1.96 * 2.0 / math.sqrt(20000) / math.log(2)
    assert low < result.bpc < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.12)
    assert result.bpc == pytest.approx(per_token.mean() / math.log(2))
    same = BpcResult(600.0, 100, 2, np.array([[300.0, 50], [300.0, 50]]))  # identical sequences: no spread
    assert same.bpc_interval() == pytest.approx((6 / math.log(2), 6 / math.log(2)))


def test_frequency_baseline_is_the_unigram_of_the_training_tokens_counted_from_the_arrow_files(shard_folder):
    """Oracle: token counts read straight from the training shards with pyarrow (not through ShardDataset),
    add-one smoothed over the vocab; the baseline is their mean -log2 p over the validation masked tokens."""
    from collections import Counter

    import pyarrow as pa

    from lfzh_ds.constants import VOCAB_SIZE
    from lfzh_ds.shards import ShardDataset
    from lfzh_ds.training.evaluation import frequency_baseline

    folder = shard_folder({"train": [[50, 60], [70]], "validation": [[40], [90]]}, seq_len=64)
    counts = Counter()
    for path in sorted(folder.glob("train-*.arrow")):
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all().to_pydict()
        for ids, n in zip(table["input_ids"], table["num_tokens"]):
            counts.update(list(ids[:n]))
    total = sum(counts.values()) + VOCAB_SIZE
    val = ShardDataset(folder, "validation")
    bits, n = 0.0, 0
    for i in range(val.num_rows):
        for label in val[i]["labels"].tolist():
            if label != -100:
                bits -= math.log2((counts[label] + 1) / total)
                n += 1
    result = frequency_baseline(ShardDataset(folder, "train"), val, list(range(val.num_rows)))
    assert result.masked_tokens == n
    assert result.bpc == pytest.approx(bits / n, rel=1e-9)


def test_bpc_command_prints_the_interval_and_the_frequency_baseline(tiny_model, shard_folder, capsys):
    data = shard_folder({"train": [[60] * 4], "validation": [[60] * 4]}, seq_len=64)
    assert main(["bpc", "--model", str(tiny_model), "--data", str(data), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert measured["bpc_low"] < measured["bpc"] < measured["bpc_high"]
    assert 10 < measured["frequency_baseline_bpc"] < 14.4  # random tokens: close to uniform, a little below
    assert main(["bpc", "--model", str(tiny_model), "--data", str(data)]) == 0
    assert "95% interval" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- cloze

@pytest.fixture(scope="module")
def knows_jin(tmp_path_factory):
    """A model built to know one answer: its output bias makes 金 the top candidate everywhere, 银 the second."""
    import torch

    from lfzh_ds.configuration import LongformerZhConfig
    from lfzh_ds.modeling import LongformerZhForMaskedLM
    from lfzh_ds.tokenization import load_tokenizer

    tokenizer = load_tokenizer()
    config = LongformerZhConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=128, attention_window=64)
    model = LongformerZhForMaskedLM(config)
    with torch.no_grad():
        model.cls.predictions.bias[tokenizer.convert_tokens_to_ids("金")] = 100.0
        model.cls.predictions.bias[tokenizer.convert_tokens_to_ids("银")] = 90.0
    path = tmp_path_factory.mktemp("knows_jin")
    model.save_pretrained(path)
    return path


def test_cloze_scores_top1_and_top5_against_a_model_built_to_know_the_answer(knows_jin, tmp_path, capsys):
    blanks = tmp_path / "blanks.jsonl"
    rows = [{"text": "存款准备[MASK]率下调", "answer": "金"}, {"text": "中国人民[MASK]行", "answer": "银"},
            {"text": "今天天[MASK]很好", "answer": "气"}, {"text": "[MASK]融机构", "answer": "金"}]
    blanks.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert main(["cloze", "--model", str(knows_jin), "--blanks", str(blanks), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["blanks"] == 4 and result["top1"] == 0.5 and result["top5"] == 0.75
    # the frequency guess of the blanks' own texts: 金 is the most frequent character there
    assert result["frequency_guess"][0] == "金" and result["frequency_top1"] == 0.5
    # as text: every blank shown with the model's answers, the right ones marked
    assert main(["cloze", "--model", str(knows_jin), "--blanks", str(blanks), "--examples", "4"]) == 0
    shown = capsys.readouterr().out.splitlines()[1:]
    assert [line.endswith("(in its top 5)") for line in shown] == [True, True, False, True]


def test_cloze_blanks_made_from_a_corpus_are_deterministic_characters_of_jieba_words():
    import jieba

    from lfzh_ds.cloze import make_blanks

    docs = ["中国人民银行决定下调金融机构存款准备金率。今天北京的天气很好，我们去公园散步。",
            "新能源汽车的销量持续增长，市场竞争日趋激烈。股票市场今天大幅上涨，投资者信心增强。"]
    first, again, other = make_blanks(docs, 10, seed=1), make_blanks(docs, 10, seed=1), make_blanks(docs, 10, seed=2)
    assert first == again and len(first) == 4
    assert [b.text for b in first] != [b.text for b in other]
    for blank in first:
        assert blank.text.count("[MASK]") == 1
        sentence = blank.text.replace("[MASK]", blank.answer)
        at = blank.text.index("[MASK]")
        position, words = 0, []
        for word in jieba.lcut(sentence, HMM=False):
            words.append((position, word))
            position += len(word)
        (start, word), = [(s, w) for s, w in words if s <= at < s + len(w)]
        assert len(word) >= 2  # one character of a multi-character word


def test_cloze_file_with_a_bad_line_is_an_error_naming_it(knows_jin, tmp_path, capsys):
    blanks = tmp_path / "blanks.jsonl"
    blanks.write_text('{"text": "今天[MASK]气", "answer": "天"}\n{"text": "no mask", "answer": "x"}\n')
    assert main(["cloze", "--model", str(knows_jin), "--blanks", str(blanks)]) == 2
    assert f"{blanks}:2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- class weights

def test_balanced_class_weights_equal_scikit_learns():
    import numpy as np
    from sklearn.utils.class_weight import compute_class_weight

    from lfzh_ds.finetuning import class_weights

    labels = [0] * 7 + [1] * 50 + [2] * 23
    ours = class_weights(labels, 3, "balanced")
    theirs = compute_class_weight("balanced", classes=np.arange(3), y=np.array(labels))
    assert ours.tolist() == pytest.approx(theirs.tolist(), rel=1e-6)
    assert class_weights(labels, 3, "none") is None
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] have no training document"):
        class_weights(labels, 4, "balanced")


def test_curves_name_the_run_and_draw_the_frequency_baseline(tmp_path):
    from lfzh_ds.training.metrics import plot_curves, run_title

    run_dir = tmp_path / "qs" / "run"
    write_metrics(run_dir)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "val", "step": 20, "val_loss": 6.0, "val_bpc": 8.66,
                            "frequency_baseline_bpc": 9.63}) + "\n")
    (run_dir / "model_config.json").write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 128,
                                                           "attention_backend": "block_sparse",
                                                           "attention_window": 128}))
    (run_dir / "args.json").write_text(json.dumps({"data": "/x/shards", "masking": "dynamic", "mask_prob": 0.3,
                                                   "seed": 42}))
    assert run_title(run_dir) == ("qs/run | 2 layers x 128 hidden, block_sparse window 128 | data shards, "
                                  "dynamic 30% masking, seed 42")
    assert plot_curves(run_dir).read_bytes()[:4] == b"\x89PNG"
    config = json.loads((run_dir / "model_config.json").read_text())
    (run_dir / "model_config.json").write_text(json.dumps({**config, "attention_window": [4, 16]}))
    assert "block_sparse windows 4/16 |" in run_title(run_dir)
