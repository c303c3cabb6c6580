"""Plausible user mistakes from walking through README.md: each must stop with a message naming the file or key
(and nothing may be silently ignored), and the pretraining summary line must read right. All in-process, fast."""
import json
import logging
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from launch import export as export_cli
from launch import pretrain as pretrain_cli
from lfzh_ds.configuration import LongformerZhConfig
from lfzh_ds.convert import convert_bert_to_longformer
from lfzh_ds.modeling import LongformerZhForMaskedLM
from lfzh_ds.training import pretraining
from lfzh_ds.training.ds_config import ConfigError

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)

pytestmark = pytest.mark.usefixtures("frugal_torch")


def test_convert_of_a_missing_directory_says_so_instead_of_asking_the_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"models/nope does not exist"):
        convert_bert_to_longformer(tmp_path / "models" / "nope", tmp_path / "long")


def test_convert_refuses_a_model_that_is_already_long(tmp_path):
    config = LongformerZhConfig(max_position_embeddings=64, attention_window=16, **SMALL)
    LongformerZhForMaskedLM(config).save_pretrained(tmp_path / "long")
    with pytest.raises(ValueError, match=r"long is already a long model .*model_type='longformer_zh'"):
        convert_bert_to_longformer(tmp_path / "long", tmp_path / "longer")
    assert not (tmp_path / "longer").exists()


def test_export_of_a_checkpoint_folder_that_does_not_exist_names_it(tmp_path):
    missing = tmp_path / "run" / "checkpoints" / "step_3000"
    with pytest.raises(FileNotFoundError, match=r"step_3000 does not exist"):
        export_cli.main(["--from", str(missing), "--to", str(tmp_path / "out")])


def read_config(path):
    return pretraining.read_model_config(Namespace(init_from=None, model_config=str(path), attention_backend=None))


def test_a_misspelt_model_config_key_is_refused_not_ignored(tmp_path):
    fields = {**SMALL, "max_position_embeddings": 512, "attention_window": 128}
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({**fields, "num_hidden_layer": 4}))
    with pytest.raises(ConfigError, match=r'typo\.json: unknown key "num_hidden_layer" \(did you mean "num_hidden_layers"'):
        read_config(typo)
    # keys of Google's / HFL's Chinese BERT config.json that mean nothing here still load, as in transformers
    bert_like = tmp_path / "bert.json"
    bert_like.write_text(json.dumps({**fields, "directionality": "bidi", "pooler_fc_size": 768, "pooler_type": "first_token_transform",
                                     "pooler_num_attention_heads": 12, "output_past": True, "model_type": "bert",
                                     "sep_token_id": 102, "cls_token_id": 101, "mask_token_id": 103, "torch_dtype": "float32"}))
    assert read_config(bert_like).num_hidden_layers == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"hidden_size": 32\n "num_hidden_layers": 2}')
    with pytest.raises(ConfigError, match=r"bad\.json is not valid JSON: .* at line 2 column 2"):
        read_config(bad)


def test_block_mode_keys_without_a_window_mode_mean_block_mode_by_hand_and_saved_alike(tmp_path, caplog):
    """One rule for a block_sparse config that sets num_sliding_window_blocks / global_block_indices and names no
    sparse_window_mode: block mode, with a warning, whether it is a hand-written --model-config or a saved
    config.json (as every block-sparse config.json saved before window modes existed is)."""
    fields = {**SMALL, "max_position_embeddings": 64, "attention_window": 16, "attention_backend": "block_sparse",
              "sparse_block_size": 8, "num_sliding_window_blocks": 3, "global_block_indices": [0]}
    hand = tmp_path / "model.json"
    hand.write_text(json.dumps(fields))
    notice = 'num_sliding_window_blocks, global_block_indices without sparse_window_mode: read as sparse_window_mode "block"'
    with caplog.at_level(logging.WARNING, logger="lfzh_ds.configuration"):
        by_hand = read_config(hand)
    assert (by_hand.sparse_window_mode, by_hand.layer_block_size(0), by_hand.layer_sliding_window_blocks(0)) == ("block", 8, 3)
    assert notice in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lfzh_ds.configuration"):
        assert LongformerZhConfig.from_json_file(hand).sparse_window_mode == "block"
    assert f"{hand}: {notice}" in caplog.text

    saved_dir = tmp_path / "saved"
    LongformerZhForMaskedLM(by_hand).save_pretrained(saved_dir)
    saved = json.loads((saved_dir / "config.json").read_text())
    del saved["sparse_window_mode"]
    (saved_dir / "config.json").write_text(json.dumps(saved))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lfzh_ds.configuration"):
        loaded = LongformerZhConfig.from_pretrained(saved_dir)
    assert f"{saved_dir / 'config.json'}: {notice}" in caplog.text
    same = ("attention_backend", "sparse_window_mode", "sparse_block_size", "num_sliding_window_blocks",
            "global_block_indices", "attention_window", "max_position_embeddings")
    assert {k: getattr(loaded, k) for k in same} == {k: getattr(by_hand, k) for k in same}

    # a config that says token mode keeps it, and a block-mode key beside it is still refused; no key: token mode
    hand.write_text(json.dumps({**fields, "sparse_window_mode": "token"}))
    with pytest.raises(ConfigError, match="num_sliding_window_blocks=3 is a block-mode setting"):
        read_config(hand)
    plain = {k: v for k, v in fields.items() if k not in ("num_sliding_window_blocks", "global_block_indices")}
    hand.write_text(json.dumps(plain))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lfzh_ds.configuration"):
        assert read_config(hand).sparse_window_mode == "token"
    assert "sparse_window_mode" not in caplog.text


def summary(first, last):
    return pretraining.RunSummary(run_dir="runs/x", final_step=6, first_val_bpc=first, last_val_bpc=last,
                                  last_checkpoint="step_6", curves=None)


def test_the_done_line_rounds_the_bpc_and_omits_it_without_validation(monkeypatch, capsys):
    args = ["--deepspeed_config", "c.json", "--data", "d", "--output-dir", "runs/x", "--model-config", "m.json",
            "--max-steps", "6"]
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(pretraining, "run", lambda a: summary(14.383887003398522, 9.6412))
    assert pretrain_cli.main(args) == 0
    assert "last checkpoint step_6; validation BPC 14.384 -> 9.641\n" in capsys.readouterr().out
    monkeypatch.setattr(pretraining, "run", lambda a: summary(None, None))  # --eval-interval 0
    assert pretrain_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "None" not in out and out.rstrip().endswith("last checkpoint step_6")


def test_a_resumed_run_reports_the_change_since_its_first_validation(tmp_path):
    assert pretraining.recorded_validation_bpc(tmp_path / "metrics.jsonl") == (None, None)
    lines = [{"kind": "val", "step": 0, "val_bpc": 14.4}, {"kind": "train", "step": 1, "loss": 9.0},
             {"kind": "val", "step": 2, "val_bpc": 12.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert pretraining.recorded_validation_bpc(tmp_path / "metrics.jsonl") == (14.4, 12.0)


@pytest.mark.parametrize("script, args", [
    ("convert.py", ["--from", "{missing}", "--to", "{tmp}/long"]),
    ("export.py", ["--from", "{missing}", "--to", "{tmp}/stock"]),
    ("finetune.py", ["--model", "{missing}", "--output-dir", "{tmp}/ft", "--task", "ccf-sentiment"]),
])
def test_command_line_mistakes_end_in_one_line_and_status_2(tmp_path, script, args):
    missing = tmp_path / "models" / "nope"
    argv = [a.format(missing=missing, tmp=tmp_path) for a in args]
    done = subprocess.run([sys.executable, str(REPO / "launch" / script), *argv], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{script}: error: " in done.stderr and str(missing) in done.stderr


def test_a_library_bug_is_not_reported_as_the_users_mistake(tmp_path, monkeypatch, capsys):
    """run_main reports a UserError alone as the user's mistake: a KeyError raised inside the library (a bug) goes on
    up with its traceback, through the same commands that answer a missing folder in one line and status 2."""
    from launch import evaluate as evaluate_cli
    from launch.cli import run_main
    from lfzh_ds import loading

    def bug(path):
        raise KeyError("x")

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    monkeypatch.setattr(loading, "config_of", bug)  # what load_model calls once the folder exists
    with pytest.raises(KeyError, match="x"):
        run_main(lambda: export_cli.main(["--from", str(model_dir), "--to", str(tmp_path / "out")]), "export.py")
    with pytest.raises(KeyError, match="x"):
        evaluate_cli.main(["fill-mask", "--model", str(model_dir), "--text", "北京是中国的[MASK]都"])
    capsys.readouterr()

    missing = tmp_path / "nope"
    assert run_main(lambda: export_cli.main(["--from", str(missing), "--to", str(tmp_path / "out")]), "export.py") == 2
    err = capsys.readouterr().err
    assert err.startswith("export.py: error: ") and str(missing) in err and err.count("\n") == 1, err
    assert evaluate_cli.main(["fill-mask", "--model", str(missing), "--text", "北京是中国的[MASK]都"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py: error: ") and str(missing) in err and err.count("\n") == 1, err


def test_a_library_bug_in_a_console_command_ends_in_its_traceback_and_status_1(tmp_path):
    """The same in a process of its own: lfzh-preprocess's entry point (launch.cli.preprocess), once with the
    library's config check replaced by one that raises KeyError (a bug), once with a missing input (a mistake)."""
    corpus = tmp_path / "news.jsonl"
    corpus.write_text(json.dumps({"content": "北京是中国的首都。" * 20}, ensure_ascii=False) + "\n")
    fault = "from data_service.config import PipelineConfig\ndef bug(self):\n    raise KeyError('x')\nPipelineConfig.validate = bug\n"
    entry = "import sys\nfrom launch import cli\nsys.exit(cli.preprocess())\n"

    def preprocess(inputs, injected=""):
        return subprocess.run([sys.executable, "-c", injected + entry, "--input", str(inputs), "--output",
                               str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=tmp_path)

    bug = preprocess(corpus, fault)
    assert bug.returncode == 1, bug.stderr
    assert "Traceback (most recent call last)" in bug.stderr and bug.stderr.rstrip().endswith("KeyError: 'x'")
    assert "error: " not in bug.stderr
    mistake = preprocess(tmp_path / "missing.jsonl")
    assert mistake.returncode == 2, mistake.stderr
    assert mistake.stderr.splitlines() == [f"lfzh-preprocess: error: --input {tmp_path / 'missing.jsonl'}: no such file or folder"]
