"""LongformerZhConfig: BERT's configuration plus the Longformer attention settings."""
from __future__ import annotations

from transformers import BertConfig

from .constants import DEFAULT_ATTENTION_WINDOW, DEFAULT_MAX_POSITIONS, VOCAB_SIZE

ATTENTION_BACKENDS = ("sliding_chunks", "block_sparse")


def check_windows_nest(windows: list[int]) -> None:
    """Inputs are padded to a multiple of the largest window (as in transformers' Longformer), and every
    sliding-chunks layer needs a multiple of its own: each window must divide the largest."""
    largest = max(windows)
    for i, w in enumerate(windows):
        if largest % w:
            raise ValueError(
                f"attention_window[{i}]={w} does not divide the largest window {largest}: inputs are padded to a "
                "multiple of the largest window, so every per-layer window must divide it (e.g. [256, 512], not [384, 512])"
            )


class LongformerZhConfig(BertConfig):
    """Configuration of a Chinese Longformer.

    Args (beyond ``BertConfig``'s):
        attention_window: the full local window (HF meaning: each side gets half), an even int or
            one even int per layer.
        attention_backend: ``"sliding_chunks"`` (exact Longformer, token-level window) or
            ``"block_sparse"`` (the block layout of DeepSpeed's former ``BSLongformerSparsityConfig``).
        sparse_block_size: block size of the block-sparse layout.
        num_sliding_window_blocks: odd number of blocks in the bidirectional sliding window; ``None``
            derives it from ``attention_window`` (``attention_window // sparse_block_size + 1``).
        global_block_indices: blocks that attend to and are attended by every block (DeepSpeed's
            default ``[0]``: the block holding ``[CLS]``).
        global_block_end_indices: if given, ``global_block_indices[i]:global_block_end_indices[i]`` are
            global block ranges instead of single blocks.
    """

    model_type = "longformer_zh"

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        max_position_embeddings: int = DEFAULT_MAX_POSITIONS,
        attention_window: int | list[int] = DEFAULT_ATTENTION_WINDOW,
        attention_backend: str = "sliding_chunks",
        sparse_block_size: int = 64,
        num_sliding_window_blocks: int | None = None,
        global_block_indices: list[int] | None = None,
        global_block_end_indices: list[int] | None = None,
        **kwargs,
    ):
        super().__init__(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings, **kwargs)
        self.attention_window = attention_window
        self.attention_backend = attention_backend
        self.sparse_block_size = sparse_block_size
        self.num_sliding_window_blocks = num_sliding_window_blocks
        self.global_block_indices = [0] if global_block_indices is None else list(global_block_indices)
        self.global_block_end_indices = None if global_block_end_indices is None else list(global_block_end_indices)
        self.validate_longformer()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """transformers sets keyword overrides (``from_pretrained(dir, attention_window=...)``) after
        ``__init__``: validate the config they make."""
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result).validate_longformer()
        return result

    # ------------------------------------------------------------------ validation
    def validate_longformer(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={self.attention_backend!r}: choose one of {ATTENTION_BACKENDS}")
        windows = self.attention_window
        if isinstance(windows, int):
            windows = [windows] * self.num_hidden_layers
        windows = list(windows)
        if len(windows) != self.num_hidden_layers:
            raise ValueError(
                f"attention_window has {len(windows)} entries but the model has {self.num_hidden_layers} layers; "
                "give one int or one per layer"
            )
        for i, w in enumerate(windows):
            if not isinstance(w, int) or w <= 0 or w % 2:
                raise ValueError(f"attention_window[{i}]={w!r} must be a positive even int (the full window, half each side)")
        if self.attention_backend == "sliding_chunks":
            check_windows_nest(windows)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}")
        block = self.sparse_block_size
        if not isinstance(block, int) or block <= 0:
            raise ValueError(f"sparse_block_size={block!r} must be a positive int")
        if self.attention_backend == "block_sparse":
            for i, w in enumerate(windows):
                if w % block:
                    raise ValueError(
                        f"attention_window[{i}]={w} is not a multiple of sparse_block_size={block}; "
                        "the block-sparse layout needs whole blocks"
                    )
            if self.max_position_embeddings % block:
                raise ValueError(f"max_position_embeddings={self.max_position_embeddings} is not a multiple of sparse_block_size={block}")
        n = self.num_sliding_window_blocks
        if n is not None and (not isinstance(n, int) or n <= 0 or n % 2 == 0):
            raise ValueError(f"num_sliding_window_blocks={n!r} must be a positive odd int (bidirectional window)")
        if any((not isinstance(i, int)) or i < 0 for i in self.global_block_indices):
            raise ValueError(f"global_block_indices={self.global_block_indices!r} must be non-negative ints")
        ends = self.global_block_end_indices
        if ends is not None:
            if len(ends) != len(self.global_block_indices):
                raise ValueError("global_block_end_indices must have one entry per global_block_indices entry")
            for start, end in zip(self.global_block_indices, ends):
                if end <= start:
                    raise ValueError(f"global block range {start}:{end} is empty; each end index must exceed its start")

    # ------------------------------------------------------------------ helpers
    def layer_attention_window(self, layer_id: int) -> int:
        w = self.attention_window
        return w if isinstance(w, int) else w[layer_id]

    def layer_sliding_window_blocks(self, layer_id: int) -> int:
        if self.num_sliding_window_blocks is not None:
            return self.num_sliding_window_blocks
        return self.layer_attention_window(layer_id) // self.sparse_block_size + 1

    def padding_multiple(self) -> int:
        """Inputs are padded to a multiple of this (window for sliding chunks, block for block-sparse)."""
        if self.attention_backend == "block_sparse":
            return self.sparse_block_size
        w = self.attention_window
        return w if isinstance(w, int) else max(w)
