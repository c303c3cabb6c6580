"""The block-sparse backend: in block mode its layout is DeepSpeed's former BSLongformerSparsityConfig, and
its kernel equals dense scaled_dot_product_attention under the same boolean mask (outputs and gradients),
with padding, global blocks and token-level global tokens, in linear memory; in token mode it equals
transformers' LongformerSelfAttention (outputs and gradients)."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint
from transformers import LongformerConfig
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

from lfzh_ds.attention import band_kernel, build_self_attention
from lfzh_ds.attention.band_kernel import (
    _SCRATCH,
    _dropout_keep_mask,
    _ScratchPool,
    block_sparse_attention,
    empty_cache,
)
from lfzh_ds.attention.block_sparse import BlockSparseSelfAttention
from lfzh_ds.attention.flex import FlexBlockSparse, _compiled_flex, flex_block_sparse_attention, flex_supported
from lfzh_ds.attention.layout import block_sparse_layout, dense_mask_from_layout
from lfzh_ds.configuration import LongformerZhConfig, token_window_blocks
from lfzh_ds.modeling import LongformerZhForMaskedLM

torch.set_num_threads(min(2, torch.get_num_threads()))


def _layout_from_rows(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in rows])


# ------------------------------------------------------------------------------------------- layout
def test_layout_sliding_window_of_three_blocks_with_global_first_block():
    # DeepSpeed's default: global_block_indices=[0]; window 3 = one block each side.
    expected = _layout_from_rows(
        [
            "111111",
            "111000",
            "111100",
            "101110",
            "100111",
            "100011",
        ]
    )
    layout = block_sparse_layout(6, 3, global_block_indices=[0])
    assert layout.shape == (1, 6, 6) and layout.dtype == torch.bool
    assert torch.equal(layout[0], expected)


def test_layout_global_block_ranges_with_end_indices():
    # Global ranges 1:3 and 6:7 (end exclusive), window 5 = two blocks each side.
    expected = _layout_from_rows(
        [
            "11100010",
            "11111111",
            "11111111",
            "01111110",
            "01111110",
            "01111111",
            "11111111",
            "01100111",
        ]
    )
    layout = block_sparse_layout(8, 5, global_block_indices=[1, 6], global_block_end_indices=[3, 7])
    assert torch.equal(layout[0], expected)


def test_layout_ignores_global_blocks_past_the_end_and_repeats_per_head():
    expected = _layout_from_rows(
        [
            "11111",
            "11000",
            "10100",
            "10010",
            "10001",
        ]
    )
    # a window of 1 block (diagonal only); block 7 does not exist in a 5-block sequence
    layout = block_sparse_layout(5, 1, global_block_indices=[0, 7], num_heads=3)
    assert layout.shape == (3, 5, 5)
    for h in range(3):
        assert torch.equal(layout[h], expected)


def test_layout_window_wider_than_sequence_is_dense():
    # DeepSpeed refused this; the model pads short inputs to one block, so we clip the window instead.
    assert bool(block_sparse_layout(3, 9, global_block_indices=[]).all())


def test_layout_rejects_even_window():
    with pytest.raises(ValueError, match="odd"):
        block_sparse_layout(4, 4)


# ------------------------------------------------------------------------------------------- oracle
def rule_mask(L, block, window_blocks, global_blocks, key_padding_mask, global_tokens):
    """[B, 1, L, L] True = attend, written straight from the rule of INTERFACES.md."""
    qb = torch.arange(L)[:, None] // block
    kb = torch.arange(L)[None, :] // block
    is_global_block = torch.zeros(L // block + 1, dtype=torch.bool)
    for g in global_blocks:
        if g < L // block:
            is_global_block[g] = True
    allowed = ((qb - kb).abs() <= window_blocks // 2) | is_global_block[qb] | is_global_block[kb]
    allowed = allowed[None, None] | global_tokens[:, None, None, :]
    return allowed & ~key_padding_mask[:, None, None, :]


def masks_for(B, L, pad_lengths, global_positions):
    key_padding_mask = torch.zeros(B, L, dtype=torch.bool)
    global_tokens = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        if pad_lengths[b]:
            key_padding_mask[b, L - pad_lengths[b] :] = True
        for pos in global_positions[b]:
            global_tokens[b, pos] = True
    return key_padding_mask, global_tokens & ~key_padding_mask


CASES = [
    # (L, block, window blocks, global blocks, padding per sample, global tokens per sample)
    pytest.param(112, 16, 5, [0], [0, 37], [[3, 70], [100]], id="L112-not-a-window-multiple"),
    pytest.param(208, 16, 3, [0], [5, 80], [[], [1, 2, 150]], id="L208-padding-and-globals"),
    pytest.param(96, 16, 9, [], [0, 20], [[40], []], id="L96-window-wider-than-sequence"),
    pytest.param(192, 32, 3, [1, 4], [33, 0], [[0], [191, 64]], id="L192-two-global-blocks"),
    # 6 global keys + 4 band keys: the global slots are padded to 12 (a row width that is a multiple of 8), more than L
    pytest.param(8, 4, 1, [0], [0, 1], [[5, 6], []], id="L8-more-global-slots-than-tokens"),
]


# The same equality tests run on a GPU when the machine has one (CPU-only machines run the CPU cases).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=["kept", "recomputed"])
def probabilities(request, monkeypatch):
    """Runs a test both ways the kernel can get its probabilities in backward: kept from forward (signed
    by dropout) or recomputed (dropout masks regenerated from their seed), on every device."""
    for device in DEVICES:
        monkeypatch.setitem(band_kernel._SAVE_PROBABILITIES, device, request.param == "kept")
    return request.param


def _kernels_for(device):
    """The kernels to check on ``device``: the pure-PyTorch one, plus compiled FlexAttention on GPUs
    that support it (forward and backward)."""
    kernels = [("torch", block_sparse_attention)]
    if device == "cuda" and flex_supported(torch.device("cuda")):
        kernels.append(("flex", flex_block_sparse_attention))
    return kernels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L, block, n, global_blocks, pads, globals_", CASES)
def test_kernel_matches_dense_sdpa_outputs_and_gradients(L, block, n, global_blocks, pads, globals_, device,
                                                          probabilities):
    for kernel_name, kernel in _kernels_for(device):
        _check_kernel_against_sdpa(kernel, L, block, n, global_blocks, pads, globals_, device)


def _check_kernel_against_sdpa(kernel, L, block, n, global_blocks, pads, globals_, device):
    torch.manual_seed(L)
    B, H, D = 2, 3, 16
    q, k, v = (torch.randn(B, H, L, D, device=device, requires_grad=True) for _ in range(3))
    key_padding_mask, global_tokens = (m.to(device) for m in masks_for(B, L, pads, globals_))
    out = kernel(
        q, k, v,
        block_size=block, num_sliding_window_blocks=n, global_block_indices=global_blocks,
        key_padding_mask=key_padding_mask, global_tokens=global_tokens,
    )
    mask = rule_mask(L, block, n, global_blocks, key_padding_mask.cpu(), global_tokens.cpu()).to(device)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = ref.masked_fill(key_padding_mask[:, None, :, None], 0.0)  # padding rows are zero by contract
    assert (out - ref).abs().max().item() <= 1e-5
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip("qkv", ours, theirs):
        assert (a - b).abs().max().item() <= 1e-5, f"d{name} differs {(a-b).abs().max().item()} {b.abs().max().item()}"


def test_dense_mask_from_layout_is_the_rule():
    L, block, n = 80, 16, 3
    key_padding_mask, global_tokens = masks_for(2, L, [0, 9], [[5], [30, 31]])
    layout = block_sparse_layout(L // block, n, global_block_indices=[2])
    ours = dense_mask_from_layout(layout, block, key_padding_mask, global_tokens)
    assert torch.equal(ours, rule_mask(L, block, n, [2], key_padding_mask, global_tokens))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_runs_in_half_precision_close_to_fp32(dtype, device):
    torch.manual_seed(0)
    B, H, L, D, block = 2, 2, 128, 16, 16
    q, k, v = (torch.randn(B, H, L, D, device=device) for _ in range(3))
    key_padding_mask, global_tokens = (m.to(device) for m in masks_for(B, L, [0, 28], [[50], []]))
    kwargs = dict(block_size=block, num_sliding_window_blocks=3, key_padding_mask=key_padding_mask,
                  global_tokens=global_tokens)
    low = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = block_sparse_attention(*low, **kwargs)
    assert out.dtype == dtype
    ref = F.scaled_dot_product_attention(
        q, k, v, attn_mask=rule_mask(L, block, 3, [0], key_padding_mask.cpu(), global_tokens.cpu()).to(device)
    ).masked_fill(key_padding_mask[:, None, :, None], 0.0)
    tol = 3e-3 if dtype == torch.float16 else 3e-2
    assert (out.float() - ref).abs().max().item() <= tol
    out.float().pow(2).sum().backward()
    for x in low:
        assert x.grad.dtype == dtype and bool(torch.isfinite(x.grad).all())


def test_dropout_gradients_are_exact_for_a_fixed_random_stream(probabilities):
    # With the RNG reseeded on each call the dropped entries are fixed, so the custom backward must
    # agree with finite differences (float64, tiny sizes).
    torch.manual_seed(0)
    B, H, L, D, block = 1, 1, 48, 4, 16
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    key_padding_mask, global_tokens = masks_for(B, L, [5], [[20]])

    def attention(q, k, v):
        torch.manual_seed(1234)
        return block_sparse_attention(
            q, k, v, block_size=block, num_sliding_window_blocks=1, key_padding_mask=key_padding_mask,
            global_tokens=global_tokens, dropout_p=0.3, training=True,
        )

    assert not torch.equal(attention(q, k, v), block_sparse_attention(
        q, k, v, block_size=block, num_sliding_window_blocks=1, key_padding_mask=key_padding_mask,
        global_tokens=global_tokens))
    assert torch.autograd.gradcheck(attention, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


def test_memory_is_linear_in_length_no_L_by_L_tensor_is_saved():
    def saved_numels(L):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        q, k, v = (torch.randn(1, 2, L, 8, requires_grad=True) for _ in range(3))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block_sparse_attention(q, k, v, block_size=16, num_sliding_window_blocks=3,
                                   global_tokens=torch.zeros(1, L, dtype=torch.bool).index_fill_(1, torch.tensor([7]), True))
        return sizes

    small, large = saved_numels(512), saved_numels(2048)
    assert max(large) < 2048 * 2048  # not even one L x L matrix
    assert 3.5 <= sum(large) / sum(small) <= 4.5  # 4x the length -> about 4x the saved memory


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_path_builds_the_same_mask():
    # FlexAttention's eager reference (no compilation: CPU tests stay fast); compiled runs on CUDA.
    torch.manual_seed(1)
    B, H, L, D, block = 2, 2, 160, 16, 16
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    key_padding_mask, global_tokens = masks_for(B, L, [0, 45], [[3, 99], [7]])
    kwargs = dict(block_size=block, num_sliding_window_blocks=3, global_block_indices=[0, 6],
                  global_block_end_indices=[1, 8], key_padding_mask=key_padding_mask, global_tokens=global_tokens)
    flex = flex_block_sparse_attention(q, k, v, compiled=False, **kwargs)
    ours = block_sparse_attention(q, k, v, **kwargs)
    assert (flex - ours).abs().max().item() <= 1e-5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_callable_reuses_its_block_mask_only_where_the_mask_cannot_differ():
    torch.manual_seed(2)
    B, H, L, D, block = 2, 2, 96, 16, 16
    flex = FlexBlockSparse(block, 3, [1], compiled=False)
    kwargs = dict(block_size=block, num_sliding_window_blocks=3, global_block_indices=[1])
    for n in (L, L, L // 2):  # the second call reuses the mask, the third needs its own
        q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
        assert (flex(q, k, v) - block_sparse_attention(q, k, v, **kwargs)).abs().max().item() <= 1e-5
    assert sorted(n for _, n, _ in flex.masks) == [L // 2, L]
    key_padding_mask, global_tokens = masks_for(B, L // 2, [0, 20], [[3], []])  # per-call masks: never cached
    ours = block_sparse_attention(q, k, v, key_padding_mask=key_padding_mask, global_tokens=global_tokens, **kwargs)
    theirs = flex(q, k, v, key_padding_mask, global_tokens)
    assert (theirs - ours).abs().max().item() <= 1e-5 and len(flex.masks) == 2


@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="inductor needs a C++ compiler")
def test_compiled_flex_attention_serves_new_lengths_without_recompiling_each():
    # Compiled FlexAttention (inductor, forward on CPU) against the kernel; padded lengths vary by the block, and
    # a compilation per length (tens of seconds, then eager L x L scores after 8 of them) is the trap: the second
    # length compiles a kernel for any length, the third reuses it.
    torch._dynamo.reset()
    _compiled_flex.cache_clear()
    counters.clear()
    torch.manual_seed(3)
    for L in (128, 192, 320):
        q, k, v = (torch.randn(2, 2, L, 16) for _ in range(3))
        key_padding_mask, global_tokens = masks_for(2, L, [0, 40], [[5], []])
        kwargs = dict(block_size=32, num_sliding_window_blocks=3, global_block_indices=[0],
                      key_padding_mask=key_padding_mask, global_tokens=global_tokens)
        compiled = flex_block_sparse_attention(q, k, v, **kwargs)
        assert (compiled - block_sparse_attention(q, k, v, **kwargs)).abs().max().item() <= 1e-5
    assert counters["stats"]["unique_graphs"] <= 2


# ------------------------------------------------------------------------------------------- module
def _config(**overrides):
    settings = dict(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64,
        max_position_embeddings=256, attention_window=32, attention_backend="block_sparse",
        sparse_window_mode="block", sparse_block_size=16, attention_probs_dropout_prob=0.0,
    )
    settings.update(overrides)
    return LongformerZhConfig(**settings)


def dense_module_reference(module, config, hidden, key_padding_mask, global_tokens):
    """Longformer semantics written densely: block layout + global keys for everyone, and global
    tokens' rows recomputed with the *_global projections over all non-padding tokens."""
    B, L, E = hidden.shape
    nh = config.num_attention_heads

    def heads(x):
        return x.view(B, L, nh, E // nh).transpose(1, 2)

    mask = rule_mask(L, config.sparse_block_size, config.layer_sliding_window_blocks(0),
                     config.global_block_indices, key_padding_mask, global_tokens)
    local = F.scaled_dot_product_attention(heads(module.query(hidden)), heads(module.key(hidden)),
                                           heads(module.value(hidden)), attn_mask=mask)
    everyone = ~key_padding_mask[:, None, None, :]
    glob = F.scaled_dot_product_attention(heads(module.query_global(hidden)), heads(module.key_global(hidden)),
                                          heads(module.value_global(hidden)), attn_mask=everyone)
    ctx = torch.where(global_tokens[:, None, :, None], glob, local)
    ctx = ctx.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    return ctx.transpose(1, 2).reshape(B, L, E)


@pytest.mark.parametrize(
    "L, pads, globals_",
    [
        pytest.param(96, [0, 30], [[0, 17], [0]], id="few-globals-folded-projections"),  # 2 < head_dim 8
        pytest.param(128, [10, 0], [list(range(0, 100, 10)), [5]], id="many-globals-full-projections"),  # 10 >= 8
        pytest.param(64, [0, 0], [[], []], id="no-globals"),
    ],
)
def test_module_matches_dense_longformer_semantics_with_parameter_gradients(L, pads, globals_):
    torch.manual_seed(7)
    config = _config()
    module = BlockSparseSelfAttention(config, layer_id=0).eval()
    with torch.no_grad():  # distinct global projections, so using the wrong ones would show
        for p in module.parameters():
            p.normal_(0.0, 0.2)
    B = 2
    hidden = torch.randn(B, L, config.hidden_size, requires_grad=True)
    key_padding_mask, global_tokens = masks_for(B, L, pads, globals_)
    out, attn = module(hidden, key_padding_mask, global_tokens)
    assert attn is None and out.shape == hidden.shape
    ref = dense_module_reference(module, config, hidden, key_padding_mask, global_tokens)
    assert (out - ref).abs().max().item() <= 1e-5
    grad = torch.randn_like(out)
    params = [hidden] + list(module.parameters())
    ours = torch.autograd.grad(out, params, grad, allow_unused=True)
    theirs = torch.autograd.grad(ref, params, grad, allow_unused=True)
    names = ["hidden_states"] + [n for n, _ in module.named_parameters()]
    for name, a, b in zip(names, ours, theirs):
        a = torch.zeros_like(params[names.index(name)]) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        # weight gradients sum over all B*L positions: compare relative to their size
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), f"gradient of {name} differs"


def test_module_parameter_names_follow_the_interface():
    module = BlockSparseSelfAttention(_config(), layer_id=0)
    names = {n.split(".")[0] for n, _ in module.named_parameters()}
    assert names == {"query", "key", "value", "query_global", "key_global", "value_global"}


def test_module_rejects_unpadded_length_with_a_clear_error():
    module = BlockSparseSelfAttention(_config(), layer_id=0)
    hidden = torch.randn(1, 40, 32)
    masks = torch.zeros(1, 40, dtype=torch.bool)
    with pytest.raises(ValueError, match="multiple of the block size 16"):
        module(hidden, masks, masks)


def test_module_applies_attention_dropout_only_in_training():
    torch.manual_seed(3)
    module = BlockSparseSelfAttention(_config(attention_probs_dropout_prob=0.5), layer_id=0)
    hidden = torch.randn(1, 64, 32)
    no = torch.zeros(1, 64, dtype=torch.bool)
    glob = no.clone()
    glob[0, 0] = True
    module.eval()
    first, _ = module(hidden, no, glob)
    second, _ = module(hidden, no, glob)
    assert torch.equal(first, second)
    module.train()
    dropped, _ = module(hidden, no, glob)
    assert not torch.allclose(dropped, first, atol=1e-3)


def test_model_with_block_sparse_backend_trains_one_step():
    torch.manual_seed(0)
    config = _config(num_hidden_layers=2, vocab_size=200)
    model = LongformerZhForMaskedLM(config)
    input_ids = torch.randint(5, 200, (2, 70))  # not a block multiple: the model pads
    labels = torch.full_like(input_ids, -100)
    labels[:, ::7] = input_ids[:, ::7]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 60:] = 0
    attention_mask[:, 0] = 2
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    assert math.isfinite(loss.item())
    grads = [p.grad for n, p in model.named_parameters() if "key_global" in n and n.endswith("weight")]
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_cpu_dropout_mask_has_the_requested_rate_is_fresh_each_call_and_repeats_from_a_seed():
    first, second, again = (torch.empty(1000, 1000) for _ in range(3))
    keep = _dropout_keep_mask(first, 0.3)
    _dropout_keep_mask(second, 0.3)
    assert abs(keep - 0.7) < 1e-4
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert abs(first.mean().item() - 0.7) < 0.003  # 1e6 draws: sd 0.00046
    both_dropped = ((first == 0) & (second == 0)).float().mean().item()
    assert abs(both_dropped - 0.09) < 0.003  # independent draws
    _dropout_keep_mask(first, 0.3, torch.Generator().manual_seed(7))
    _dropout_keep_mask(again, 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)


def test_repeated_calls_reusing_scratch_buffers_give_identical_results():
    # The kernel recycles its temporaries between calls; results of earlier calls must not change.
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 2, 64, 8, requires_grad=True) for _ in range(3))
    kwargs = dict(block_size=16, num_sliding_window_blocks=1, global_block_indices=[])
    first = block_sparse_attention(q, k, v, **kwargs)
    first_grads = torch.autograd.grad(first.sum(), (q, k, v))
    kept = [first.detach().clone()] + [g.clone() for g in first_grads]
    second = block_sparse_attention(q * 2, k, v, **kwargs)
    torch.autograd.grad(second.sum(), (q, k, v))
    assert torch.equal(first, kept[0])
    for g, saved in zip(first_grads, kept[1:]):
        assert torch.equal(g, saved)
    assert _SCRATCH.free  # the buffers of both calls, kept probabilities included, wait for the next call
    empty_cache()
    assert not _SCRATCH.free
    again = block_sparse_attention(q, k, v, **kwargs)
    assert torch.equal(again, kept[0]) and all(
        torch.equal(g, saved) for g, saved in zip(torch.autograd.grad(again.sum(), (q, k, v)), kept[1:])
    )


def test_a_retained_graph_backpropagates_twice_through_the_same_dropout_masks(probabilities):
    # Backward must not consume what forward kept, nor depend on the default generator's state.
    torch.manual_seed(11)
    q, k, v = (torch.randn(2, 3, 128, 16, requires_grad=True) for _ in range(3))
    global_tokens = torch.zeros(2, 128, dtype=torch.bool)
    global_tokens[0, 50] = True
    out = block_sparse_attention(q, k, v, block_size=16, num_sliding_window_blocks=3, global_tokens=global_tokens,
                                 dropout_p=0.2, training=True)
    weights = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), weights, retain_graph=True)
    torch.randn(1000)  # draws from the default generator in between change nothing
    second = torch.autograd.grad(out, (q, k, v), weights)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# Chunk budgets (bytes of scores) that split these small cases like real lengths split real heads:
# 1 = one window per chunk; 20_000 / 50_000 = runs of 1-10 windows of one head, the last run shorter.
BUDGETS = [1, 20_000, 50_000]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("L, block, n, global_blocks, pads, globals_", [CASES[1], CASES[3]])
def test_kernel_is_the_same_when_heads_go_through_in_parts(L, block, n, global_blocks, pads, globals_, budget,
                                                            monkeypatch, probabilities):
    # Long sequences split each head into runs of windows (a head per chunk and more at L >= 4096 on CPU);
    # the masks of padding and global keys must follow each part, the global keys' gradients add up.
    monkeypatch.setitem(band_kernel._CHUNK_BYTES, "cpu", budget)
    _check_kernel_against_sdpa(block_sparse_attention, L, block, n, global_blocks, pads, globals_, "cpu")


def test_heads_are_split_into_parts_only_when_one_does_not_fit(monkeypatch):
    q = torch.zeros(2, 3, 208, 8)
    no_padding = torch.zeros(2, 208, dtype=torch.bool)
    for budget, heads, windows in [(1 << 20, 6, 13), (60_000, 1, 13), (20_000, 1, 4), (1, 1, 1)]:
        monkeypatch.setitem(band_kernel._CHUNK_BYTES, "cpu", budget)
        plan = band_kernel._Plan(q, 16, 3, [0], no_padding, no_padding)  # score rows 64 wide: 53,248 B a head
        assert {(c.s1 - c.s0, c.w1 - c.w0) for c in plan.chunks[:1]} == {(heads, windows)}
        assert sum((c.s1 - c.s0) * (c.w1 - c.w0) for c in plan.chunks) == 6 * 13  # every window exactly once


@pytest.mark.parametrize("budget", BUDGETS)
def test_dropout_gradients_are_exact_when_heads_go_through_in_parts(budget, monkeypatch, probabilities):
    monkeypatch.setitem(band_kernel._CHUNK_BYTES, "cpu", budget)
    torch.manual_seed(0)
    B, H, L, D, block = 2, 2, 48, 4, 16
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    key_padding_mask, global_tokens = masks_for(B, L, [5, 0], [[20], [3, 40]])

    def attention(q, k, v):
        torch.manual_seed(99)
        return block_sparse_attention(q, k, v, block_size=block, num_sliding_window_blocks=1,
                                      key_padding_mask=key_padding_mask, global_tokens=global_tokens,
                                      dropout_p=0.3, training=True)

    assert torch.autograd.gradcheck(attention, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


def test_kept_and_recomputed_probabilities_give_the_same_outputs_and_gradients_with_dropout(monkeypatch):
    # The two ways backward gets the (dropped) probabilities check each other: signed probabilities
    # kept from forward vs recomputed scores and dropout masks regenerated from their seed.
    torch.manual_seed(3)
    B, H, L, D = 2, 3, 128, 16
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    key_padding_mask, global_tokens = masks_for(B, L, [0, 30], [[5, 77], [40]])
    weights = torch.randn(B, H, L, D)
    results = []
    for keep in (True, False):
        monkeypatch.setitem(band_kernel._SAVE_PROBABILITIES, "cpu", keep)
        torch.manual_seed(42)
        out = block_sparse_attention(q, k, v, block_size=16, num_sliding_window_blocks=3, global_block_indices=[0, 3],
                                     key_padding_mask=key_padding_mask, global_tokens=global_tokens,
                                     dropout_p=0.25, training=True)
        results.append((out, *torch.autograd.grad(out, (q, k, v), weights)))
    for kept, recomputed in zip(*results):
        assert (kept - recomputed).abs().max().item() <= 1e-6


def test_activation_checkpointing_recomputes_the_kept_probabilities_and_gives_the_same_gradients():
    # Non-reentrant checkpointing drops what forward saved (through saved-tensor hooks) and reruns forward
    # in backward; the kept probabilities must go through those hooks and come back identical.
    torch.manual_seed(8)
    q, k, v = (torch.randn(2, 3, 128, 16, requires_grad=True) for _ in range(3))
    kwargs = dict(block_size=16, num_sliding_window_blocks=3, global_block_indices=[0], dropout_p=0.2, training=True)
    weights = torch.randn(2, 3, 128, 16)
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(123)
        if checkpointed:
            out = checkpoint(lambda *x: block_sparse_attention(*x, **kwargs), q, k, v, use_reentrant=False)
        else:
            out = block_sparse_attention(q, k, v, **kwargs)
        results.append(torch.autograd.grad(out, (q, k, v), weights))
    for plain, checkpointed in zip(*results):
        assert torch.equal(plain, checkpointed)


def test_buffer_pool_stays_under_its_limit_by_dropping_the_sizes_returned_longest_ago():
    # Variable lengths (fine-tuning batches) return buffers of many sizes; stale sizes must not crowd out
    # the current ones.
    pool = _ScratchPool(max_bytes=4000)
    old, current = torch.empty(500), torch.empty(300)  # 2000 and 1200 bytes
    pool.give_back(old, current)
    pool.give_back(torch.empty(2000))  # 8000 bytes: more than the whole pool, never kept
    assert pool.held == 3200
    again = pool.take((300,), torch.float32, torch.device("cpu"))
    assert again.data_ptr() == current.data_ptr() and pool.held == 2000
    pool.give_back(again, torch.empty(400))  # 1200 + 1600 more: the 500-float size, returned first, goes
    assert pool.held == 2800 and sorted(key[0] for key in pool.free) == [300, 400]
    assert pool.take((20, 15), torch.float32, torch.device("cpu")).data_ptr() == current.data_ptr()
    assert pool.take((300,), torch.float64, torch.device("cpu")).data_ptr() != current.data_ptr()  # dtype matters


def _pooled_chunk_buffers(free):
    # one window per chunk below: 16 rows x 48 keys (window of 3 blocks of 16, no global keys)
    return len(free.get((16 * 48, torch.float32, torch.device("cpu")), []))


def test_kept_probabilities_go_back_to_the_pool_after_backward_unless_the_graph_is_retained(monkeypatch):
    monkeypatch.setitem(band_kernel._CHUNK_BYTES, "cpu", 1)  # 2 heads x 8 windows = 16 chunks
    band_kernel.empty_cache()
    q, k, v = (torch.randn(1, 2, 128, 16, requires_grad=True) for _ in range(3))
    out = block_sparse_attention(q, k, v, block_size=16, num_sliding_window_blocks=3, global_block_indices=[])
    weights = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), weights, retain_graph=True)
    assert _pooled_chunk_buffers(band_kernel._SCRATCH.free) < 16  # still needed by the retained graph
    second = torch.autograd.grad(out, (q, k, v), weights)
    assert _pooled_chunk_buffers(band_kernel._SCRATCH.free) >= 16  # all 16 kept chunks recycled
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_inference_keeps_no_probabilities_even_for_inputs_that_require_grad(monkeypatch):
    monkeypatch.setitem(band_kernel._CHUNK_BYTES, "cpu", 1)
    band_kernel.empty_cache()
    q, k, v = (torch.randn(1, 2, 128, 16, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        block_sparse_attention(q, k, v, block_size=16, num_sliding_window_blocks=3, global_block_indices=[])
    assert _pooled_chunk_buffers(band_kernel._SCRATCH.free) >= 1  # one buffer went round all 16 chunks


def test_attention_dropout_is_inverted_dropout_so_the_expected_output_is_the_eval_output():
    """Dropped probabilities are rescaled by 1 / keep (as F.dropout does): averaged over many draws the training
    output equals the eval output. Without the rescaling it would shrink towards 0 by the keep probability."""
    torch.manual_seed(0)
    B, H, L, D, block = 1, 2, 64, 8, 16
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    v = v + 2.0  # values far from 0, so a missing rescaling is a large bias
    key_padding_mask, global_tokens = masks_for(B, L, [6], [[20]])
    kwargs = dict(block_size=block, num_sliding_window_blocks=3, key_padding_mask=key_padding_mask,
                  global_tokens=global_tokens)
    reference = block_sparse_attention(q, k, v, **kwargs)
    draws = 400
    mean = sum(block_sparse_attention(q, k, v, dropout_p=0.5, training=True, **kwargs) for _ in range(draws)) / draws
    real = ~key_padding_mask[0]
    slope = (mean[..., real, :] * reference[..., real, :]).sum() / reference[..., real, :].pow(2).sum()
    assert abs(slope.item() - 1.0) < 0.03
    assert (mean[..., real, :] - reference[..., real, :]).abs().mean().item() < 0.1


def test_module_ignores_a_global_flag_on_a_padding_token():
    """Padding never attends: a padding position marked global still gets a zero output, and nothing else
    changes (the module is documented to take both masks; callers other than the model may pass such a flag)."""
    torch.manual_seed(5)
    module = BlockSparseSelfAttention(_config(), layer_id=0).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.2)
    hidden = torch.randn(2, 64, 32)
    key_padding_mask, global_tokens = masks_for(2, 64, [0, 20], [[3], [7]])
    flagged = global_tokens.clone()
    flagged[1, 50] = True  # a padding position
    expected, _ = module(hidden, key_padding_mask, global_tokens)
    got, _ = module(hidden, key_padding_mask, flagged)
    assert torch.equal(got[1, 44:], torch.zeros_like(got[1, 44:]))
    assert (got - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("num_globals", [1, 8])  # fewer than head_dim 8 (projections folded) and not
def test_global_rows_with_attention_dropout_weigh_the_value_bias_by_the_kept_probabilities(num_globals):
    """dropout(P) @ (W_v h + b_v): with W_v = W_k = 0 a global row is b_v times the sum of the kept
    probabilities, k / (keep L) for k kept keys: it changes from draw to draw (never b_v alone every time)."""
    torch.manual_seed(2)
    module = BlockSparseSelfAttention(_config(attention_probs_dropout_prob=0.5), layer_id=0).train()
    L = 64
    with torch.no_grad():
        module.key_global.weight.zero_()
        module.value_global.weight.zero_()
        module.value_global.bias.copy_(torch.arange(1.0, 33.0))
    hidden = torch.randn(1, L, 32)
    key_padding_mask = torch.zeros(1, L, dtype=torch.bool)
    global_tokens = torch.zeros(1, L, dtype=torch.bool)
    global_tokens[0, 40 : 40 + num_globals] = True
    sums = set()
    for _ in range(10):
        out, _ = module(hidden, key_padding_mask, global_tokens)
        kept_share = out[0, 40 : 40 + num_globals].view(num_globals, 4, 8) / module.value_global.bias.view(4, 8)
        assert torch.allclose(kept_share, kept_share[..., :1].expand_as(kept_share), atol=1e-5)  # one sum per head
        count = kept_share[..., 0] * 0.5 * L  # kept keys
        assert torch.allclose(count, count.round(), atol=1e-3)
        sums.update(count.round().flatten().tolist())
    assert len(sums) > 1


def test_forcing_the_flex_kernel_on_the_cpu_is_refused_where_a_backward_pass_would_follow():
    """Compiled FlexAttention has a forward only on CPU: kernel='flex' is refused with gradients on
    (forward-only use, which compiles for tens of seconds on CPU, is left to benchmarks/attention.py)."""
    assert not flex_supported(torch.device("cpu")) and flex_supported(torch.device("cpu"), needs_backward=False)
    module = build_self_attention(_config(block_sparse_kernel="flex"), layer_id=0).eval()
    hidden = torch.randn(1, 64, 32)
    nothing = torch.zeros(1, 64, dtype=torch.bool)
    with pytest.raises(ValueError, match="FlexAttention does not run on cpu here; use kernel='torch'"):
        module(hidden, nothing, nothing)


# ------------------------------------------------------------------------------------------- token mode
def test_token_geometry_puts_every_key_outside_the_window_in_the_two_outermost_band_blocks():
    for window in (2, 4, 12, 16, 30, 64, 200, 384, 500, 510, 512, 514, 524, 1024):
        for preferred in (8, 64):
            block, k = token_window_blocks(window, preferred)
            assert k * block - window // 2 in (0, 1), (window, preferred)
    assert token_window_blocks(512, 64) == (64, 4)  # the default geometry is block mode's: 9 blocks of 64


def _hf_longformer_twin(module, window):
    hf_config = LongformerConfig(hidden_size=module.embed_dim, num_attention_heads=module.num_heads,
                                 attention_window=[window], attention_probs_dropout_prob=0.0)
    hf = LongformerSelfAttention(hf_config, layer_id=0)
    hf.load_state_dict(module.state_dict())
    return hf


def _padded(x, multiple, value):
    extra = -x.shape[1] % multiple
    return F.pad(x, (0, 0, 0, extra) if x.dim() == 3 else (0, extra), value=value)


TOKEN_CASES = [
    # (real length, attention window, preferred block, padding per sample, global tokens per sample, chunk budget)
    pytest.param(40, 16, 8, [0, 9], [[0, 17], [0, 3, 25]], None, id="w16-block8-L40-not-a-window-multiple"),
    pytest.param(61, 30, 8, [5, 0], [[0], [2, 60]], None, id="w30-block8-2x8-reach16-not-a-block-multiple"),
    pytest.param(50, 12, 8, [0, 20], [[0, 1], []], None, id="w12-block7-reach7"),
    pytest.param(100, 64, 8, [30, 0], [list(range(0, 100, 9)), [50]], None, id="w64-4-blocks-each-side-11-globals"),
    pytest.param(10, 30, 8, [0, 4], [[9], [0]], None, id="band-clipped-to-a-short-input"),
    pytest.param(33, 8, 8, [0, 0], [[], []], None, id="no-padding-no-globals"),
    # one window per chunk: the edge masks follow every part of a head
    pytest.param(61, 30, 8, [5, 0], [[0], [2, 60]], 1, id="w30-one-window-per-chunk"),
    pytest.param(100, 64, 8, [30, 0], [list(range(0, 100, 9)), [50]], 1, id="w64-one-window-per-chunk"),
]


@pytest.mark.parametrize("L, window, preferred, pads, globals_, budget", TOKEN_CASES)
def test_token_mode_equals_transformers_longformer_self_attention_outputs_and_gradients(
    L, window, preferred, pads, globals_, budget, monkeypatch, probabilities
):
    if budget is not None:
        monkeypatch.setitem(band_kernel._CHUNK_BYTES, "cpu", budget)
    torch.manual_seed(L + window)
    config = _config(attention_window=window, sparse_block_size=preferred, sparse_window_mode="token")
    ours = BlockSparseSelfAttention(config, layer_id=0)
    with torch.no_grad():  # distinct global projections, so using the wrong ones would show
        for p in ours.parameters():
            p.normal_(0.0, 0.2)
    hf = _hf_longformer_twin(ours, window)
    assert ours.token_window == window // 2 and ours.global_block_indices == []
    B, E = 2, config.hidden_size
    hidden = torch.randn(B, L, E, requires_grad=True)
    key_padding_mask, global_tokens = masks_for(B, L, pads, globals_)
    grad = torch.randn(B, L, E).masked_fill(key_padding_mask[..., None], 0.0)

    # ours padded to its block, transformers' to its window (as LongformerModel does), padding masked
    out = ours(_padded(hidden, ours.block_size, 0.0), _padded(key_padding_mask, ours.block_size, True),
               _padded(global_tokens, ours.block_size, False))[0][:, :L]
    additive = torch.zeros(B, L).masked_fill(key_padding_mask, -10000.0).masked_fill(global_tokens, 10000.0)
    is_masked = _padded(key_padding_mask, window, True)
    is_global = _padded(global_tokens, window, False)
    ref = hf(_padded(hidden, window, 0.0), attention_mask=_padded(additive, window, -10000.0),
             is_index_masked=is_masked, is_index_global_attn=is_global, is_global_attn=bool(is_global.any()))[0][:, :L]
    real = ~key_padding_mask
    assert (out[real] - ref[real]).abs().max().item() <= 1e-5
    inputs = [hidden, *ours.parameters()]
    # (without global tokens the global projections get no gradient; key_global.bias shifts every score of a
    # row alike: our folded global path never uses it, its gradient is 0)
    ours_grads = torch.autograd.grad(out, inputs, grad, allow_unused=True, materialize_grads=True)
    hf_grads = torch.autograd.grad(ref, [hidden, *hf.parameters()], grad, allow_unused=True, materialize_grads=True)
    names = ["hidden"] + [name for name, _ in ours.named_parameters()]
    assert names[1:] == [name for name, _ in hf.named_parameters()]
    for name, a, b in zip(names, ours_grads, hf_grads):
        # weight gradients sum over all B*L positions (entries up to ~25 here): compare relative to their size
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), f"d{name} differs"


def test_token_mode_masks_exactly_the_keys_beyond_the_window():
    # the kernel alone, against dense attention under the token-window mask (one-hot values read the weights)
    torch.manual_seed(3)
    L, block, n, w = 48, 8, 5, 15  # reach 16 = w + 1
    q, k = torch.randn(1, 1, L, L), torch.randn(1, 1, L, L)
    v = torch.eye(L)[None, None]
    weights = block_sparse_attention(q, k, v, block_size=block, num_sliding_window_blocks=n, global_block_indices=[],
                                     token_window=w)[0, 0]
    distance = (torch.arange(L)[:, None] - torch.arange(L)[None, :]).abs()
    assert torch.equal(weights > 0, distance <= w)


def test_token_mode_refuses_a_band_that_does_not_reach_the_window_edge_and_global_blocks():
    q = torch.randn(1, 1, 32, 8)
    with pytest.raises(ValueError, match="token_window=10 needs a band reaching 10 or 11 tokens"):
        block_sparse_attention(q, q, q, block_size=8, num_sliding_window_blocks=3, global_block_indices=[],
                               token_window=10)
    with pytest.raises(ValueError, match="token mode has no global blocks"):
        block_sparse_attention(q, q, q, block_size=8, num_sliding_window_blocks=3, global_block_indices=[0],
                               token_window=8)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_path_computes_the_token_window_too():
    torch.manual_seed(2)
    B, H, L, D = 2, 2, 96, 16
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    key_padding_mask, global_tokens = masks_for(B, L, [0, 30], [[3, 70], [7]])
    kwargs = dict(block_size=8, num_sliding_window_blocks=5, global_block_indices=[], token_window=15,
                  key_padding_mask=key_padding_mask, global_tokens=global_tokens)
    flex = flex_block_sparse_attention(q, k, v, compiled=False, **kwargs)
    ours = block_sparse_attention(q, k, v, **kwargs)
    assert (flex - ours).abs().max().item() <= 1e-5
