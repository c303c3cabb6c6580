"""Inputs and comparisons shared by the model tests (not a test module)."""
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(count: int):
    """torch on ``count`` threads inside the block, the thread count before it restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def padded_batch_with_globals(vocab_size, seq_len, pad_from, first_globals, second_globals):
    """Two random sequences of ``seq_len`` ids in ``[5, vocab_size)``; the second is padded (id 0, mask 0) from
    ``pad_from``; ``first_globals`` / ``second_globals`` (positions, negative ones from the end) get global
    attention. Returns ``(input_ids, attention_mask, global_attention_mask)``."""
    input_ids = torch.randint(5, vocab_size, (2, seq_len))
    attention_mask = torch.ones(2, seq_len, dtype=torch.long)
    attention_mask[1, pad_from:] = 0
    input_ids[1, pad_from:] = 0
    global_attention_mask = torch.zeros(2, seq_len, dtype=torch.long)
    global_attention_mask[0, list(first_globals)] = 1
    global_attention_mask[1, list(second_globals)] = 1
    return input_ids, attention_mask, global_attention_mask


def max_diff(a, b) -> float:
    """The largest absolute difference of two tensors."""
    return (a - b).abs().max().item()


def loss_and_gradients(model, input_ids, labels, **inputs):
    """One forward and backward from zeroed gradients: the loss, and the gradient of each parameter that got one."""
    model.zero_grad()
    loss = model(input_ids, labels=labels, **inputs).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
