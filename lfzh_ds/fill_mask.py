"""Fill ``[MASK]`` slots in Chinese text with a LongformerZh masked-LM model."""
from __future__ import annotations

import torch

from .errors import InputError
from .tokenization import normalize_text


@torch.no_grad()
def fill_mask(model, tokenizer, text: str, top_k: int = 5) -> list[list[dict]]:
    """The ``top_k`` candidates for every ``[MASK]`` in ``text``, in order of the masks.

    Returns one list per mask, each ``[{"token": str, "token_id": int, "score": float}, ...]`` sorted by
    score (softmax probability) descending. The text is normalised the way the training data was
    (``normalize_text``); the MLM head runs only at the mask positions.
    """
    encoded = tokenizer(normalize_text(text), return_tensors="pt")
    input_ids = encoded["input_ids"]
    mask_positions = (input_ids[0] == tokenizer.mask_token_id).nonzero().flatten()
    if len(mask_positions) == 0:
        raise InputError(f"no {tokenizer.mask_token} in the text {text!r}: mark each slot to fill with {tokenizer.mask_token}")
    max_len = model.config.max_position_embeddings
    if input_ids.shape[1] > max_len:
        raise InputError(f"the text is {input_ids.shape[1]} tokens long; the model takes at most {max_len}")

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hidden = model.bert(
        input_ids.to(device),
        attention_mask=encoded["attention_mask"].to(device),
        token_type_ids=encoded.get("token_type_ids", torch.zeros_like(input_ids)).to(device),
    ).last_hidden_state
    logits = model.cls(hidden[0, mask_positions.to(device)]).float()
    model.train(was_training)

    probs = logits.softmax(dim=-1)
    scores, ids = probs.topk(top_k, dim=-1)
    results = []
    for slot_scores, slot_ids in zip(scores.tolist(), ids.tolist()):
        tokens = tokenizer.convert_ids_to_tokens(slot_ids)
        results.append(
            [{"token": tok, "token_id": tid, "score": score} for tok, tid, score in zip(tokens, slot_ids, slot_scores)]
        )
    return results
