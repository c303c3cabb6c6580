"""fill_mask: candidates for each [MASK], scored by the model's own softmax, on normalised text."""
import pytest
import torch

from lfzh_ds.configuration import LongformerZhConfig
from lfzh_ds.fill_mask import fill_mask
from lfzh_ds.modeling import LongformerZhForMaskedLM
from lfzh_ds.tokenization import load_tokenizer, normalize_text


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    config = LongformerZhConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
        attention_window=16,
    )
    return LongformerZhForMaskedLM(config).eval(), load_tokenizer()


def test_fill_mask_ranks_candidates_by_the_models_probabilities(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    text = "今天天气很[MASK]，我们去公园[MASK]。"
    results = fill_mask(model, tokenizer, text, top_k=4)
    assert len(results) == 2 and all(len(slot) == 4 for slot in results)

    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        probs = model(ids).logits[0].softmax(-1)
    positions = (ids[0] == tokenizer.mask_token_id).nonzero().flatten().tolist()
    for slot, position in zip(results, positions):
        scores = [c["score"] for c in slot]
        assert scores == sorted(scores, reverse=True)
        expected_scores, expected_ids = probs[position].topk(4)
        assert [c["token_id"] for c in slot] == expected_ids.tolist()
        assert max(abs(a - b) for a, b in zip(scores, expected_scores.tolist())) <= 1e-6
        assert [c["token"] for c in slot] == tokenizer.convert_ids_to_tokens(expected_ids.tolist())


def test_fill_mask_follows_the_model(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    favourite = tokenizer.convert_tokens_to_ids("好")
    with torch.no_grad():
        model.cls.predictions.bias[favourite] += 50.0  # make the model certain of one answer
    try:
        (slot,) = fill_mask(model, tokenizer, "天气很[MASK]", top_k=3)
    finally:
        with torch.no_grad():
            model.cls.predictions.bias[favourite] -= 50.0
    assert slot[0]["token"] == "好" and slot[0]["score"] > 0.99


def test_fill_mask_normalises_the_text_like_the_training_data(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    curly, ascii_quotes = "“天气”很[MASK]", '"天气"很[MASK]'
    assert normalize_text(curly) == ascii_quotes
    # curly quotes are not in the vocab: unnormalised they would be [UNK] and change the prediction
    assert tokenizer.unk_token_id in tokenizer(curly)["input_ids"]
    assert fill_mask(model, tokenizer, curly) == fill_mask(model, tokenizer, ascii_quotes)


def test_fill_mask_without_a_mask_says_what_to_do(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        fill_mask(model, tokenizer, "没有空位")


def test_fill_mask_leaves_a_training_model_in_training_mode(model_and_tokenizer):
    """fill_mask scores in eval mode (no dropout) and hands the model back as it found it."""
    model, tokenizer = model_and_tokenizer
    model.train()
    try:
        fill_mask(model, tokenizer, "天气很[MASK]", top_k=2)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    fill_mask(model, tokenizer, "天气很[MASK]", top_k=2)
    assert not model.training


def test_fill_mask_takes_a_text_exactly_as_long_as_the_position_table(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert model.config.max_position_embeddings == 64
    text = "天" * 61 + "[MASK]"  # [CLS] + 61 + [MASK] + [SEP] = 64 tokens
    assert len(tokenizer(text)["input_ids"]) == 64
    assert len(fill_mask(model, tokenizer, text, top_k=1)) == 1
    with pytest.raises(ValueError, match="the text is 65 tokens long; the model takes at most 64"):
        fill_mask(model, tokenizer, "天" + text)
