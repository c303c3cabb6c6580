"""LongformerZhConfig: BERT's configuration plus the Longformer attention settings."""
from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

from transformers import BertConfig

from .constants import DEFAULT_ATTENTION_WINDOW, DEFAULT_MAX_POSITIONS, VOCAB_SIZE
from .errors import ConfigError

ATTENTION_BACKENDS = ("sliding_chunks", "block_sparse")
SPARSE_WINDOW_MODES = ("token", "block")
BLOCK_SPARSE_KERNELS = ("auto", "torch", "flex")
# The settings only block mode reads: a block_sparse config that sets one of them and names no sparse_window_mode
# is read in block mode (``implied_window_mode``).
BLOCK_MODE_KEYS = ("num_sliding_window_blocks", "global_block_indices", "global_block_end_indices")

logger = logging.getLogger(__name__)


def implied_window_mode(config: dict, source: str = "the model config") -> str:
    """The window mode of a config that names no ``sparse_window_mode``, by one rule for every way a config is read
    (a hand-written ``--model-config``, a saved ``config.json``, ``LongformerZhConfig(...)``): ``"block"`` for a
    ``block_sparse`` config that sets a key of ``BLOCK_MODE_KEYS`` (every block-sparse ``config.json`` saved before
    window modes existed has ``global_block_indices``), with a warning naming ``source``; else ``"token"``."""
    given = [key for key in BLOCK_MODE_KEYS if config.get(key) is not None]
    if config.get("attention_backend") != "block_sparse" or not given:
        return "token"
    logger.warning(f"{source}: {', '.join(given)} without sparse_window_mode: read as sparse_window_mode \"block\" "
                   "(a window of whole blocks, not Longformer's token window); add \"sparse_window_mode\": \"block\" "
                   "to keep it, or drop those keys for token mode")
    return "block"


@functools.lru_cache(maxsize=None)  # asked per layer on every forward (padding_multiple)
def token_window_blocks(attention_window: int, preferred_block: int) -> tuple[int, int]:
    """``(block, k)`` for the block kernel's token mode: a band of ``2k + 1`` blocks whose two outermost
    blocks hold every key outside the one-sided window ``w = attention_window // 2`` of every query.

    A query at row ``r`` of its block sees band column ``c`` at distance ``k * block + r - c``, so the
    keys past ``w`` all lie in the outermost blocks exactly when ``k * block`` is ``w`` or ``w + 1``
    (one of them is even, so ``k = 2`` always works). Of those, the block closest to ``preferred_block``
    (``sparse_block_size``), avoiding blocks under half of it (many tiny matmuls cost more than a wider
    band): ``(64, 4)`` for the default window 512, ``(86, 3)`` for 514.
    """
    w = attention_window // 2
    candidates = [(span // k, k) for span in (w, w + 1) for k in range(1, span + 1) if span % k == 0]
    return min(candidates, key=lambda bk: (2 * bk[0] < preferred_block, abs(math.log(bk[0] / preferred_block)), bk[1]))


def check_windows_nest(windows: list[int]) -> None:
    """Inputs are padded to a multiple of the largest window (as in transformers' Longformer), and every
    sliding-chunks layer needs a multiple of its own: each window must divide the largest."""
    largest = max(windows)
    for i, w in enumerate(windows):
        if largest % w:
            raise ConfigError(
                f"attention_window[{i}]={w} does not divide the largest window {largest}: inputs are padded to a "
                "multiple of the largest window, so every per-layer window must divide it (e.g. [256, 512], not [384, 512])"
            )


class LongformerZhConfig(BertConfig):
    """Configuration of a Chinese Longformer.

    Args (beyond ``BertConfig``'s):
        attention_window: the full local window (HF meaning: each side gets half), an even int or
            one even int per layer.
        attention_backend: ``"sliding_chunks"`` (transformers' Longformer code) or ``"block_sparse"``
            (the block kernel, several times faster on CPU).
        sparse_window_mode: what the block kernel computes. ``"token"``: exactly Longformer's attention
            (each token sees ``attention_window / 2`` tokens on each side, plus the token-level global
            tokens), like ``sliding_chunks``, with the block size chosen by ``token_window_blocks``;
            ``"block"``: the block layout of DeepSpeed's former ``BSLongformerSparsityConfig`` (a window of
            whole blocks plus global blocks), not what stock Longformer computes. ``None`` (not named):
            ``implied_window_mode``, block mode when a block-mode key is set, else token mode. A ``config.json``
            that names no ``attention_backend`` (the released checkpoint's) loads as ``block_sparse``.
        sparse_block_size: block size of block mode; in token mode the preferred block size.
        num_sliding_window_blocks: block mode: odd number of blocks in the bidirectional sliding window;
            ``None`` derives it from ``attention_window`` (``attention_window // sparse_block_size + 1``).
        global_block_indices: block mode: blocks that attend to and are attended by every block
            (DeepSpeed's default ``[0]``: the block holding ``[CLS]``). Token mode has no global blocks
            (Longformer's global attention is per token: ``global_attention_mask``) and ignores them.
        global_block_end_indices: block mode: if given, ``global_block_indices[i]:global_block_end_indices[i]``
            are global block ranges instead of single blocks.
        block_sparse_kernel: which kernel computes ``block_sparse`` attention. ``"auto"``: FlexAttention on
            CUDA GPUs that support it when no attention dropout applies, the pure-PyTorch band kernel
            elsewhere; ``"torch"`` / ``"flex"`` force one (``"flex"`` is refused where it cannot run).
    """

    model_type = "longformer_zh"

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        max_position_embeddings: int = DEFAULT_MAX_POSITIONS,
        attention_window: int | list[int] = DEFAULT_ATTENTION_WINDOW,
        attention_backend: str = "sliding_chunks",
        sparse_window_mode: str | None = None,
        sparse_block_size: int = 64,
        num_sliding_window_blocks: int | None = None,
        global_block_indices: list[int] | None = None,
        global_block_end_indices: list[int] | None = None,
        block_sparse_kernel: str = "auto",
        **kwargs,
    ):
        super().__init__(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings, **kwargs)
        self.attention_window = attention_window
        self.attention_backend = attention_backend
        if sparse_window_mode is None:
            sparse_window_mode = implied_window_mode(dict(
                attention_backend=attention_backend, num_sliding_window_blocks=num_sliding_window_blocks,
                global_block_indices=global_block_indices, global_block_end_indices=global_block_end_indices))
        self.sparse_window_mode = sparse_window_mode
        self.sparse_block_size = sparse_block_size
        self.num_sliding_window_blocks = num_sliding_window_blocks
        self.global_block_indices = [0] if global_block_indices is None else list(global_block_indices)
        self.global_block_end_indices = None if global_block_end_indices is None else list(global_block_end_indices)
        self.block_sparse_kernel = block_sparse_kernel
        self.validate_longformer()

    @classmethod
    def from_dict(cls, config_dict, config_source: str = "the model config", **kwargs):
        """transformers sets keyword overrides (``from_pretrained(dir, attention_window=...)``) after
        ``__init__``: validate the config they make. A config that names no backend (the released
        checkpoint's) runs the block kernel, in token mode (the same attention as its ``sliding_chunks``); one
        that names no window mode gets ``implied_window_mode``'s, with ``config_source`` (the file) in its notice."""
        config_dict = dict(config_dict)
        config_dict.setdefault("attention_backend", "block_sparse")
        if config_dict.get("sparse_window_mode") is None:
            config_dict["sparse_window_mode"] = implied_window_mode(config_dict, config_source)
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result).validate_longformer()
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' ``from_pretrained``, naming the folder's ``config.json`` in the notice of ``from_dict``."""
        path = Path(pretrained_model_name_or_path)
        kwargs.setdefault("config_source", str(path / "config.json" if path.is_dir() else path))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_json_file(cls, json_file):
        """Through :meth:`from_dict`, so a saved file gets the same defaults as ``from_pretrained``."""
        return cls.from_dict(cls._dict_from_json_file(json_file), config_source=str(json_file))

    # ------------------------------------------------------------------ validation
    def validate_longformer(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention_backend={self.attention_backend!r}: choose one of {ATTENTION_BACKENDS}")
        if self.sparse_window_mode not in SPARSE_WINDOW_MODES:
            raise ConfigError(f"sparse_window_mode={self.sparse_window_mode!r}: choose one of {SPARSE_WINDOW_MODES}")
        if self.block_sparse_kernel not in BLOCK_SPARSE_KERNELS:
            raise ConfigError(f"block_sparse_kernel={self.block_sparse_kernel!r}: choose one of {BLOCK_SPARSE_KERNELS}")
        windows = self.attention_window
        if isinstance(windows, int):
            windows = [windows] * self.num_hidden_layers
        windows = list(windows)
        if len(windows) != self.num_hidden_layers:
            raise ConfigError(
                f"attention_window has {len(windows)} entries but the model has {self.num_hidden_layers} layers; "
                "give one int or one per layer"
            )
        for i, w in enumerate(windows):
            if not isinstance(w, int) or w <= 0 or w % 2:
                raise ConfigError(f"attention_window[{i}]={w!r} must be a positive even int (the full window, half each side)")
        if self.attention_backend == "sliding_chunks":
            check_windows_nest(windows)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}")
        block = self.sparse_block_size
        if not isinstance(block, int) or block <= 0:
            raise ConfigError(f"sparse_block_size={block!r} must be a positive int")
        block_mode = self.attention_backend == "block_sparse" and self.sparse_window_mode == "block"
        if block_mode:
            for i, w in enumerate(windows):
                if w % block:
                    raise ConfigError(
                        f"attention_window[{i}]={w} is not a multiple of sparse_block_size={block}; "
                        "the block-sparse layout needs whole blocks"
                    )
            if self.max_position_embeddings % block:
                raise ConfigError(f"max_position_embeddings={self.max_position_embeddings} is not a multiple of sparse_block_size={block}")
        n = self.num_sliding_window_blocks
        if n is not None and self.sparse_window_mode == "token" and self.attention_backend == "block_sparse":
            raise ConfigError(
                f"num_sliding_window_blocks={n} is a block-mode setting; token mode derives its band from "
                "attention_window (set sparse_window_mode='block' for a window of whole blocks)"
            )
        if n is not None and (not isinstance(n, int) or n <= 0 or n % 2 == 0):
            raise ConfigError(f"num_sliding_window_blocks={n!r} must be a positive odd int (bidirectional window)")
        if any((not isinstance(i, int)) or i < 0 for i in self.global_block_indices):
            raise ConfigError(f"global_block_indices={self.global_block_indices!r} must be non-negative ints")
        ends = self.global_block_end_indices
        if ends is not None:
            if len(ends) != len(self.global_block_indices):
                raise ConfigError("global_block_end_indices must have one entry per global_block_indices entry")
            for start, end in zip(self.global_block_indices, ends):
                if end <= start:
                    raise ConfigError(f"global block range {start}:{end} is empty; each end index must exceed its start")

    # ------------------------------------------------------------------ helpers
    def layer_attention_window(self, layer_id: int) -> int:
        w = self.attention_window
        return w if isinstance(w, int) else w[layer_id]

    def layer_block_size(self, layer_id: int) -> int:
        """The block kernel's block size in layer ``layer_id`` (token mode: see ``token_window_blocks``)."""
        if self.sparse_window_mode == "token":
            return token_window_blocks(self.layer_attention_window(layer_id), self.sparse_block_size)[0]
        return self.sparse_block_size

    def layer_sliding_window_blocks(self, layer_id: int) -> int:
        if self.sparse_window_mode == "token":
            return 2 * token_window_blocks(self.layer_attention_window(layer_id), self.sparse_block_size)[1] + 1
        if self.num_sliding_window_blocks is not None:
            return self.num_sliding_window_blocks
        return self.layer_attention_window(layer_id) // self.sparse_block_size + 1

    def padding_multiple(self) -> int:
        """Inputs are padded to a multiple of this: the largest window for sliding chunks, the block (in
        token mode the least common multiple of the layers' blocks) for block-sparse."""
        if self.attention_backend == "block_sparse":
            return math.lcm(*(self.layer_block_size(i) for i in range(self.num_hidden_layers)))
        w = self.attention_window
        return w if isinstance(w, int) else max(w)
