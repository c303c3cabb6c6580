"""FlexAttention path for the block-sparse layout (``torch.nn.attention.flex_attention``).

Same semantics as ``band_kernel.block_sparse_attention``: the layout of ``layout.block_sparse_layout``
(sliding window of blocks + global blocks), every query also attending the token-level global tokens,
padding keys never attended, padding query rows zero; in token mode (``token_window``) the token-level
sliding window ``|q - k| <= token_window`` instead of the block layout. The mask is built from the same
layout tensor (or window), so results agree with the pure-PyTorch kernel up to floating-point rounding.

Where it runs: compiled FlexAttention needs a CUDA GPU of compute capability 8.0 or newer (Ampere,
Hopper, ...) for forward and backward. It has no attention dropout, so ``BlockSparseSelfAttention``
uses it only on such GPUs when no dropout is applied (eval mode, or ``attention_probs_dropout_prob``
0); everywhere else (CPU, Turing/Titan RTX class GPUs, training with dropout) the pure-PyTorch kernel
runs. On CPU compiled FlexAttention has a forward only and its first two lengths compile for tens of
seconds each (the second compiles a kernel for any length), so it is not used automatically there;
``benchmarks/attention.py`` measures it.
"""
from __future__ import annotations

import functools

import torch

from .layout import block_sparse_layout, token_masks

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - old torch
    create_block_mask = flex_attention = None

__all__ = ["flex_supported", "flex_block_sparse_attention", "block_mask_for", "FlexBlockSparse"]


def flex_supported(device: torch.device, needs_backward: bool = True) -> bool:
    """Whether compiled FlexAttention runs here (CUDA capability >= 8.0; CPU: forward only)."""
    if flex_attention is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return not needs_backward
    return False


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    # Automatic dynamic shapes (torch.compile's default): the first length compiles a specialised kernel,
    # the second one a kernel for any length. ``dynamic=False`` recompiled for every new length (10-16 s
    # each on CPU, padded lengths are multiples of the block) and after 8 of them torch falls back to
    # eager FlexAttention, which materialises the L x L scores.
    return torch.compile(flex_attention)


def block_mask_for(L, block, num_sliding_window_blocks, global_block_indices, global_block_end_indices,
                   key_padding_mask, global_tokens, device, token_window=None):
    """FlexAttention ``BlockMask`` of the layout (or, with ``token_window``, the token-level window) plus
    token-level global keys minus padding keys (``key_padding_mask``, ``global_tokens``: [B, L] bool)."""
    layout = block_sparse_layout(L // block, num_sliding_window_blocks, global_block_indices,
                                 global_block_end_indices)[0].to(device)
    B = key_padding_mask.shape[0]
    attendable = ~key_padding_mask  # [B, L]
    extra = global_tokens & attendable  # [B, L]

    def local(q_idx, kv_idx):
        if token_window is None:
            return layout[q_idx // block, kv_idx // block]
        return (q_idx - kv_idx).abs() <= token_window

    def mask_mod(b, h, q_idx, kv_idx):
        return (local(q_idx, kv_idx) | extra[b, kv_idx]) & attendable[b, kv_idx]

    return create_block_mask(mask_mod, B, None, L, L, device=device, _compile=device.type == "cuda")


def flex_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, compiled: bool = True,
    block_mask=None, **layout,
) -> torch.Tensor:
    """``block_sparse_attention`` through FlexAttention: [B, H, L, D] -> [B, H, L, D].

    ``layout``: the keyword arguments of ``band_kernel.block_sparse_attention`` that say what is attended
    (``block_size``, ``num_sliding_window_blocks``, ``global_block_indices``, ``global_block_end_indices``,
    ``key_padding_mask``, ``global_tokens``, ``token_window``); there is no dropout.
    ``compiled=False`` runs FlexAttention's eager reference (materialises scores: small inputs only).
    ``block_mask``: a mask made by ``block_mask_for`` with the same arguments, to skip rebuilding it.
    """
    if flex_attention is None:
        raise RuntimeError("this torch has no torch.nn.attention.flex_attention (needs torch >= 2.5)")
    block_size, windows = layout.pop("block_size"), layout.pop("num_sliding_window_blocks")
    starts, ends = layout.pop("global_block_indices", (0,)), layout.pop("global_block_end_indices", None)
    token_window = layout.pop("token_window", None)
    key_padding_mask, global_tokens = token_masks(q, block_size, windows, starts, token_window,
                                                  layout.pop("key_padding_mask", None), layout.pop("global_tokens", None))
    if layout:
        raise TypeError(f"flex_block_sparse_attention() got unexpected keyword arguments {sorted(layout)}")
    if block_mask is None:
        block_mask = block_mask_for(q.shape[2], block_size, windows, starts, ends, key_padding_mask, global_tokens,
                                    q.device, token_window)
    attend = _compiled_flex() if compiled else flex_attention
    out = attend(q, k, v, block_mask=block_mask, scale=scale)
    return out.masked_fill(key_padding_mask[:, None, :, None], 0.0)


class FlexBlockSparse:
    """A fixed layout (or token window), callable on ``(q, k, v, key_padding_mask=None, global_tokens=None)``.

    Calls without padding or global tokens reuse one block mask per (batch, length, device): building
    it costs more than the attention itself on CPU (``create_block_mask`` is not compiled there).
    """

    def __init__(self, block_size, num_sliding_window_blocks, global_block_indices=(0,), global_block_end_indices=None,
                 compiled: bool = True, token_window: int | None = None):
        self.layout = (block_size, num_sliding_window_blocks, global_block_indices, global_block_end_indices)
        self.token_window = token_window
        self.compiled = compiled
        self.masks = {}

    def __call__(self, q, k, v, key_padding_mask=None, global_tokens=None):
        block_size, windows, starts, ends = self.layout
        block_mask = None
        if key_padding_mask is None and global_tokens is None:
            B, _, L, _ = q.shape
            key = (B, L, q.device)
            if key not in self.masks:
                nothing = torch.zeros(B, L, dtype=torch.bool, device=q.device)
                self.masks[key] = block_mask_for(L, block_size, windows, starts, ends, nothing, nothing, q.device,
                                                 self.token_window)
            block_mask = self.masks[key]
        return flex_block_sparse_attention(
            q, k, v, block_size=block_size, num_sliding_window_blocks=windows, global_block_indices=starts,
            global_block_end_indices=ends, key_padding_mask=key_padding_mask, global_tokens=global_tokens,
            token_window=self.token_window, compiled=self.compiled, block_mask=block_mask,
        )
