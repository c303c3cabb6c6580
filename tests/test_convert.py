"""Conversion and interoperability: short BERT -> long model, loading the released and the transformers
Longformer layouts, export to stock transformers.LongformerForMaskedLM (loaded without this package)."""
import json
import socket
import subprocess
import sys
import textwrap
from argparse import Namespace

import pytest
import torch
from model_helpers import max_diff
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
    LongformerConfig,
    LongformerForMaskedLM,
    LongformerForSequenceClassification,
)

from launch import convert as convert_cli
from launch import export as export_cli
from lfzh_ds.configuration import LongformerZhConfig
from lfzh_ds.constants import VOCAB_SIZE
from lfzh_ds.convert import convert_bert_to_longformer, export_to_hf_longformer
from lfzh_ds.modeling import LongformerZhForMaskedLM, LongformerZhForSequenceClassification, LongformerZhModel
from lfzh_ds.tokenization import load_tokenizer

TOL = 1e-5
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


pytestmark = pytest.mark.usefixtures("frugal_torch")


def padded_batch(seq_len, pad_from, vocab=VOCAB_SIZE, pad_id=0):
    input_ids = torch.randint(104, vocab, (2, seq_len))
    input_ids[:, 0] = 101
    attention_mask = torch.ones(2, seq_len, dtype=torch.long)
    attention_mask[1, pad_from:] = 0
    input_ids[1, pad_from:] = pad_id
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------- short -> long
def test_converted_model_with_a_window_covering_the_input_gives_the_short_models_logits(tmp_path, capsys):
    short = BertForMaskedLM(BertConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=40, **SMALL)).eval()
    short.save_pretrained(tmp_path / "short")

    convert_cli.main(["--from", str(tmp_path / "short"), "--to", str(tmp_path / "long"), "--max-pos", "160", "--attention-window", "48"])
    printed = capsys.readouterr().out
    assert "positions 40 -> 160" in printed and "MLM head: kept" in printed

    long = AutoModelForMaskedLM.from_pretrained(tmp_path / "long")
    assert type(long) is LongformerZhForMaskedLM
    assert long.config.max_position_embeddings == 160 and long.config.attention_window == 48
    # the block kernel, computing Longformer's token window exactly
    assert (long.config.attention_backend, long.config.sparse_window_mode) == ("block_sparse", "token")
    # position rows tiled; global projections start as copies of the local ones
    table = long.bert.embeddings.position_embeddings.weight
    assert torch.equal(table[:40], short.bert.embeddings.position_embeddings.weight)
    assert torch.equal(table[40:80], table[:40]) and torch.equal(table[120:160], table[:40])
    attn = long.bert.encoder.layer[1].attention.self
    assert torch.equal(attn.key_global.weight, attn.key.weight) and torch.equal(attn.value_global.bias, attn.value.bias)
    assert attn.query_global.weight.data_ptr() != attn.query.weight.data_ptr()  # copies, not shared
    # tokenizer files beside the weights
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "long")
    assert len(tokenizer) == VOCAB_SIZE and tokenizer("长文档")["input_ids"] == load_tokenizer()("长文档")["input_ids"]

    # one-sided window 24 >= 20 - 1: every token sees the whole input, as in the short model
    input_ids, attention_mask = padded_batch(seq_len=20, pad_from=13)
    expected = short(input_ids, attention_mask=attention_mask).logits
    got = long(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert max_diff(expected[real], got[real]) <= TOL


def test_converting_bertmodel_weights_initialises_the_head_and_keeps_the_encoder(tmp_path):
    short = BertModel(BertConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=40, **SMALL), add_pooling_layer=True).eval()
    short.save_pretrained(tmp_path / "short")
    result = convert_bert_to_longformer(tmp_path / "short", tmp_path / "long", max_pos=64, attention_window=32)
    assert not result.head_kept and any("freshly initialised" in w for w in result.warnings)
    assert result.pooler_kept and not any("pooler" in k for k in result.dropped_keys)

    encoder = LongformerZhModel.from_pretrained(tmp_path / "long")
    input_ids, attention_mask = padded_batch(seq_len=15, pad_from=9)
    expected = short(input_ids, attention_mask=attention_mask).last_hidden_state
    got = encoder(input_ids, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    assert max_diff(expected[real], got[real]) <= TOL


def test_the_classifier_of_a_converted_checkpoint_starts_from_berts_pooler(tmp_path, capsys):
    """BertForPreTraining weights (pooler + NSP head, as chinese-roberta-wwm-ext ships them): the MLM model ignores
    the pooler, the classifier loads it and equals transformers' BertForSequenceClassification on the short weights."""
    short = BertForPreTraining(BertConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=40, **SMALL)).eval()
    short.save_pretrained(tmp_path / "short")
    convert_cli.main(["--from", str(tmp_path / "short"), "--to", str(tmp_path / "long"), "--max-pos", "64", "--attention-window", "32"])
    printed = capsys.readouterr().out
    assert "pooler (bert.pooler.*): kept" in printed and "dropped (unused by the MLM model): cls.seq_relationship.bias" in printed

    mlm, info = LongformerZhForMaskedLM.from_pretrained(tmp_path / "long", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours, info = LongformerZhForSequenceClassification.from_pretrained(tmp_path / "long", num_labels=3, output_loading_info=True)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}  # only the new head; the pooler loaded
    ours.eval()
    oracle = BertForSequenceClassification(BertConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=40, num_labels=3, **SMALL)).eval()
    oracle.bert.load_state_dict(short.bert.state_dict())
    oracle.classifier.load_state_dict(ours.classifier.state_dict())
    # one-sided window 16 >= 15 - 1: [CLS] global or not, every token sees the whole input, as in BERT
    input_ids, attention_mask = padded_batch(seq_len=15, pad_from=9)
    expected = oracle(input_ids, attention_mask=attention_mask).logits
    assert max_diff(ours(input_ids, attention_mask=attention_mask).logits, expected) <= TOL


def test_converting_a_model_with_another_vocab_is_refused(tmp_path):
    BertForMaskedLM(BertConfig(vocab_size=500, max_position_embeddings=16, **SMALL)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocab_size=500"):
        convert_bert_to_longformer(tmp_path, None)


# ---------------------------------------------------------------------------------------------- released layout
@pytest.mark.parametrize("weights_file", ["pytorch_model.bin", "model.safetensors"])
def test_released_longformer_zh_layout_loads_with_no_missing_or_unexpected_keys(tmp_path, weights_file):
    """The ValkyriaLenneth/longformer_zh layout: BertLongForMaskedLM, model_type bert, 0-based positions."""
    source = LongformerZhForMaskedLM(
        LongformerZhConfig(max_position_embeddings=4096, attention_window=[512, 512], **SMALL)
    ).eval()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["bert.embeddings.position_ids"] = torch.arange(4096).expand(1, -1).clone()  # transformers 3.x saved it
    assert "bert.encoder.layer.0.attention.self.query_global.weight" in state and "cls.predictions.bias" in state
    assert not any(k.startswith(("longformer.", "lm_head.")) for k in state)
    if weights_file == "pytorch_model.bin":
        torch.save(state, tmp_path / weights_file)
    else:
        save_file(state, str(tmp_path / weights_file))
    released_config = {
        "architectures": ["BertLongForMaskedLM"], "model_type": "bert", "attention_window": [512, 512],
        "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "max_position_embeddings": 4096, "pad_token_id": 0,
        "type_vocab_size": 2, "vocab_size": 21128, **SMALL,
    }
    (tmp_path / "config.json").write_text(json.dumps(released_config))

    model, info = LongformerZhForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    # no backend in its config: the block kernel in token mode, the attention it was trained with
    assert model.config.attention_window == [512, 512]
    assert (model.config.attention_backend, model.config.sparse_window_mode) == ("block_sparse", "token")

    input_ids, attention_mask = padded_batch(seq_len=24, pad_from=17)
    attention_mask[0, 0] = 2  # released convention: [CLS] global
    expected = source(input_ids, attention_mask=attention_mask).logits
    assert max_diff(model(input_ids, attention_mask=attention_mask).logits, expected) <= TOL


# ---------------------------------------------------------------------------------------------- transformers' layout
def small_hf_longformer(pad_token_id):
    config = LongformerConfig(
        vocab_size=300, max_position_embeddings=66, attention_window=8, pad_token_id=pad_token_id,
        type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **SMALL,
    )
    return LongformerForMaskedLM(config).eval()


@pytest.mark.parametrize("pad_token_id", [1, 0])  # allenai's roberta vocab pads with 1, ours with 0
def test_transformers_longformer_checkpoint_loads_with_shifted_positions(tmp_path, pad_token_id):
    hf = small_hf_longformer(pad_token_id)
    hf.save_pretrained(tmp_path)
    ours, info = LongformerZhForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert ours.config.max_position_embeddings == 64 and not ours.training
    assert (ours.config.attention_backend, ours.config.sparse_window_mode) == ("block_sparse", "token")

    input_ids, attention_mask = padded_batch(seq_len=19, pad_from=12, vocab=300, pad_id=pad_token_id)
    global_attention_mask = torch.zeros_like(input_ids)
    global_attention_mask[:, [0, 5]] = 1
    expected = hf(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask).logits
    got = ours(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask).logits
    real = attention_mask.bool()
    assert max_diff(expected[real], got[real]) <= TOL

    encoder = LongformerZhModel.from_pretrained(tmp_path)
    hidden = encoder(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask).last_hidden_state
    hf_hidden = hf.longformer(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask).last_hidden_state
    assert max_diff(hidden[real], hf_hidden[real]) <= TOL


# ---------------------------------------------------------------------------------------------- export
def test_export_gives_a_stock_longformer_with_the_same_logits_loaded_without_this_package(tmp_path, capsys):
    model = LongformerZhForMaskedLM(LongformerZhConfig(max_position_embeddings=128, attention_window=16, **SMALL)).eval()
    model.save_pretrained(tmp_path / "ours")
    export_cli.main(["--from", str(tmp_path / "ours"), "--to", str(tmp_path / "stock")])
    assert "exported" in capsys.readouterr().out
    exported_config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert exported_config["model_type"] == "longformer" and "auto_map" not in exported_config
    assert exported_config["max_position_embeddings"] == 130

    # in-process: a padded batch with global tokens
    hf = LongformerForMaskedLM.from_pretrained(tmp_path / "stock").eval()
    input_ids, attention_mask = padded_batch(seq_len=37, pad_from=30)
    global_attention_mask = torch.zeros_like(input_ids)
    global_attention_mask[:, [0, 9, 20]] = 1
    expected = model(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask).logits
    got = hf(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask).logits
    real = attention_mask.bool()
    assert max_diff(expected[real], got[real]) <= TOL

    # a fresh interpreter that never imports lfzh_ds, with the exported tokenizer
    text = "中文长文档模型把位置表移了一位。"
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoTokenizer, LongformerForMaskedLM
        tok = AutoTokenizer.from_pretrained({str(tmp_path / "stock")!r})
        model = LongformerForMaskedLM.from_pretrained({str(tmp_path / "stock")!r}).eval()
        ids = tok({text!r}, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits
        torch.save({{"ids": ids, "logits": logits}}, {str(tmp_path / "stock_logits.pt")!r})
        assert not any(name.split(".")[0] == "lfzh_ds" for name in sys.modules), "lfzh_ds was imported"
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=120)
    stock = torch.load(tmp_path / "stock_logits.pt")
    ids = load_tokenizer()(text, return_tensors="pt")["input_ids"]
    assert torch.equal(stock["ids"], ids)
    assert max_diff(model(ids).logits, stock["logits"]) <= TOL


def test_export_of_a_finetuned_classifier_gives_transformers_longformer_for_sequence_classification(tmp_path, capsys):
    config = LongformerZhConfig(max_position_embeddings=128, attention_window=16, num_labels=3, **SMALL)
    config.id2label = {0: "positive", 1: "neutral", 2: "negative"}
    config.label2id = {name: i for i, name in config.id2label.items()}
    model = LongformerZhForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "best")  # what fine-tuning saves
    export_cli.main(["--from", str(tmp_path / "best"), "--to", str(tmp_path / "stock")])
    assert "transformers.LongformerForSequenceClassification" in capsys.readouterr().out
    exported_config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert exported_config["architectures"] == ["LongformerForSequenceClassification"]
    assert exported_config["id2label"] == {"0": "positive", "1": "neutral", "2": "negative"}

    hf, info = LongformerForSequenceClassification.from_pretrained(tmp_path / "stock", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.eval()
    input_ids, attention_mask = padded_batch(seq_len=37, pad_from=30)
    global_attention_mask = torch.zeros_like(input_ids)
    global_attention_mask[:, [0, 9]] = 1
    for extra in ({}, {"global_attention_mask": global_attention_mask}):  # [CLS] global by default in both
        expected = model(input_ids, attention_mask=attention_mask, **extra).logits
        assert max_diff(hf(input_ids, attention_mask=attention_mask, **extra).logits, expected) <= TOL
    # and back: the stock classifier loads into ours with its head
    back = LongformerZhForSequenceClassification.from_pretrained(tmp_path / "stock")
    assert back.config.id2label[2] == "negative"
    assert max_diff(back(input_ids, attention_mask=attention_mask).logits, model(input_ids, attention_mask=attention_mask).logits) <= TOL


@pytest.mark.parametrize("num_labels, labels", [
    (1, torch.tensor([0.5, -1.25])),                                   # regression: mean squared error
    (3, torch.tensor([2, 0])),                                         # one class per document: cross-entropy
    (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),             # several classes: binary cross-entropy
], ids=["regression", "single_label", "multi_label"])
def test_classifier_loss_equals_transformers_longformer_for_every_problem_type(tmp_path, num_labels, labels):
    """The problem type (from num_labels and the labels' dtype) and its loss are transformers' own: the exported
    stock LongformerForSequenceClassification is the oracle."""
    config = LongformerZhConfig(max_position_embeddings=128, attention_window=16, num_labels=num_labels, **SMALL)
    model = LongformerZhForSequenceClassification(config).eval()
    stock = LongformerForSequenceClassification.from_pretrained(
        export_to_hf_longformer(model, tmp_path / "stock", write_tokenizer=False)).eval()
    input_ids, attention_mask = padded_batch(seq_len=37, pad_from=30)
    ours = model(input_ids, attention_mask=attention_mask, labels=labels)
    theirs = stock(input_ids, attention_mask=attention_mask, labels=labels)
    assert max_diff(ours.logits, theirs.logits) <= TOL
    assert model.config.problem_type == stock.config.problem_type
    assert abs(ours.loss.item() - theirs.loss.item()) <= TOL


def test_an_old_format_bert_checkpoint_with_gamma_beta_and_position_ids_converts(tmp_path):
    """Older Chinese BERT .bin files (bert-base-chinese, converted TF checkpoints) name LayerNorm parameters gamma/beta
    and carry the embeddings.position_ids buffer: they convert, and give the short model's logits."""
    short = BertForMaskedLM(BertConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=40, **SMALL)).eval()
    with torch.no_grad():  # LayerNorm parameters away from their 1/0 initialisation, so a lost one would show
        for name, p in short.named_parameters():
            if "LayerNorm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    old = {}
    for key, value in short.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        old[key] = value.clone()
    old["bert.embeddings.position_ids"] = torch.arange(40).expand(1, -1).clone()
    assert any(k.endswith("LayerNorm.gamma") for k in old)
    (tmp_path / "short").mkdir()
    torch.save(old, tmp_path / "short" / "pytorch_model.bin")
    short.config.to_json_file(tmp_path / "short" / "config.json")

    result = convert_bert_to_longformer(tmp_path / "short", tmp_path / "long", max_pos=96, attention_window=48)
    assert result.head_kept and "bert.embeddings.position_ids" in result.dropped_keys
    # one-sided window 24 >= 20 - 1: every token sees the whole input, as in the short model
    long = LongformerZhForMaskedLM.from_pretrained(tmp_path / "long").eval()
    input_ids, attention_mask = padded_batch(seq_len=20, pad_from=13)
    real = attention_mask.bool()
    expected = short(input_ids, attention_mask=attention_mask).logits
    assert max_diff(long(input_ids, attention_mask=attention_mask).logits[real], expected[real]) <= TOL


def test_export_refuses_a_directory_lacking_the_weights_it_would_export(tmp_path):
    LongformerZhModel(LongformerZhConfig(max_position_embeddings=64, attention_window=16, **SMALL)).save_pretrained(tmp_path / "encoder")
    with pytest.raises(ValueError, match=r"encoder: its config.json says architectures=\['LongformerZhModel'\].*cls\.predictions"):
        export_cli.main(["--from", str(tmp_path / "encoder"), "--to", str(tmp_path / "stock")])
    assert not (tmp_path / "stock").exists()
    # a block-sparse model whose per-layer windows do not nest: stock Longformer could never run it
    config = LongformerZhConfig(max_position_embeddings=64, attention_window=[16, 24], attention_backend="block_sparse", sparse_block_size=8, **SMALL)
    with pytest.raises(ValueError, match="does not divide the largest window 24"):
        export_to_hf_longformer(LongformerZhForMaskedLM(config), tmp_path / "stock")


def test_export_keeps_the_models_dtype_and_refuses_an_lm_head_stock_longformer_cannot_compute(tmp_path):
    config = LongformerZhConfig(max_position_embeddings=64, attention_window=16, **SMALL)
    out = export_to_hf_longformer(LongformerZhForMaskedLM(config).to(torch.bfloat16), tmp_path / "bf16",
                                  write_tokenizer=False)
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    # transformers' Longformer LM head always applies gelu: a relu model's MLM head would not export exactly ...
    relu = LongformerZhConfig(max_position_embeddings=64, attention_window=16, hidden_act="relu", **SMALL)
    with pytest.raises(ValueError, match="hidden_act='relu'.*only hidden_act='gelu' exports exactly"):
        export_to_hf_longformer(LongformerZhForMaskedLM(relu), tmp_path / "relu_mlm", write_tokenizer=False)
    assert not (tmp_path / "relu_mlm").exists()
    # ... while its classifier (no LM head) does, with the same logits
    relu.num_labels = 2
    model = LongformerZhForSequenceClassification(relu).eval()
    stock = LongformerForSequenceClassification.from_pretrained(
        export_to_hf_longformer(model, tmp_path / "relu_cls", write_tokenizer=False)).eval()
    input_ids, attention_mask = padded_batch(seq_len=21, pad_from=15)
    assert max_diff(stock(input_ids, attention_mask=attention_mask).logits,
                    model(input_ids, attention_mask=attention_mask).logits) <= TOL


def test_an_explicit_problem_type_survives_the_export(tmp_path):
    """Two float targets per document are multi-label by default; a model fine-tuned as a two-output regression says
    so in its config, and the exported stock classifier must compute the same (mean squared error) loss."""
    config = LongformerZhConfig(max_position_embeddings=64, attention_window=16, num_labels=2,
                                problem_type="regression", **SMALL)
    model = LongformerZhForSequenceClassification(config).eval()
    stock = LongformerForSequenceClassification.from_pretrained(
        export_to_hf_longformer(model, tmp_path / "stock", write_tokenizer=False)).eval()
    assert stock.config.problem_type == "regression"
    input_ids, attention_mask = padded_batch(seq_len=21, pad_from=15)
    labels = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    ours = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert abs(ours.loss.item() - torch.nn.functional.mse_loss(ours.logits, labels).item()) <= TOL
    assert abs(stock(input_ids, attention_mask=attention_mask, labels=labels).loss.item() - ours.loss.item()) <= TOL


# ---------------------------------------------------------------------------------------------- window modes
@pytest.mark.parametrize("seq_len, window", [(300, 64), (510, 64), (510, [4, 16])])
def test_a_token_mode_model_exports_exactly_well_beyond_one_block(tmp_path, seq_len, window, caplog):
    """A block-sparse model in token mode (what pretraining trains) is the stock Longformer it exports to, with one
    window for every layer or one per layer (the quick start's: two neighbours each side, then eight)."""
    config = LongformerZhConfig(max_position_embeddings=512, attention_window=window, attention_backend="block_sparse",
                                sparse_block_size=16, **SMALL)
    assert config.sparse_window_mode == "token"
    model = LongformerZhForMaskedLM(config).eval()
    with caplog.at_level("WARNING", logger="lfzh_ds.convert"):
        stock = LongformerForMaskedLM.from_pretrained(export_to_hf_longformer(model, tmp_path / "stock", write_tokenizer=False)).eval()
    assert "differ" not in caplog.text
    input_ids, attention_mask = padded_batch(seq_len=seq_len, pad_from=seq_len - 40)
    global_attention_mask = torch.zeros_like(input_ids)
    global_attention_mask[:, [0, 100, 250]] = 1
    kwargs = dict(attention_mask=attention_mask, global_attention_mask=global_attention_mask)
    real = attention_mask.bool()
    assert max_diff(model(input_ids, **kwargs).logits[real], stock(input_ids, **kwargs).logits[real]) <= TOL


def test_a_window_stock_longformer_cannot_compute_is_refused_at_export(tmp_path):
    config = LongformerZhConfig(max_position_embeddings=512, attention_window=[2, 16], attention_backend="block_sparse",
                                sparse_block_size=16, **SMALL)
    with pytest.raises(ValueError, match="cannot compute a window under 4"):
        export_to_hf_longformer(LongformerZhForMaskedLM(config), tmp_path / "stock", write_tokenizer=False)
    assert not (tmp_path / "stock").exists()


def test_a_block_mode_model_still_warns_on_export_and_differs(tmp_path, caplog):
    config = LongformerZhConfig(max_position_embeddings=512, attention_window=64, attention_backend="block_sparse",
                                sparse_window_mode="block", sparse_block_size=16, **SMALL)
    model = LongformerZhForMaskedLM(config).eval()
    with caplog.at_level("WARNING", logger="lfzh_ds.convert"):
        stock = LongformerForMaskedLM.from_pretrained(export_to_hf_longformer(model, tmp_path / "stock", write_tokenizer=False)).eval()
    assert "block mode: stock Longformer uses a token-level sliding window" in caplog.text
    input_ids, attention_mask = padded_batch(seq_len=300, pad_from=260)
    real = attention_mask.bool()
    assert max_diff(model(input_ids, attention_mask=attention_mask).logits[real],
                    stock(input_ids, attention_mask=attention_mask).logits[real]) > 1e-3


def test_a_block_sparse_config_saved_before_window_modes_keeps_its_block_layout(tmp_path):
    model = LongformerZhForMaskedLM(LongformerZhConfig(max_position_embeddings=64, attention_window=16,
                                                       attention_backend="block_sparse", sparse_window_mode="block",
                                                       sparse_block_size=8, **SMALL))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["sparse_window_mode"] == "block"
    del saved["sparse_window_mode"]  # as written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert LongformerZhConfig.from_pretrained(tmp_path).sparse_window_mode == "block"
    # a sliding-chunks config switched to the block kernel gets the exact token mode
    model.config.attention_backend = "sliding_chunks"
    model.config.sparse_window_mode = "token"
    model.save_pretrained(tmp_path / "sliding")
    switched = LongformerZhConfig.from_pretrained(tmp_path / "sliding", attention_backend="block_sparse")
    assert switched.sparse_window_mode == "token" and switched.global_block_indices == [0]  # (unused in token mode)


def _init_from(model_dir, attention_backend=None):
    from lfzh_ds.training.pretraining import build_model  # here: the training stack pulls in DeepSpeed (seconds)

    model = build_model(Namespace(init_from=str(model_dir), attention_backend=attention_backend), None)
    attention = model.bert.encoder.layer[0].attention.self
    return model.config.attention_backend, model.config.sparse_window_mode, type(attention).__name__, \
        getattr(attention, "token_window", None)


def test_init_from_runs_the_block_kernel_in_token_mode_unless_told_otherwise(tmp_path):
    """--init-from: converted, released-layout, transformers-layout and sliding-chunks models run the block kernel
    with their exact token window; a block-mode model keeps its layout; --attention-backend overrides."""
    short = BertForMaskedLM(BertConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=40, **SMALL))
    short.save_pretrained(tmp_path / "short")
    convert_bert_to_longformer(tmp_path / "short", tmp_path / "converted", max_pos=64, attention_window=32)
    token = ("block_sparse", "token", "BlockSparseSelfAttention", 16)
    assert _init_from(tmp_path / "converted") == token
    assert _init_from(tmp_path / "converted", "sliding_chunks")[2] == "SlidingChunksSelfAttention"

    sliding = LongformerZhForMaskedLM(LongformerZhConfig(max_position_embeddings=64, attention_window=32, **SMALL))
    sliding.save_pretrained(tmp_path / "sliding")
    assert _init_from(tmp_path / "sliding") == token
    released = json.loads((tmp_path / "sliding" / "config.json").read_text())
    for key in ("attention_backend", "sparse_window_mode", "sparse_block_size", "num_sliding_window_blocks",
                "global_block_indices", "global_block_end_indices"):
        del released[key]
    (tmp_path / "sliding" / "config.json").write_text(json.dumps({**released, "model_type": "bert"}))
    assert _init_from(tmp_path / "sliding") == token  # the released layout

    small_hf_longformer(pad_token_id=0).save_pretrained(tmp_path / "hf")
    assert _init_from(tmp_path / "hf") == ("block_sparse", "token", "BlockSparseSelfAttention", 4)

    block = LongformerZhForMaskedLM(LongformerZhConfig(max_position_embeddings=64, attention_window=32, sparse_block_size=8,
                                                       attention_backend="block_sparse", sparse_window_mode="block", **SMALL))
    block.save_pretrained(tmp_path / "block")
    assert _init_from(tmp_path / "block") == ("block_sparse", "block", "BlockSparseSelfAttention", None)


@pytest.mark.slow  # torch.distributed stays up in this process, as in test_pretrain's in-process runs
def test_init_from_a_converted_model_trains_with_sliding_chunks_losses_on_the_block_kernel(tmp_path, shard_folder,
                                                                                           monkeypatch, frugal_torch,
                                                                                           capsys):
    """launch/pretrain.py --init-from a converted model: the block kernel in token mode (asked for by nothing),
    with the losses of the same run on transformers' sliding chunks, step by step (fp32, hidden dropout on)."""
    # here: the training stack pulls in DeepSpeed (seconds), which the other tests of this file do not need
    from launch.pretrain import main
    from lfzh_ds.loading import load_model
    from lfzh_ds.training.metrics import read_metrics

    short = BertForMaskedLM(BertConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=64, hidden_dropout_prob=0.1,
                                       attention_probs_dropout_prob=0.0, **SMALL))
    short.save_pretrained(tmp_path / "short")
    # window 16: token mode takes blocks of 9 (one each side); sequences of 144 tokens, a multiple of 9 and of 16,
    # are padded by neither backend, so hidden dropout draws the same masks in both runs
    convert_bert_to_longformer(tmp_path / "short", tmp_path / "converted", max_pos=144, attention_window=16)
    data = shard_folder({"train": [[900, 700, 600]], "validation": [[100]]}, seq_len=144)
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}, "zero_optimization": {"stage": 2},
    }))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LFZH_FAULT", raising=False)

    def losses(run_dir, *extra):
        assert main(["--deepspeed_config", str(ds_config), "--data", str(data), "--output-dir", str(run_dir),
                     "--init-from", str(tmp_path / "converted"), "--max-steps", "4", "--save-interval", "4",
                     "--eval-interval", "0", "--log-interval", "1", *extra]) == 0
        return [record["loss"] for record in read_metrics(run_dir)[0]]

    token = losses(tmp_path / "token")
    assert "attention block_sparse" in capsys.readouterr().out
    trained = load_model(tmp_path / "token").config
    assert (trained.attention_backend, trained.sparse_window_mode) == ("block_sparse", "token")
    sliding = losses(tmp_path / "sliding", "--attention-backend", "sliding_chunks")
    assert "attention sliding_chunks" in capsys.readouterr().out
    assert len(token) == len(sliding) == 4 and len(set(token)) == 4  # the model trains
    assert max(abs(a - b) for a, b in zip(token, sliding)) <= 1e-5


# ---------------------------------------------------------------------------------------------- ours, longer
def per_layer_model(model_class=LongformerZhForMaskedLM, **extra):
    torch.manual_seed(0)
    config = LongformerZhConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=64, attention_window=[4, 16],
                                sparse_block_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                **SMALL, **extra)
    return model_class(config).eval()


@pytest.mark.parametrize("model_class", [LongformerZhForMaskedLM, LongformerZhForSequenceClassification])
def test_lengthening_our_model_gives_its_logits_within_the_old_length(tmp_path, capsys, model_class):
    short = per_layer_model(model_class, num_labels=3)
    short.save_pretrained(tmp_path / "short")

    assert convert_cli.main(["--from", str(tmp_path / "short"), "--to", str(tmp_path / "long"), "--max-pos", "256"]) is None
    printed = capsys.readouterr().out
    assert "positions 64 -> 256" in printed and "window [4, 16] (kept)" in printed

    long = AutoModelForMaskedLM.from_pretrained(tmp_path / "long") if model_class is LongformerZhForMaskedLM else \
        LongformerZhForSequenceClassification.from_pretrained(tmp_path / "long")
    assert type(long) is model_class and long.config.max_position_embeddings == 256
    assert long.config.attention_window == [4, 16]
    table = long.bert.embeddings.position_embeddings.weight
    assert torch.equal(table[:64], short.bert.embeddings.position_embeddings.weight)
    assert torch.equal(table[192:256], table[:64])
    assert json.loads((tmp_path / "long" / "tokenizer_config.json").read_text())["model_max_length"] == 256
    # the oracle: the original model on inputs within its length (one padded, one with a global token)
    input_ids, attention_mask = padded_batch(seq_len=64, pad_from=37)
    global_mask = torch.zeros_like(attention_mask)
    global_mask[0, 0] = 1
    expected = short(input_ids, attention_mask=attention_mask, global_attention_mask=global_mask).logits
    got = long(input_ids, attention_mask=attention_mask, global_attention_mask=global_mask).logits
    assert max_diff(expected, got) <= TOL if model_class is LongformerZhForSequenceClassification else \
        max_diff(expected[attention_mask.bool()], got[attention_mask.bool()]) <= TOL
    # and it reads the new length
    assert long(torch.randint(104, VOCAB_SIZE, (1, 256))).logits.shape[0] == 1


def test_lengthening_can_set_new_windows_and_pads_past_the_last_position(tmp_path):
    """The block kernel in token mode pads a 100-position model's inputs to its blocks' multiple (9 for windows
    4 and 16): the padding needs no position row, so any length is allowed."""
    per_layer_model(attention_backend="block_sparse").save_pretrained(tmp_path / "short")
    convert_cli.main(["--from", str(tmp_path / "short"), "--to", str(tmp_path / "long"), "--max-pos", "100"])
    long = LongformerZhForMaskedLM.from_pretrained(tmp_path / "long")
    assert long.config.padding_multiple() == 9 and long(torch.randint(104, VOCAB_SIZE, (1, 100))).logits.shape[1] == 100
    convert_cli.main(["--from", str(tmp_path / "short"), "--to", str(tmp_path / "wider"), "--max-pos", "128",
                      "--attention-window", "16,32"])
    assert LongformerZhForMaskedLM.from_pretrained(tmp_path / "wider").config.attention_window == [16, 32]


@pytest.mark.parametrize("extra, message", [
    (["--max-pos", "64"], "already has 64 positions; lengthening needs more"),
    (["--max-pos", "40"], "already has 64 positions"),
    (["--max-pos", "200"], "with --max-pos 200: max_position_embeddings=200 is not a multiple of sparse_block_size=16"),
    (["--max-pos", "256", "--attention-window", "24,32"], "with --max-pos 256 and --attention-window [24, 32]: "
                                                          "attention_window[0]=24 is not a multiple of sparse_block_size"),
])
def test_a_lengthening_the_model_cannot_take_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    """Block mode (DeepSpeed's layout) needs whole blocks of positions and windows."""
    from launch.cli import run_main

    block_mode = dict(attention_backend="block_sparse", sparse_window_mode="block")
    torch.manual_seed(0)
    LongformerZhForMaskedLM(LongformerZhConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=64,
                                               attention_window=[16, 32], sparse_block_size=16, **block_mode,
                                               **SMALL)).save_pretrained(tmp_path / "short")
    capsys.readouterr()
    argv = ["--from", str(tmp_path / "short"), "--to", str(tmp_path / "long"), *extra]
    assert run_main(lambda: convert_cli.main(argv), "convert.py") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "long").exists()
