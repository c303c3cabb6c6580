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
    from lfzh_ds.training.curves import plot_curves, run_title

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


# ---------------------------------------------------------------------------------------------- by position, long document

# The model below ranks 金 first and 银 second at every position and never ranks 气 in its top 5, whatever it reads:
# a blank hiding 金 is a top-1 (and top-5) hit, one hiding 银 a top-5 hit only, one hiding 气 no hit.
ALWAYS_FIRST, ALWAYS_SECOND, NEVER = "金", "银", "气"


@pytest.fixture(scope="module")
def knows_jin_4096(tmp_path_factory):
    """A 4,096-position model built to know one answer (see ALWAYS_FIRST): its output bias decides every blank."""
    import torch

    from lfzh_ds.configuration import LongformerZhConfig
    from lfzh_ds.modeling import LongformerZhForMaskedLM
    from lfzh_ds.tokenization import load_tokenizer

    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = LongformerZhConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=4096, attention_window=64)
    model = LongformerZhForMaskedLM(config)
    with torch.no_grad():
        for token, bias in ((ALWAYS_FIRST, 100.0), (ALWAYS_SECOND, 90.0), (NEVER, -100.0)):
            model.cls.predictions.bias[tokenizer.convert_tokens_to_ids(token)] = bias
    path = tmp_path_factory.mktemp("knows_jin_4096")
    model.save_pretrained(path)
    return path


def character_at(position: int) -> str:
    """The character at token position ``position`` of every input of ``positional_corpus``: a different mix of the
    three characters in each region, so every band has its own known top-1 and top-5, and a digit now and then
    (never a blank: not a Chinese character)."""
    if position % 13 == 0:
        return "1"
    if position < 500:
        return ALWAYS_SECOND if (position // 7) % 2 else NEVER
    if position < 2500:
        return NEVER if (position // 5) % 3 == 0 else ALWAYS_FIRST
    return ALWAYS_FIRST if (position // 11) % 2 else ALWAYS_SECOND


def positional_corpus(path: Path, num_inputs: int, seq_len: int = 4096) -> Path:
    """JSON lines whose packing gives inputs with ``character_at(p)`` at every position p: each document is
    ``seq_len - 3`` one-token characters, so with the [SEP] after it it fills one input's body exactly; the last
    document, with no [SEP] after it, is one token short of an input and is left out."""
    document = "".join(character_at(p) for p in range(1, seq_len - 2))
    path.write_text("".join(json.dumps({"content": document}) + "\n" for _ in range(num_inputs + 1)), encoding="utf-8")
    return path


def test_by_position_scores_every_band_against_a_model_built_to_know_the_answers(knows_jin_4096, tmp_path, capsys):
    """Oracle: the blanks' positions (from the library, same seed), the answer at each read off ``character_at``, and
    the model's known ranking; each band's top-1 is its share of 金, its top-5 its share of 金 or 银."""
    import numpy as np

    from lfzh_ds.cloze import position_band_blanks, read_corpus_texts
    from lfzh_ds.tokenization import load_tokenizer

    corpus = positional_corpus(tmp_path / "docs.jsonl", num_inputs=3)
    args = ["by-position", "--model", str(knows_jin_4096), "--corpus", str(corpus), "--num-blanks", "250",
            "--seed", "3"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["seq_len"], result["inputs"], result["blanks"], result["blank_every"]) == (4096, 3, 250, 40)

    inputs = position_band_blanks(read_corpus_texts([corpus]), load_tokenizer(), 4096, 250, seed=3)
    positions = np.concatenate([x.positions for x in inputs])
    answers = np.array([character_at(int(p)) for p in positions])
    assert len(positions) == 250 and NEVER in answers and ALWAYS_SECOND in answers

    def expected(start, end):
        inside = (positions >= start) & (positions <= end)
        return {"band": f"{start}-{end}", "start": start, "end": end, "blanks": int(inside.sum()),
                "top1": pytest.approx(float(np.mean(answers[inside] == ALWAYS_FIRST))),
                "top5": pytest.approx(float(np.mean(np.isin(answers[inside], [ALWAYS_FIRST, ALWAYS_SECOND]))))}

    assert result["bands"] == [expected(0, 499), expected(500, 2047), expected(2048, 2499), expected(2500, 4095)]
    assert sum(band["blanks"] for band in result["bands"]) == 250
    assert min(band["blanks"] for band in result["bands"]) >= 25  # every band gets its share of the blanks
    assert result["bands"][0]["top1"] == 0 and result["bands"][1]["top5"] < 1  # the bands really differ
    assert result["first_500"] == expected(0, 499) and result["past_2500"] == expected(2500, 4095)
    assert result["ratio_far_to_near"] == pytest.approx(1.0 / result["first_500"]["top5"])  # all of 2500+ is 金/银

    assert main(args) == 0  # as text: one line per band, then the ratio
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("250 blanks by position in 3 inputs of 4,096 tokens")
    assert [line.split()[0] for line in lines[2:6]] == ["0-499", "500-2047", "2048-2499", "2500-4095"]
    assert lines[6].endswith(f"{result['ratio_far_to_near']:.2f}")


def test_by_position_blanks_are_spread_over_positions_seeded_and_masked_all_at_once():
    import numpy as np

    from lfzh_ds.cloze import position_band_blanks
    from lfzh_ds.constants import MASK_ID
    from lfzh_ds.tokenization import load_tokenizer

    tokenizer = load_tokenizer()
    texts = ["".join(character_at(p) for p in range(1, 4093))] * 3
    inputs = position_band_blanks(texts, tokenizer, 4096, 10_000, seed=0)
    assert len(inputs) == 2  # 3 x 4,092 tokens and 2 [SEP]s make 2 full inputs of 4,094 and a short one, left out
    for blanked in inputs:
        positions = blanked.positions
        assert len(positions) == len(range(1, 4095, 40))  # one in every stretch of 40 tokens
        assert positions.min() >= 1 and positions.max() <= 4094  # never [CLS] or the last [SEP]
        assert np.all(np.diff(positions) >= 2)  # never neighbours
        assert np.all((positions - 1) // 40 == np.arange(len(positions)))
        assert all(len(t) == 1 and "\u4e00" <= t <= "\u9fff" for t in tokenizer.convert_ids_to_tokens(
            blanked.answers.tolist()))
        masked = blanked.masked_ids()
        assert np.array_equal(np.flatnonzero(masked == MASK_ID), positions)
        assert np.array_equal(np.delete(masked, positions), np.delete(blanked.ids, positions))
    again = position_band_blanks(texts, tokenizer, 4096, 10_000, seed=0)
    other = position_band_blanks(texts, tokenizer, 4096, 10_000, seed=1)
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(inputs, again))
    assert not np.array_equal(inputs[0].positions, other[0].positions)
    fewer = position_band_blanks(texts, tokenizer, 4096, 150, seed=0)  # the second input keeps a subset: 47 of 103
    assert [len(x.positions) for x in fewer] == [103, 47] and fewer[1].positions.max() > 2500
    dense = position_band_blanks(texts, tokenizer, 4096, 10_000, blank_every=2, seed=0)
    assert all(np.all(np.diff(x.positions) >= 2) for x in dense)  # stretches of 2 next to each other: still apart


def test_by_position_reads_each_blank_where_it_is_with_all_of_an_inputs_blanks_masked_in_one_forward():
    """A stand-in model that answers a [MASK] with the true character of its position and nothing elsewhere: every
    blank scores a hit only if the input came masked at exactly the blanks and each blank was read where it is; the
    forwards it sees show one pass over whole inputs, all their blanks at once."""
    import numpy as np
    import torch

    from lfzh_ds.cloze import position_band_blanks, score_position_blanks
    from lfzh_ds.constants import MASK_ID
    from lfzh_ds.tokenization import load_tokenizer

    tokenizer = load_tokenizer()
    document = "".join(character_at(p) for p in range(1, 4094))  # with its [SEP], one input's body (as below)
    inputs = position_band_blanks([document] * 4, tokenizer, 4096, 10_000, seed=0)
    truth = torch.from_numpy(inputs[0].ids)  # every input of this corpus holds the same tokens
    assert len(inputs) == 3 and all(np.array_equal(x.ids, inputs[0].ids) for x in inputs)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))
            self.forwards = []

        def bert(self, ids, attention_mask, token_type_ids):
            self.forwards.append((tuple(ids.shape), int(attention_mask.sum()), int((ids == MASK_ID).sum())))
            hidden = torch.where(ids == MASK_ID, truth.expand_as(ids), -1).float()[..., None]
            return type("Output", (), {"last_hidden_state": hidden})

        def cls(self, hidden):  # the id in the hidden state wins; -1 (not a blank) gives all-equal logits
            ids = hidden[:, 0].long()
            logits = torch.zeros(len(ids), len(tokenizer))
            logits[ids >= 0, ids[ids >= 0]] = 1.0
            return logits

    model = Oracle()
    scores = score_position_blanks(model, inputs, batch_size=2)
    assert len(scores.positions) == sum(len(x.positions) for x in inputs) and scores.top1.all() and scores.top_k.all()
    blanks = [len(x.positions) for x in inputs]
    assert model.forwards == [((2, 4096), 2 * 4096, blanks[0] + blanks[1]), ((1, 4096), 4096, blanks[2])]


def test_bands_are_inclusive_and_the_default_ones_are_cut_to_the_inputs():
    import numpy as np

    from lfzh_ds.cloze import PositionBand, PositionScores, band_score, parse_bands

    scores = PositionScores(positions=np.array([1, 499, 500, 2047, 2048]), answers=np.zeros(5, int),
                            top1=np.array([True, False, False, False, True]), top_k=np.array([True, True, False,
                                                                                            True, True]))
    assert band_score(scores, PositionBand(0, 499)) == {"band": "0-499", "start": 0, "end": 499, "blanks": 2,
                                                        "top1": 0.5, "top5": 1.0}
    assert band_score(scores, PositionBand(500, 2047))["blanks"] == 2
    assert band_score(scores, PositionBand(3000, 4000)) == {"band": "3000-4000", "start": 3000, "end": 4000,
                                                            "blanks": 0, "top1": None, "top5": None}
    assert [b.name for b in parse_bands(None, 4096)] == ["0-499", "500-2047", "2048-2499", "2500-4095"]
    assert [b.name for b in parse_bands(None, 2048)] == ["0-499", "500-2047"]
    assert [b.name for b in parse_bands(None, 1024)] == ["0-499", "500-1023"]
    assert [b.name for b in parse_bands(None, 8192)][-1] == "2500-8191"
    assert [b.name for b in parse_bands(" 0-9 , 20-29", 64)] == ["0-9", "20-29"]  # gaps are allowed


def test_by_position_inputs_are_the_rows_the_data_service_packs():
    """Oracle: data_service.pack.pack_documents on the same documents' tokens; its full rows are our inputs."""
    import numpy as np

    from data_service.pack import pack_documents
    from lfzh_ds.cloze import packed_windows
    from lfzh_ds.tokenization import load_tokenizer

    tokenizer = load_tokenizer()
    texts = ["今天北京的天气很好，我们去公园散步。", "股市大涨", "中国人民银行决定下调金融机构存款准备金率。" * 3, "好"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    rows, _, num_tokens = pack_documents(np.concatenate(ids).astype(np.uint16), np.ones(sum(map(len, ids)), np.uint8),
                                         np.array([len(i) for i in ids]), 16)
    full = rows[num_tokens == 16].astype(np.int64)
    ours = list(packed_windows(texts, tokenizer, 16))
    assert len(ours) == len(full) >= 4 and all(np.array_equal(a, b) for a, b in zip(ours, full))


def test_by_position_refuses_bad_bands_and_a_seq_len_past_the_models_positions(tiny_model, tmp_path, capsys):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("今天北京的天气很好，我们去公园散步。\n" * 20, encoding="utf-8")
    base = ["by-position", "--model", str(tiny_model), "--corpus", str(corpus)]
    for extra, message in (
            (["--seq-len", "256"], "--seq-len 256: the model has 128 positions"),
            (["--bands", "0-99,50-120"], "--bands 0-99,50-120: 50-120 overlaps or comes before 0-99"),
            (["--bands", "10-5"], "--bands 10-5: 10-5 ends before it starts"),
            (["--bands", "0-99,far"], "--bands 0-99,far: 'far' is not START-END"),
            (["--bands", "0-200"], "--bands 0-200: 0-200 goes past position 127, the last of --seq-len 128"),
            (["--num-blanks", "0"], "--num-blanks 0: score at least 1 blank")):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err == f"evaluate.py: error: {err.split('error: ', 1)[1]}" and err.count("\n") == 1, err
        assert message in err, err
    # the default bands are cut to the model's 128 positions; nothing lies past 2,500, so there is no ratio
    assert main(base + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [b["band"] for b in result["bands"]] == ["0-127"] and result["bands"][0]["blanks"] == result["blanks"] > 0
    assert result["past_2500"] is None and result["ratio_far_to_near"] is None
    assert main(base) == 0
    assert "none, the inputs end at 127" in capsys.readouterr().out


FINANCE = ["中国人民银行决定下调金融机构存款准备金率。", "证券交易所公布上市公司年度报告。"]
WEATHER = ["今天北京的天气很好，我们去公园散步。", "足球比赛在周末举行，球迷热情高涨。"]


def long_document() -> str:
    """Finance sentences to character 1,000, weather ones to 2,300, a finance sentence again, weather to 2,700: the
    first words past 2,000 occur earlier only after character 1,000; the first that occurs before 1,000 sits past
    2,300."""
    text = ""
    for sentences, until in ((FINANCE, 1000), (WEATHER, 2300)):
        while len(text) < until:
            text += sentences[len(text) % 2]
    text += FINANCE[0]
    while len(text) < 2700:
        text += WEATHER[len(text) % 2]
    return text


def test_long_document_fill_mask_blanks_past_character_2000_and_reads_the_whole_document(knows_jin_4096, tmp_path,
                                                                                         capsys):
    from lfzh_ds.tokenization import load_tokenizer

    document = long_document()
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"content": t}, ensure_ascii=False) + "\n"
                              for t in ["短的文章。" * 100, document]), encoding="utf-8")
    args = ["fill-mask", "--model", str(knows_jin_4096), "--corpus", str(corpus)]
    assert main([*args, "--long-document", "2000", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    at, word = result["blank_char"], result["word"]
    assert result["document"] == 1 and result["document_chars"] == len(document) > 2000
    assert at >= 2300 and document[at:at + len(word)] == word and result["answer"] == document[at]
    assert len(word) >= 2 and result["word_earlier_at"] == document.index(word) < 1000  # the clue, far back
    masked = document[:at] + "[MASK]" + document[at + 1:]
    assert result["tokens"] == len(load_tokenizer()(masked)["input_ids"]) == len(document) + 2  # all of it read
    assert result["blank_token"] == at + 1 and result["model_positions"] == 4096
    assert result["context"] == document[at - 30:at] + "[MASK]" + document[at + 1:at + 31]
    assert result["top"][:2] == [ALWAYS_FIRST, ALWAYS_SECOND] and len(result["top"]) == 5
    assert result["answer_rank"] == (result["top"].index(result["answer"]) + 1 if result["answer"] in result["top"]
                                     else None)
    assert main(args) == 0  # the default is 2,000 characters too; as text
    shown = capsys.readouterr().out
    assert f"{len(document):,} characters" in shown and f"blank at character {at:,}" in shown
    assert f"the first of the word {word}, which occurs before at character {document.index(word)}" in shown


def test_long_document_fill_mask_refuses_a_short_model_and_a_corpus_without_a_long_document(tiny_model, tmp_path,
                                                                                             capsys):
    document = long_document()
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(json.dumps({"content": document}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["fill-mask", "--model", str(tiny_model), "--corpus", str(corpus)]) == 2
    err = capsys.readouterr().err
    assert (f"document 0 ({len(document):,} characters) is {len(document) + 2:,} tokens with [CLS] and [SEP]; the "
            "model has 128 positions and would not read it whole") in err
    assert err.count("\n") == 1
    assert main(["fill-mask", "--model", str(tiny_model), "--corpus", str(corpus), "--long-document", "3000"]) == 2
    assert "no document longer than 3,000 characters" in capsys.readouterr().err
    assert main(["fill-mask", "--model", str(tiny_model), "--text", "今天[MASK]气", "--long-document", "10"]) == 2
    assert "--long-document goes with --corpus" in capsys.readouterr().err
