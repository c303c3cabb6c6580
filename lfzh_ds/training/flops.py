"""Model FLOPs of a training step, and the peak a device reaches, for the MFU (model FLOPs utilisation) in the log.

``ModelFlops`` counts what the model computes (the attention band, never a dense L squared); ``peak_tflops_of``
knows common GPUs' 16-bit peaks (``--peak-tflops`` gives any other device's). Pretraining's objective puts both in
its metrics lines (``tflops_per_second``, ``mfu``).
"""
from __future__ import annotations

from ..constants import IGNORE_INDEX

# Dense 16-bit (fp16/bf16) tensor-core peaks in TFLOP/s per GPU, fp32 accumulation, no sparsity (vendors' datasheets),
# matched against torch.cuda.get_device_name() in this order. fp32 runs, and other devices, need --peak-tflops.
GPU_PEAK_TFLOPS_16BIT = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                         ("V100-PCIE", 112.0), ("V100", 125.0), ("TITAN RTX", 130.0), ("RTX 4090", 165.0),
                         ("RTX 3090", 71.0), ("T4", 65.0))


def peak_tflops_of(device_name: str | None, precision: str) -> float | None:
    """The table's peak for a GPU name and a 16-bit precision, else None."""
    if not device_name or precision not in ("fp16", "bf16"):
        return None
    for key, peak in GPU_PEAK_TFLOPS_16BIT:
        if key.lower() in device_name.lower():
            return peak
    return None


def attention_pairs(config, seq_len: int, layer: int) -> int:
    """(query, key) pairs one head of ``layer`` scores in a sequence padded to ``seq_len``: the attention band
    (block-sparse: the block layout's blocks x block size squared; sliding chunks: keys within half the window on
    each side, clipped at the ends), never a dense ``seq_len`` squared. Token-level global attention, which
    pretraining does not use, is not counted."""
    if config.attention_backend == "block_sparse":
        from ..attention.layout import block_sparse_layout  # lazily: curves and metrics need no torch

        block = config.sparse_block_size
        layout = block_sparse_layout(-(-seq_len // block), config.layer_sliding_window_blocks(layer),
                                     config.global_block_indices, config.global_block_end_indices)
        return int(layout[0].sum()) * block * block
    half = config.layer_attention_window(layer) // 2
    return sum(min(i + half, seq_len - 1) - max(i - half, 0) + 1 for i in range(seq_len))


class ModelFlops:
    """Training FLOPs of a micro-batch: 3x the forward (the backward costs twice the forward; activation
    checkpointing's recomputation is not counted, as MFU does not count it). A multiply-add is 2 FLOPs.

    Forward, per sequence padded to L and per layer: the Q, K, V and output projections ``8 L h^2``, the
    feed-forward ``4 L h f``, and attention ``4 h P`` (scores and weighted values over the ``P`` pairs of
    ``attention_pairs``, all heads together); per masked token, the masked-LM head ``2 h^2 + 2 h V`` (the head only
    runs on masked positions; ``V`` is ``output_vocab_size`` when the training softmax runs over fewer tokens than
    the vocab). Embeddings, LayerNorm, softmax and dropout are left out (elementwise).
    """

    def __init__(self, config, output_vocab_size: int | None = None):
        self.config = config
        self.output_vocab_size = output_vocab_size or config.vocab_size
        self._per_sequence: dict[int, int] = {}

    def encoder_forward(self, seq_len: int) -> int:
        if seq_len not in self._per_sequence:
            c = self.config
            multiple = c.padding_multiple()
            padded = -(-seq_len // multiple) * multiple
            h, f = c.hidden_size, c.intermediate_size
            self._per_sequence[seq_len] = sum(8 * padded * h * h + 4 * padded * h * f
                                              + 4 * h * attention_pairs(c, padded, layer)
                                              for layer in range(c.num_hidden_layers))
        return self._per_sequence[seq_len]

    def head_forward(self, masked_tokens: int) -> int:
        h = self.config.hidden_size
        return masked_tokens * (2 * h * h + 2 * h * self.output_vocab_size)

    def training(self, sequences: int, seq_len: int, masked_tokens: int) -> int:
        return 3 * (sequences * self.encoder_forward(seq_len) + self.head_forward(masked_tokens))

    def of_batch(self, batch: dict) -> int:
        sequences, seq_len = batch["input_ids"].shape
        return self.training(sequences, seq_len, int((batch["labels"] != IGNORE_INDEX).sum()))
