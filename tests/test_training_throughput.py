"""The FLOP count behind tokens/s, TFLOP/s and MFU, against hand computations; the GPU peak table; the console line."""
import pytest
import torch

from lfzh_ds.configuration import LongformerZhConfig
from lfzh_ds.constants import IGNORE_INDEX
from lfzh_ds.training.flops import ModelFlops, attention_pairs, peak_tflops_of
from lfzh_ds.training.pretraining import format_step

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=128, attention_window=64, sparse_block_size=32)


def test_block_sparse_training_flops_of_a_micro_batch_by_hand():
    config = LongformerZhConfig(**TINY, attention_backend="block_sparse")
    # 128 tokens = 4 blocks of 32; window 64 -> 3 sliding blocks (|i - j| <= 1): 10 block pairs, plus global block 0's
    # row and column: (0, 2), (0, 3), (2, 0), (3, 0). 14 block pairs of 32 x 32 (query, key) pairs.
    assert attention_pairs(config, 128, layer=0) == 14 * 32 * 32
    per_layer = 8 * 128 * 32 ** 2 + 4 * 128 * 32 * 64 + 4 * 32 * 14 * 32 * 32  # projections, FFN, band
    head = 2 * 32 ** 2 + 2 * 32 * 21128  # per masked token: transform + decoder
    labels = torch.full((2, 128), IGNORE_INDEX)
    labels[0, :12] = 5
    labels[1, 100:108] = 7  # 20 masked tokens
    batch = {"input_ids": torch.zeros(2, 128, dtype=torch.long), "labels": labels}
    assert ModelFlops(config).of_batch(batch) == 3 * (2 * 2 * per_layer + 20 * head) == 128_440_320


def test_sliding_chunks_band_is_clipped_at_the_ends_and_grows_linearly():
    config = LongformerZhConfig(**TINY, attention_backend="sliding_chunks")
    # +-32 keys: queries 0-31 see 33..64 keys, 32-95 see 65, 96-127 see 64..33.
    assert attention_pairs(config, 128, layer=0) == 2 * sum(range(33, 65)) + 64 * 65 == 7264
    long = LongformerZhConfig(**{**TINY, "max_position_embeddings": 4096, "attention_window": 512,
                                 "sparse_block_size": 64}, attention_backend="block_sparse")
    pairs = [attention_pairs(long, n, layer=0) for n in (2048, 4096)]
    # 9 sliding blocks plus global block 0: linear in the length apart from the global row and column, far below L^2.
    assert pairs[1] - pairs[0] == (9 * 32 + 2 * 32) * 64 * 64
    assert pairs[1] < 4096 ** 2 / 3


def test_padding_to_the_block_is_counted_like_the_model_computes_it():
    config = LongformerZhConfig(**TINY, attention_backend="block_sparse")
    flops = ModelFlops(config)
    assert flops.encoder_forward(100) == flops.encoder_forward(128)  # the model pads 100 tokens to 4 blocks


def test_gpu_peaks_for_16_bit_precisions_only():
    assert peak_tflops_of("NVIDIA TITAN RTX", "fp16") == 130.0
    assert peak_tflops_of("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops_of("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops_of("NVIDIA A100-SXM4-80GB", "fp32") is None
    assert peak_tflops_of(None, "fp16") is None and peak_tflops_of("Some NPU", "bf16") is None


@pytest.mark.parametrize("mfu, shown", [(0.4123, " | MFU 41.2% | "), (None, None)])
def test_console_line_shows_throughput_padding_and_mfu(mfu, shown):
    record = {"step": 3, "loss": 9.5, "bpc": 13.7, "lr": 1e-4, "loss_scale": 65536.0, "skipped_steps": 1,
              "tokens_per_second": 12345.6, "padding_efficiency": 0.973, "tflops_per_second": 53.6, "mfu": mfu,
              "samples": 192}
    line = format_step(record, 10)
    assert "12,346 tokens/s | padding eff. 97.3% | 53.6 TFLOP/s" in line
    assert (shown in line) if shown else "MFU" not in line
