"""The block-sparse layout, one definition for both kernels (``band_kernel`` and ``flex``) and their oracles.

Blocks of ``block_size`` tokens, bidirectional: query block ``i`` attends key block ``j`` iff
``|i - j| <= num_sliding_window_blocks // 2``, or ``i`` or ``j`` is a global block (the semantics of
DeepSpeed's former ``BSLongformerSparsityConfig``). On top of it come Longformer's token-level global
tokens: every token also attends to them. Padding keys are never attended; padding queries get a zero
output. Token mode (``token_window=w``, no global blocks) is exactly Longformer's window: each token
sees the keys within ``w`` tokens of it.
"""
from __future__ import annotations

import torch

__all__ = ["block_sparse_layout", "global_blocks_of", "dense_mask_from_layout", "check_token_geometry", "token_masks"]


def global_blocks_of(num_blocks: int, global_block_indices, global_block_end_indices=None) -> list[int]:
    """The sorted global block ids for a sequence of ``num_blocks`` blocks (ids past the end ignored)."""
    blocks: set[int] = set()
    if global_block_end_indices is None:
        blocks.update(i for i in global_block_indices if i < num_blocks)
    else:
        if len(global_block_end_indices) != len(global_block_indices):
            raise ValueError(
                "global_block_end_indices must have one entry per global_block_indices entry, got "
                f"{list(global_block_indices)} and {list(global_block_end_indices)}"
            )
        for start, end in zip(global_block_indices, global_block_end_indices):
            blocks.update(range(start, min(end, num_blocks)))
    return sorted(blocks)


def block_sparse_layout(
    num_blocks: int,
    num_sliding_window_blocks: int,
    global_block_indices=(0,),
    global_block_end_indices=None,
    num_heads: int = 1,
) -> torch.Tensor:
    """Block layout ``[num_heads, num_blocks, num_blocks]`` (bool, True = query block attends key block).

    The semantics of DeepSpeed's former ``BSLongformerSparsityConfig`` (bidirectional, same layout for
    every head): a sliding window of ``num_sliding_window_blocks`` blocks centred on the diagonal, plus
    global blocks (``global_block_indices``, or the ranges ``start:end`` with
    ``global_block_end_indices``) whose rows and columns are all True. Unlike DeepSpeed, sequences with
    fewer blocks than the window are allowed (the window is clipped) and global ids past the last block
    are ignored, so any padded length works.
    """
    if num_sliding_window_blocks <= 0 or num_sliding_window_blocks % 2 == 0:
        raise ValueError(f"num_sliding_window_blocks={num_sliding_window_blocks} must be a positive odd int")
    half = num_sliding_window_blocks // 2
    idx = torch.arange(num_blocks)
    layout = (idx[:, None] - idx[None, :]).abs() <= half
    for g in global_blocks_of(num_blocks, global_block_indices, global_block_end_indices):
        layout[g, :] = True
        layout[:, g] = True
    return layout.unsqueeze(0).expand(num_heads, num_blocks, num_blocks).clone()


def dense_mask_from_layout(
    layout: torch.Tensor,
    block_size: int,
    key_padding_mask: torch.Tensor | None = None,
    global_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The token-level boolean mask ``[B, 1, L, L]`` (True = attend) of ``layout`` ``[1, nb, nb]``:
    the block layout, plus every query attending the token-level ``global_tokens`` ``[B, L]``, minus
    padding keys (``key_padding_mask`` ``[B, L]``, True = padding). ``L x L``: for tests and oracles."""
    mask = layout[0].repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[None, None]
    if global_tokens is not None:
        mask = mask | global_tokens[:, None, None, :]
    if key_padding_mask is not None:
        mask = mask & ~key_padding_mask[:, None, None, :]
    return mask


def check_token_geometry(block_size, num_sliding_window_blocks, token_window, global_block_indices) -> None:
    """Token mode's band: the keys outside the window must all sit in its two outermost blocks."""
    reach = (num_sliding_window_blocks // 2) * block_size
    if reach - token_window not in (0, 1):
        raise ValueError(
            f"token_window={token_window} needs a band reaching {token_window} or {token_window + 1} tokens each "
            f"side, got {num_sliding_window_blocks} blocks of {block_size} ({reach}); see configuration.token_window_blocks"
        )
    if len(global_block_indices):
        raise ValueError(f"token mode has no global blocks (got global_block_indices={list(global_block_indices)}); "
                         "Longformer's global attention is per token: pass global_tokens")


def token_masks(q: torch.Tensor, block_size, num_sliding_window_blocks, global_block_indices, token_window,
                key_padding_mask=None, global_tokens=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The checks and defaults both kernels start with: ``q`` [B, H, L, D] must hold whole blocks (and, in
    token mode, the geometry must fit); returns ``(key_padding_mask, global_tokens)`` [B, L] bool, all False
    where not given, with padding removed from the global tokens."""
    B, _, L, _ = q.shape
    if L % block_size:
        raise ValueError(f"sequence length {L} is not a multiple of block_size={block_size}; pad the input first")
    if token_window is not None:
        check_token_geometry(block_size, num_sliding_window_blocks, token_window, global_block_indices)
    if key_padding_mask is None:
        key_padding_mask = torch.zeros(B, L, dtype=torch.bool, device=q.device)
    if global_tokens is None:
        global_tokens = torch.zeros(B, L, dtype=torch.bool, device=q.device)
    return key_padding_mask, global_tokens & ~key_padding_mask
