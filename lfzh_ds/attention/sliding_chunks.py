"""Exact Longformer attention (token-level sliding window + global tokens).

We reuse transformers' own ``LongformerSelfAttention`` (the oracle our tests compare against), as the
upstream model did: its parameters are already named ``query, key, value, query_global, key_global,
value_global``, which is exactly the BERT-plus-globals layout of the released checkpoint. This module
only adapts its calling convention (an additive mask with 0/+/- values) to the boolean masks the rest
of the model passes around.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention


def _longformer_view_of(config, layer_id: int) -> SimpleNamespace:
    """The few fields ``LongformerSelfAttention.__init__`` reads, with the window as a per-layer list."""
    return SimpleNamespace(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        attention_window=[config.layer_attention_window(i) for i in range(config.num_hidden_layers)],
    )


class SlidingChunksSelfAttention(LongformerSelfAttention):
    """Longformer self-attention with the model-wide interface of ``lfzh_ds.attention``.

    ``forward(hidden_states [B, L, H], is_index_masked [B, L] bool, is_index_global_attn [B, L] bool)``
    returns ``(context [B, L, H], local attention probabilities or None)``. ``L`` must be a multiple
    of the layer's attention window (the model pads).
    """

    def __init__(self, config, layer_id: int):
        super().__init__(_longformer_view_of(config, layer_id), layer_id)
        self.attention_window = config.layer_attention_window(layer_id)

    def forward(
        self,
        hidden_states: torch.Tensor,
        is_index_masked: torch.Tensor,
        is_index_global_attn: torch.Tensor,
        output_attentions: bool = False,
    ):
        seq_len = hidden_states.shape[1]
        if seq_len % self.attention_window:
            raise ValueError(
                f"sequence length {seq_len} is not a multiple of attention_window={self.attention_window} "
                f"(layer {self.layer_id}); pad the input (LongformerZhModel does this for you)"
            )
        # transformers' module only looks at `attention_mask != 0`: keys removed from the sliding window
        # are padding (never attended) and global tokens (attended through the global path instead).
        removed_from_window = is_index_masked | is_index_global_attn
        is_global_attn = bool(is_index_global_attn.any())
        outputs = super().forward(
            hidden_states,
            attention_mask=removed_from_window,
            is_index_masked=is_index_masked,
            is_index_global_attn=is_index_global_attn,
            is_global_attn=is_global_attn,
            output_attentions=output_attentions,
        )
        return outputs[0], (outputs[1] if output_attentions else None)
