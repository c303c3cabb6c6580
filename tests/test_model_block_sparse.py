"""The full model on the block_sparse backend (the kernel itself is tested in its own files).

In token mode block-sparse and sliding-chunks attention are the same computation at any window. In
block mode they are when both layouts cover the whole input (full attention plus Longformer's global
tokens), so the two backends must agree there; with a narrow window they must not.
"""
import pytest
import torch
from model_helpers import loss_and_gradients, max_diff, padded_batch_with_globals

from lfzh_ds.configuration import LongformerZhConfig
from lfzh_ds.modeling import LongformerZhForMaskedLM, LongformerZhForSequenceClassification, LongformerZhModel
from lfzh_ds.training.engine import enable_activation_checkpointing

TOL = 1e-5
VOCAB = 300


pytestmark = pytest.mark.usefixtures("frugal_torch")


def config(backend, attention_window=16, **overrides):
    fields = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, attention_window=attention_window, attention_backend=backend, sparse_block_size=8,
        sparse_window_mode="block", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    fields.update(overrides)
    return LongformerZhConfig(**fields)


def batch(seq_len=21, pad_from=15):
    return padded_batch_with_globals(VOCAB, seq_len, pad_from, first_globals=[0, 4, seq_len - 3], second_globals=[0, 7])


def twin_models(block_window, sliding_window, model_class=LongformerZhForMaskedLM, **overrides):
    block = model_class(config("block_sparse", block_window, **overrides)).eval()
    sliding = model_class(config("sliding_chunks", sliding_window, **overrides)).eval()
    sliding.load_state_dict(block.state_dict())
    return block, sliding


def test_block_sparse_model_pads_to_the_block_and_cuts_back():
    model = LongformerZhForMaskedLM(config("block_sparse")).eval()
    assert model.config.padding_multiple() == 8
    input_ids, attention_mask, global_attention_mask = batch()
    out = model(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask, output_hidden_states=True)
    assert out.logits.shape == (2, 21, VOCAB) and out.hidden_states[-1].shape == (2, 21, 32)
    assert torch.isfinite(out.logits).all()


def test_block_sparse_equals_sliding_chunks_when_both_windows_cover_the_input():
    # 21 tokens -> 3 blocks of 8; 9 sliding blocks reach 4 blocks each side. Sliding chunks: one-sided 32 >= 20.
    block, sliding = twin_models(block_window=64, sliding_window=64)
    input_ids, attention_mask, global_attention_mask = batch()
    labels = input_ids.masked_fill(torch.rand(input_ids.shape) > 0.3, -100).masked_fill(attention_mask == 0, -100)
    kwargs = dict(attention_mask=attention_mask, global_attention_mask=global_attention_mask)
    out_block, out_sliding = block(input_ids, **kwargs), sliding(input_ids, **kwargs)
    real = attention_mask.bool()
    assert max_diff(out_block.logits[real], out_sliding.logits[real]) <= TOL

    block(input_ids, labels=labels, **kwargs).loss.backward()
    sliding(input_ids, labels=labels, **kwargs).loss.backward()
    sliding_params = dict(sliding.named_parameters())
    for name, p in block.named_parameters():
        # a bias of key/key_global gets a mathematically zero gradient (softmax ignores a shift of all
        # scores); one implementation may leave it out of the graph (None) where the other gives ~1e-13
        block_grad = p.grad if p.grad is not None else torch.zeros_like(p)
        assert max_diff(block_grad, sliding_params[name].grad) <= TOL, name


def test_block_sparse_with_a_narrow_window_is_local():
    # window 16 at block 8 -> 3 sliding blocks: each block sees itself and its two neighbours
    model = LongformerZhModel(config("block_sparse", attention_window=16, global_block_indices=[], num_hidden_layers=1)).eval()
    assert model.config.layer_sliding_window_blocks(0) == 3
    input_ids = torch.randint(5, VOCAB, (1, 48))  # 6 blocks, no global tokens or blocks
    changed = input_ids.clone()
    changed[0, 40] = (changed[0, 40] + 1) % VOCAB  # block 5: out of reach of blocks 0..3
    before = model(input_ids).last_hidden_state
    after = model(changed).last_hidden_state
    assert max_diff(before[0, :32], after[0, :32]) == 0  # one layer: blocks 0-3 cannot see block 5
    assert max_diff(before[0, 32:], after[0, 32:]) > 1e-4  # blocks 4-5 can


def test_block_sparse_gradient_checkpointing_gives_the_same_gradients():
    model = LongformerZhForMaskedLM(config("block_sparse")).train()
    input_ids, attention_mask, global_attention_mask = batch()
    labels = input_ids.masked_fill(torch.rand(input_ids.shape) > 0.3, -100)
    inputs = dict(attention_mask=attention_mask, global_attention_mask=global_attention_mask)
    plain_loss, plain = loss_and_gradients(model, input_ids, labels, **inputs)
    enable_activation_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.bert.encoder.layer)
    ckpt_loss, ckpt = loss_and_gradients(model, input_ids, labels, **inputs)
    assert abs(plain_loss - ckpt_loss) <= TOL
    assert plain.keys() == ckpt.keys() and len(plain) >= len(list(model.parameters())) - 2
    for n in plain:
        assert max_diff(plain[n], ckpt[n]) <= TOL, n


def test_block_sparse_classifier_matches_sliding_chunks_under_full_coverage():
    block, sliding = twin_models(64, 64, model_class=LongformerZhForSequenceClassification, num_labels=3)
    input_ids, attention_mask, _ = batch()
    labels = torch.tensor([1, 2])
    out_block = block(input_ids, attention_mask=attention_mask, labels=labels)  # [CLS] global by default
    out_sliding = sliding(input_ids, attention_mask=attention_mask, labels=labels)
    assert out_block.logits.shape == (2, 3)
    assert max_diff(out_block.logits, out_sliding.logits) <= TOL
    assert abs(out_block.loss.item() - out_sliding.loss.item()) <= TOL


def test_block_sparse_model_saves_and_loads_and_a_sliding_checkpoint_can_switch_backend(tmp_path):
    model = LongformerZhForMaskedLM(config("block_sparse")).eval()
    model.save_pretrained(tmp_path / "block")
    loaded = LongformerZhForMaskedLM.from_pretrained(tmp_path / "block")
    assert loaded.config.attention_backend == "block_sparse"
    input_ids, attention_mask, global_attention_mask = batch()
    kwargs = dict(attention_mask=attention_mask, global_attention_mask=global_attention_mask)
    assert max_diff(model(input_ids, **kwargs).logits, loaded(input_ids, **kwargs).logits) <= TOL

    # the same weights serve both backends: a sliding-chunks checkpoint loads with attention_backend overridden
    sliding = LongformerZhForMaskedLM(config("sliding_chunks", 64)).eval()
    sliding.save_pretrained(tmp_path / "sliding")
    switched = LongformerZhForMaskedLM.from_pretrained(
        tmp_path / "sliding", attention_backend="block_sparse", attention_window=64
    )
    assert switched.config.attention_backend == "block_sparse"
    real = attention_mask.bool()
    assert max_diff(switched(input_ids, **kwargs).logits[real], sliding(input_ids, **kwargs).logits[real]) <= TOL


@pytest.mark.parametrize("windows, seq_len", [([16, 32], 61), (24, 70), ([8, 16], 33)])
def test_token_mode_equals_sliding_chunks_on_a_whole_model_where_block_mode_does_not(windows, seq_len):
    # bands of 1-2 blocks each side (window 24 at a preferred block of 8: two blocks of 6), lengths not a
    # multiple of any window, padding and global tokens; logits and every parameter's gradient
    sliding = LongformerZhForMaskedLM(config("sliding_chunks", windows)).eval()
    token = LongformerZhForMaskedLM(config("block_sparse", windows, sparse_window_mode="token")).eval()
    block = LongformerZhForMaskedLM(config("block_sparse", windows)).eval()
    for other in (token, block):
        other.load_state_dict(sliding.state_dict())
    input_ids, attention_mask, global_attention_mask = batch(seq_len, pad_from=seq_len - 9)
    labels = input_ids.masked_fill(torch.rand(input_ids.shape) > 0.3, -100).masked_fill(attention_mask == 0, -100)
    kwargs = dict(attention_mask=attention_mask, global_attention_mask=global_attention_mask)
    real = attention_mask.bool()
    expected = sliding(input_ids, **kwargs).logits
    assert max_diff(token(input_ids, **kwargs).logits[real], expected[real]) <= TOL
    # the block layout sees other keys: the comparison can tell the modes apart
    assert max_diff(block(input_ids, **kwargs).logits[real], expected[real]) > 1e-3

    token(input_ids, labels=labels, **kwargs).loss.backward()
    sliding(input_ids, labels=labels, **kwargs).loss.backward()
    sliding_params = dict(sliding.named_parameters())
    for name, p in token.named_parameters():
        token_grad = p.grad if p.grad is not None else torch.zeros_like(p)  # (key biases: zero either way)
        assert max_diff(token_grad, sliding_params[name].grad) <= TOL, name


def test_the_kernel_choice_is_a_config_field_saved_with_the_model_and_checked(tmp_path):
    model = LongformerZhForMaskedLM(config("block_sparse", block_sparse_kernel="torch")).eval()
    assert LongformerZhConfig().block_sparse_kernel == "auto"  # FlexAttention where it runs, the band kernel elsewhere
    assert {layer.attention.self.kernel for layer in model.bert.encoder.layer} == {"torch"}
    model.save_pretrained(tmp_path)
    loaded = LongformerZhForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.config.block_sparse_kernel == "torch"
    assert {layer.attention.self.kernel for layer in loaded.bert.encoder.layer} == {"torch"}
    input_ids, attention_mask, global_attention_mask = batch()
    kwargs = dict(attention_mask=attention_mask, global_attention_mask=global_attention_mask)
    assert max_diff(model(input_ids, **kwargs).logits, loaded(input_ids, **kwargs).logits) <= TOL
    with pytest.raises(ValueError, match=r"^block_sparse_kernel='triton': choose one of \('auto', 'torch', 'flex'\)$"):
        config("block_sparse", block_sparse_kernel="triton")
    with pytest.raises(ValueError, match="block_sparse_kernel='triton'"):
        LongformerZhForMaskedLM.from_pretrained(tmp_path, block_sparse_kernel="triton")
