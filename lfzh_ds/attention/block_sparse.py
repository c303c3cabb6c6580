"""``BlockSparseSelfAttention``: Longformer self-attention on the block-sparse layout (``layout.py``), the
module ``config.attention_backend == "block_sparse"`` builds. It projects queries, keys and values, sends
them to one of two kernels (``config.block_sparse_kernel``: the pure-PyTorch ``band_kernel``, or
FlexAttention through ``flex``) and recomputes the outputs of the token-level global tokens with
``query_global/key_global/value_global`` over all non-padding tokens.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .band_kernel import block_sparse_attention, masked_value
from .flex import flex_block_sparse_attention, flex_supported

__all__ = ["BlockSparseSelfAttention"]


def _dense_rows(q_rows, k, v, key_padding_mask, dropout_p, training):
    """Plain softmax attention of a few query rows ``[B, H, R, D]`` (scaled) over all keys ``[B, H, L, D]``."""
    scores = torch.matmul(q_rows, k.transpose(-1, -2))
    scores = scores.masked_fill(key_padding_mask[:, None, None, :], masked_value(scores.dtype))
    probs = torch.softmax(scores, -1)
    probs = torch.nn.functional.dropout(probs, dropout_p, training)
    return torch.matmul(probs, v)


class BlockSparseSelfAttention(nn.Module):
    """Longformer self-attention on the block-sparse layout (``config.attention_backend == "block_sparse"``).

    Parameters as BERT's self-attention plus ``query_global, key_global, value_global``.
    ``forward(hidden_states [B, L, H], is_index_masked [B, L], is_index_global_attn [B, L])`` returns
    ``(context [B, L, H], None)``: the block-sparse kernel never builds attention matrices, so
    ``output_attentions`` gives ``None``. ``L`` must be a multiple of ``config.layer_block_size(layer_id)``
    (``config.sparse_block_size`` in block mode). ``config.sparse_window_mode`` chooses the pattern: ``"token"``
    is exactly Longformer's (``sliding_chunks``), ``"block"`` the DeepSpeed block layout.
    """

    def __init__(self, config, layer_id: int):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size={config.hidden_size} is not a multiple of num_attention_heads={config.num_attention_heads}"
            )
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.embed_dim = config.hidden_size
        self.query = nn.Linear(self.embed_dim, self.embed_dim)
        self.key = nn.Linear(self.embed_dim, self.embed_dim)
        self.value = nn.Linear(self.embed_dim, self.embed_dim)
        self.query_global = nn.Linear(self.embed_dim, self.embed_dim)
        self.key_global = nn.Linear(self.embed_dim, self.embed_dim)
        self.value_global = nn.Linear(self.embed_dim, self.embed_dim)
        self.dropout = config.attention_probs_dropout_prob
        self.block_size = config.layer_block_size(layer_id)
        self.num_sliding_window_blocks = config.layer_sliding_window_blocks(layer_id)
        token_mode = config.sparse_window_mode == "token"
        # token mode: Longformer's one-sided window, and no global blocks (its global attention is per token)
        self.token_window = config.layer_attention_window(layer_id) // 2 if token_mode else None
        self.global_block_indices = [] if token_mode else list(config.global_block_indices)
        self.global_block_end_indices = (
            None if token_mode or config.global_block_end_indices is None else list(config.global_block_end_indices)
        )
        self.kernel = config.block_sparse_kernel

    def _use_flex(self, q: torch.Tensor) -> bool:
        if self.kernel == "torch":
            return False
        dropout_applies = self.training and self.dropout > 0.0
        if self.kernel == "flex":
            if dropout_applies:
                raise ConfigError("kernel='flex' has no attention dropout; use eval mode, dropout 0 or kernel='torch' "
                                  "(block_sparse_kernel in the config)")
            if not flex_supported(q.device, needs_backward=torch.is_grad_enabled()):
                raise ConfigError(f"FlexAttention does not run on {q.device} here; use kernel='torch' "
                                  "(block_sparse_kernel in the config)")
            return True
        return q.is_cuda and not dropout_applies and flex_supported(q.device)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states, is_index_masked, is_index_global_attn, output_attentions=False):
        B, L, _ = hidden_states.shape
        if L % self.block_size:
            raise ValueError(
                f"sequence length {L} is not a multiple of the block size {self.block_size} "
                f"(layer {self.layer_id}); pad the input (LongformerZhModel does this for you)"
            )
        is_index_global_attn = is_index_global_attn & ~is_index_masked
        q = self._heads(self.query(hidden_states))
        k = self._heads(self.key(hidden_states))
        v = self._heads(self.value(hidden_states))
        layout = dict(
            block_size=self.block_size,
            num_sliding_window_blocks=self.num_sliding_window_blocks,
            global_block_indices=self.global_block_indices,
            global_block_end_indices=self.global_block_end_indices,
            key_padding_mask=is_index_masked,
            global_tokens=is_index_global_attn,
            token_window=self.token_window,
        )
        if self._use_flex(q):
            context = flex_block_sparse_attention(q, k, v, **layout)
        else:
            context = block_sparse_attention(q, k, v, dropout_p=self.dropout, training=self.training, **layout)
        context = context.transpose(1, 2).reshape(B, L, self.embed_dim)
        if bool(is_index_global_attn.any()):
            context = self._recompute_global_rows(context, hidden_states, is_index_masked, is_index_global_attn)
        return context, None

    def _recompute_global_rows(self, context, hidden_states, is_index_masked, is_index_global_attn):
        """Outputs of the global tokens: their ``query_global`` over all non-padding tokens'
        ``key_global``/``value_global``, written over the band result."""
        B, L, E = hidden_states.shape
        nh, D = self.num_heads, self.head_dim
        counts = is_index_global_attn.sum(1)
        Gq = int(counts.max())
        order = torch.argsort((~is_index_global_attn).to(torch.int8), dim=1, stable=True)
        index = order[:, :Gq]  # [B, Gq] positions of global tokens (then filler)
        valid = torch.arange(Gq, device=index.device)[None, :] < counts[:, None]
        h_g = hidden_states.gather(1, index[:, :, None].expand(B, Gq, E))
        q_g = self.query_global(h_g).view(B, Gq, nh, D).transpose(1, 2) / math.sqrt(D)  # [B, nh, Gq, D]
        if Gq < D:
            # Few global tokens: fold the global key/value projections into the queries and the output
            # instead of projecting all L tokens (q.(W h + b) = (W^T q).h + const; sum p (W h + b) =
            # W (sum p h) + b sum p, where sum p is 1 unless dropout dropped some p). Same result, O(Gq L E)
            # instead of O(L E^2).
            w_k = self.key_global.weight.view(nh, D, E)
            w_v = self.value_global.weight.view(nh, D, E)
            q_in = torch.einsum("bhgd,hde->bhge", q_g, w_k).reshape(B, nh * Gq, E)
            # (batched over B only: broadcasting hidden_states over heads would copy it per head)
            scores = torch.bmm(q_in, hidden_states.transpose(1, 2))  # [B, nh * Gq, L]
            scores = scores.masked_fill(is_index_masked[:, None, :], masked_value(scores.dtype))
            probs = torch.softmax(scores, -1)
            probs = torch.nn.functional.dropout(probs, self.dropout, self.training)
            mixed = torch.bmm(probs, hidden_states).view(B, nh, Gq, E)
            kept = probs.sum(-1).view(B, nh, Gq, 1)
            out_g = torch.einsum("bhge,hde->bhgd", mixed, w_v) + self.value_global.bias.view(1, nh, 1, D) * kept
        else:
            k_g = self._heads(self.key_global(hidden_states))
            v_g = self._heads(self.value_global(hidden_states))
            out_g = _dense_rows(q_g, k_g, v_g, is_index_masked, self.dropout, self.training)
        out_g = out_g.transpose(1, 2).reshape(B * Gq, E)
        flat_index = (index + torch.arange(B, device=index.device)[:, None] * L).reshape(-1)
        keep = valid.reshape(-1)
        flat = context.reshape(B * L, E).index_copy(0, flat_index[keep], out_g[keep])
        return flat.view(B, L, E)
