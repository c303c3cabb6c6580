"""Self-attention backends of LongformerZh, one interface (see ``build_self_attention``)."""
from __future__ import annotations

from torch import nn

from .sliding_chunks import SlidingChunksSelfAttention


def build_self_attention(config, layer_id: int) -> nn.Module:
    """The self-attention module of layer ``layer_id`` for ``config.attention_backend``.

    The block-sparse kernel is imported only when asked for, so the exact backend works on its own.
    """
    backend = config.attention_backend
    if backend == "sliding_chunks":
        return SlidingChunksSelfAttention(config, layer_id)
    if backend == "block_sparse":
        from .block_sparse import BlockSparseSelfAttention

        return BlockSparseSelfAttention(config, layer_id)
    raise ValueError(f"attention_backend={backend!r} is unknown; choose 'sliding_chunks' or 'block_sparse'")


__all__ = ["SlidingChunksSelfAttention", "build_self_attention"]
