"""Self-attention backends of LongformerZh, one interface (see ``build_self_attention``).

``sliding_chunks``: transformers' Longformer attention. ``block_sparse``: the block-sparse layout
(``layout``), its pure-PyTorch kernel (``band_kernel``), its FlexAttention path (``flex``) and the module
that chooses between them (``block_sparse``).
"""
from __future__ import annotations

from torch import nn

from .block_sparse import BlockSparseSelfAttention
from .sliding_chunks import SlidingChunksSelfAttention


def build_self_attention(config, layer_id: int) -> nn.Module:
    """The self-attention module of layer ``layer_id`` for ``config.attention_backend``."""
    backend = config.attention_backend
    if backend == "sliding_chunks":
        return SlidingChunksSelfAttention(config, layer_id)
    if backend == "block_sparse":
        return BlockSparseSelfAttention(config, layer_id)
    raise ValueError(f"attention_backend={backend!r} is unknown; choose 'sliding_chunks' or 'block_sparse'")


__all__ = ["BlockSparseSelfAttention", "SlidingChunksSelfAttention", "build_self_attention"]
