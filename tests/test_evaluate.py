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
