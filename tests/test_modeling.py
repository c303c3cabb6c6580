"""LongformerZh (sliding_chunks backend) against transformers' Longformer as the oracle.

Small fp32 models (hidden 32, 2 layers, window 8) in eval mode; every equality is max |diff| <= 1e-5.
transformers' Longformer numbers positions from pad_token_id + 1, so the oracle gets explicit 0-based
position_ids here (the shifted-table export is tested in test_convert.py).
"""
import pytest
import torch
from model_helpers import loss_and_gradients, max_diff, padded_batch_with_globals
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    LongformerConfig,
    LongformerForMaskedLM,
)
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

from lfzh_ds.attention import SlidingChunksSelfAttention, build_self_attention
from lfzh_ds.configuration import LongformerZhConfig
from lfzh_ds.modeling import (
    LongformerZhForMaksedLM,
    LongformerZhForMaskedLM,
    LongformerZhForSequenceClassification,
    LongformerZhModel,
)
from lfzh_ds.training.engine import enable_activation_checkpointing

TOL = 1e-5
VOCAB = 300  # the heads' cost grows with the vocab; the geometry under test does not depend on it


pytestmark = pytest.mark.usefixtures("frugal_torch")


def small_config(**overrides):
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attention_window=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    fields.update(overrides)
    return LongformerZhConfig(**fields)


def batch(seq_len=29, pad_from=21):
    """Two sequences; the second is padded from ``pad_from``; several global tokens in each."""
    return padded_batch_with_globals(VOCAB, seq_len, pad_from, first_globals=[0, 6, seq_len - 4], second_globals=[0, 3])


def hf_twin_of(model: LongformerZhForMaskedLM) -> LongformerForMaskedLM:
    """transformers' LongformerForMaskedLM with the same weights (same position rows, 0-based ids)."""
    c = model.config
    hf_config = LongformerConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, attention_window=c.attention_window,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0, type_vocab_size=c.type_vocab_size,
        layer_norm_eps=c.layer_norm_eps,
    )
    hf = LongformerForMaskedLM(hf_config).eval()
    renamed = {hf_name(key): value for key, value in model.state_dict().items() if not key.endswith("_ids")}
    missing, unexpected = hf.load_state_dict(renamed, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


HEAD_NAMES = {  # BERT's MLM head -> RoBERTa/Longformer's
    "cls.predictions.transform.dense": "lm_head.dense",
    "cls.predictions.transform.LayerNorm": "lm_head.layer_norm",
    "cls.predictions.decoder": "lm_head.decoder",
    "cls.predictions.bias": "lm_head.bias",
}


def hf_name(our_name: str) -> str:
    for ours, theirs in HEAD_NAMES.items():
        if our_name.startswith(ours):
            return theirs + our_name[len(ours):]
    return our_name.replace("bert.", "longformer.", 1)


# ---------------------------------------------------------------------------------------------- attention module
def test_sliding_chunks_attention_equals_transformers_longformer_self_attention_with_padding_and_globals():
    config = small_config()
    ours = build_self_attention(config, layer_id=1)
    assert isinstance(ours, SlidingChunksSelfAttention)
    oracle_config = LongformerConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=2, attention_window=[8, 8], attention_probs_dropout_prob=0.0
    )
    oracle = LongformerSelfAttention(oracle_config, layer_id=1)
    oracle.load_state_dict(ours.state_dict())
    ours.eval(), oracle.eval()

    _, attention_mask, global_attention_mask = batch(seq_len=32)
    hidden = torch.randn(2, 32, 32, requires_grad=True)
    hidden_oracle = hidden.detach().clone().requires_grad_(True)
    is_index_masked = attention_mask == 0
    is_index_global_attn = (global_attention_mask == 1) & ~is_index_masked

    # transformers' additive mask convention: min for padding, 0 local, max for global
    additive = torch.zeros(2, 32)
    additive[is_index_masked] = torch.finfo(torch.float32).min
    additive[is_index_global_attn] = torch.finfo(torch.float32).max

    context, _ = ours(hidden, is_index_masked, is_index_global_attn)
    (context_oracle,) = oracle(
        hidden_oracle, attention_mask=additive, is_index_masked=additive < 0, is_index_global_attn=additive > 0,
        is_global_attn=True,
    )
    assert context.shape == (2, 32, 32)
    assert max_diff(context, context_oracle) <= TOL

    weights = torch.randn_like(context)
    (context * weights).sum().backward()
    (context_oracle * weights).sum().backward()
    assert max_diff(hidden.grad, hidden_oracle.grad) <= TOL
    for name, p in ours.named_parameters():
        assert max_diff(p.grad, dict(oracle.named_parameters())[name].grad) <= TOL, name
    # the global projections really took part (their gradient is not zero)
    assert ours.query_global.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- full model
@pytest.mark.parametrize("global_via", ["global_attention_mask", "attention_mask_equals_2"])
def test_masked_lm_equals_transformers_longformer_for_masked_lm_logits_loss_and_gradients(global_via):
    model = LongformerZhForMaskedLM(small_config()).eval()
    hf = hf_twin_of(model)
    input_ids, attention_mask, global_attention_mask = batch()
    labels = torch.full_like(input_ids, -100)
    labels[0, [2, 6, 25]] = input_ids[0, [2, 6, 25]]
    labels[1, [1, 9]] = input_ids[1, [1, 9]]
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)

    if global_via == "global_attention_mask":
        ours_out = model(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask)
    else:
        ours_out = model(input_ids, attention_mask=attention_mask * (global_attention_mask + 1))
    hf_out = hf(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask, position_ids=positions)
    assert ours_out.logits.shape == (2, 29, VOCAB)
    assert max_diff(ours_out.logits, hf_out.logits) <= TOL

    ours_loss = model(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask, labels=labels).loss
    hf_loss = hf(
        input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask, position_ids=positions, labels=labels
    ).loss
    assert abs(ours_loss.item() - hf_loss.item()) <= TOL
    ours_loss.backward()
    hf_loss.backward()
    hf_params = dict(hf.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        ours_grad, hf_grad = p.grad, hf_params[hf_name(name)].grad
        if name == "bert.embeddings.position_embeddings.weight":
            # transformers freezes row pad_token_id (= 0 here) as its padding row; BERT trains it
            assert hf_grad[0].abs().max() == 0 and ours_grad[0].abs().max() > 0
            ours_grad, hf_grad = ours_grad[1:], hf_grad[1:]
        assert max_diff(ours_grad, hf_grad) <= TOL, name
        checked += 1
    assert checked == len(hf_params)


def test_inputs_of_any_length_are_padded_inside_and_cut_back():
    model = LongformerZhForMaskedLM(small_config()).eval()
    input_ids, attention_mask, global_attention_mask = batch(seq_len=13, pad_from=10)
    out = model(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask, output_hidden_states=True)
    assert out.logits.shape == (2, 13, VOCAB)
    assert all(h.shape == (2, 13, 32) for h in out.hidden_states) and len(out.hidden_states) == 3

    # the same as padding by hand to the window multiple (16) with attention_mask 0
    pad = lambda t, v: torch.nn.functional.pad(t, (0, 3), value=v)  # noqa: E731
    by_hand = model(pad(input_ids, 0), attention_mask=pad(attention_mask, 0), global_attention_mask=pad(global_attention_mask, 0))
    assert max_diff(out.logits, by_hand.logits[:, :13]) <= TOL


def test_per_layer_windows_must_divide_the_largest_as_in_transformers_longformer():
    # [4, 8]: inputs padded to 8 suit both layers; equal to the oracle
    model = LongformerZhForMaskedLM(small_config(attention_window=[4, 8])).eval()
    input_ids, attention_mask, global_attention_mask = batch(seq_len=13, pad_from=10)
    positions = torch.arange(13).expand_as(input_ids)
    expected = hf_twin_of(model)(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask, position_ids=positions)
    got = model(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask)
    assert max_diff(expected.logits, got.logits) <= TOL
    # [6, 8]: padded to 8, layer 0 needs a multiple of 6; every forward failed, in transformers' Longformer too
    with pytest.raises(ValueError, match=r"attention_window\[0\]=6 does not divide the largest window 8"):
        small_config(attention_window=[6, 8])


def test_keyword_overrides_in_from_pretrained_are_validated(tmp_path):
    LongformerZhForMaskedLM(small_config()).save_pretrained(tmp_path)  # window 8, sliding_chunks
    # block mode with 64-token blocks cannot hold a window of 8: refused on direct construction, and now here too
    with pytest.raises(ValueError, match="sparse_block_size=64"):
        LongformerZhForMaskedLM.from_pretrained(tmp_path, attention_backend="block_sparse", sparse_window_mode="block")
    with pytest.raises(ValueError, match="sparse_window_mode='tokens': choose one of"):
        LongformerZhForMaskedLM.from_pretrained(tmp_path, attention_backend="block_sparse", sparse_window_mode="tokens")
    with pytest.raises(ValueError, match=r"attention_window\[0\]=7 must be a positive even int"):
        LongformerZhConfig.from_pretrained(tmp_path, attention_window=7)
    with pytest.raises(ValueError, match="does not divide the largest"):
        AutoModelForMaskedLM.from_pretrained(tmp_path, attention_window=[6, 8])
    # valid overrides still apply
    model = LongformerZhForMaskedLM.from_pretrained(tmp_path, attention_backend="block_sparse", sparse_block_size=8,
                                                    sparse_window_mode="block")
    assert model.config.attention_backend == "block_sparse" and model.config.padding_multiple() == 8


def test_input_longer_than_the_position_table_is_refused_with_a_clear_error():
    model = LongformerZhModel(small_config(max_position_embeddings=16)).eval()
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(torch.ones(1, 17, dtype=torch.long))


def labelled_batch(label_ids_below: int = VOCAB):
    """``batch()`` with about 15% of positions labelled (the first always), labels drawn below ``label_ids_below``."""
    input_ids, attention_mask, _ = batch()
    labels = torch.full_like(input_ids, -100)
    labelled = torch.rand(input_ids.shape) < 0.15
    labelled[0, 0] = True
    labels[labelled] = torch.randint(0, label_ids_below, (int(labelled.sum()),))
    return input_ids, attention_mask, labels, labelled


def test_mlm_head_runs_only_at_labelled_positions_with_the_full_logits_loss():
    model = LongformerZhForMaskedLM(small_config()).eval()
    input_ids, attention_mask, labels, labelled = labelled_batch()

    full = model(input_ids, attention_mask=attention_mask)
    sparse = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert sparse.logits.shape == (int(labelled.sum()), VOCAB)
    assert max_diff(sparse.logits, full.logits[labelled]) <= TOL
    full_loss = torch.nn.functional.cross_entropy(full.logits.view(-1, VOCAB), labels.view(-1))
    assert abs(sparse.loss.item() - full_loss.item()) <= TOL

    sparse.loss.backward()
    # (no global tokens here, so the *_global projections get no gradient in either case)
    sparse_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    full_loss.backward()
    full_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sparse_grads.keys() == full_grads.keys()
    for n in full_grads:
        assert max_diff(sparse_grads[n], full_grads[n]) <= TOL, n


def test_output_vocab_gives_the_full_head_s_columns_and_their_softmax_loss():
    model = LongformerZhForMaskedLM(small_config()).eval()
    input_ids, attention_mask, labels, labelled = labelled_batch(VOCAB // 2)
    vocab = torch.unique(torch.cat([labels[labelled], torch.arange(VOCAB // 3, VOCAB - 10)]))

    full = model(input_ids, attention_mask=attention_mask, labels=labels)
    restricted = model(input_ids, attention_mask=attention_mask, labels=labels, output_vocab=vocab)
    assert max_diff(restricted.logits, full.logits[:, vocab]) <= TOL
    columns = torch.searchsorted(vocab, labels[labelled])
    expected = torch.nn.functional.cross_entropy(full.logits[:, vocab], columns)
    assert abs(restricted.loss.item() - expected.item()) <= TOL
    everything = model(input_ids, attention_mask=attention_mask, labels=labels, output_vocab=torch.arange(VOCAB))
    assert abs(everything.loss.item() - full.loss.item()) <= TOL

    missing = int(labels[0, 0])
    with pytest.raises(ValueError, match=f"label id {missing} is not in output_vocab"):
        model(input_ids, attention_mask=attention_mask, labels=labels, output_vocab=vocab[vocab != missing])
    with pytest.raises(ValueError, match="needs labels"):
        model(input_ids, attention_mask=attention_mask, output_vocab=vocab)


def test_a_batch_without_labelled_tokens_gives_zero_loss_not_nan():
    model = LongformerZhForMaskedLM(small_config()).eval()
    input_ids, attention_mask, _ = batch()
    out = model(input_ids, attention_mask=attention_mask, labels=torch.full_like(input_ids, -100))
    assert out.logits.shape == (0, VOCAB)
    assert out.loss.item() == 0.0


def test_sequence_classification_gives_cls_global_attention_by_default():
    model = LongformerZhForSequenceClassification(small_config(num_labels=3)).eval()
    input_ids, attention_mask, _ = batch()
    cls_global = torch.zeros_like(input_ids)
    cls_global[:, 0] = 1
    default = model(input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 2]))
    explicit = model(input_ids, attention_mask=attention_mask, global_attention_mask=cls_global)
    no_global = model(input_ids, attention_mask=attention_mask, global_attention_mask=torch.zeros_like(input_ids))
    assert default.logits.shape == (2, 3)
    assert max_diff(default.logits, explicit.logits) <= TOL
    assert max_diff(default.logits, no_global.logits) > 1e-4
    expected = torch.nn.functional.cross_entropy(default.logits, torch.tensor([0, 2]))
    assert abs(default.loss.item() - expected.item()) <= TOL


def test_sequence_classification_leaves_cls_local_when_globals_are_marked_with_attention_mask_2():
    """The released convention (attention_mask == 2 for global tokens) counts as the caller marking global tokens
    itself, exactly like global_attention_mask: [CLS] then gets no global attention added."""
    model = LongformerZhForSequenceClassification(small_config(num_labels=3)).eval()
    input_ids, attention_mask, _ = batch()
    released = attention_mask.clone()
    released[:, 5] = 2
    explicit = torch.zeros_like(input_ids)
    explicit[:, 5] = 1
    with_cls = explicit.clone()
    with_cls[:, 0] = 1
    via_mask = model(input_ids, attention_mask=released).logits
    via_global = model(input_ids, attention_mask=attention_mask, global_attention_mask=explicit).logits
    plus_cls = model(input_ids, attention_mask=attention_mask, global_attention_mask=with_cls).logits
    assert max_diff(via_mask, via_global) <= TOL
    assert max_diff(via_mask, plus_cls) > 1e-4


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = LongformerZhForMaskedLM(small_config()).train()  # dropout is 0: training mode is deterministic
    input_ids, attention_mask, global_attention_mask = batch()
    labels = input_ids.masked_fill(torch.rand(input_ids.shape) > 0.3, -100)
    inputs = dict(attention_mask=attention_mask, global_attention_mask=global_attention_mask)
    plain_loss, plain = loss_and_gradients(model, input_ids, labels, **inputs)
    assert len(plain) == len(list(model.parameters()))  # every parameter gets a gradient here
    enable_activation_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.bert.encoder.layer)
    ckpt_loss, ckpt = loss_and_gradients(model, input_ids, labels, **inputs)
    assert abs(plain_loss - ckpt_loss) <= TOL
    for n in plain:
        assert max_diff(plain[n], ckpt[n]) <= TOL, n


def test_save_pretrained_writes_safetensors_and_auto_classes_load_it(tmp_path):
    model = LongformerZhForMaskedLM(small_config()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "longformer_zh"

    input_ids, attention_mask, global_attention_mask = batch()
    expected = model(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert type(loaded) is LongformerZhForMaskedLM and not loaded.training
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight  # tied
    got = loaded(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask)
    assert max_diff(expected.logits, got.logits) <= TOL

    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is LongformerZhModel
    hidden = base(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask).last_hidden_state
    model_hidden = model.bert(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask).last_hidden_state
    assert max_diff(hidden, model_hidden) <= TOL
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=4)
    assert type(classifier) is LongformerZhForSequenceClassification and classifier.classifier.out_features == 4
    assert LongformerZhForMaksedLM is LongformerZhForMaskedLM  # the upstream's spelling still works


def test_each_layers_sliding_chunks_module_checks_its_own_window():
    """Per-layer windows: layer 1's module works in multiples of its own window (8), not layer 0's (4)."""
    config = small_config(attention_window=[4, 8])
    layer1 = build_self_attention(config, layer_id=1).eval()
    nothing = torch.zeros(1, 12, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"sequence length 12 is not a multiple of attention_window=8 \(layer 1\)"):
        layer1(torch.randn(1, 12, 32), nothing, nothing)
    assert layer1(torch.randn(1, 16, 32), nothing[:, :1].expand(1, 16), nothing[:, :1].expand(1, 16))[0].shape == (1, 16, 32)
