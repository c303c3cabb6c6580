"""Block-sparse Longformer attention: the layout of DeepSpeed's former ``BSLongformerSparsityConfig``
and a pure-PyTorch kernel for it whose time and memory grow linearly with the sequence length.

The layout (blocks of ``block_size`` tokens, bidirectional): query block ``i`` attends key block ``j``
iff ``|i - j| <= num_sliding_window_blocks // 2``, or ``i`` or ``j`` is a global block. On top of it
come Longformer's token-level global tokens: every token also attends to them (regular key/value),
and their own outputs are recomputed with ``query_global/key_global/value_global`` over all
non-padding tokens. Padding keys are never attended; padding queries get a zero output.

How the kernel works (``_BandAttention``, forward and backward written out):

* The keys a query block sees split into the *band* (its own block and ``w`` blocks each side:
  ``W = (2w + 1) * block`` keys, the same for every block row) and the *global keys* (tokens of the
  global blocks plus the token-level global tokens, ``G`` of them). A global key that also lies in
  a row's band is masked there, so it is counted once.
* All heads sit end to end in one zero-padded buffer, so the band of every block row of every head
  is one overlapping strided view (no copy) and the scores of the whole layer are one batched matmul
  ``[windows, block, D] @ [windows, D, W]``, written next to the global scores ``[L, G]`` in one
  buffer ``[windows, block, W + G]`` and normalised in place by one fused softmax (exact, no
  log-sum-exp bookkeeping).
* Global query rows (the rows of global blocks) attend to every key; they are a few dense rows
  computed with plain autograd ops and written over the band result.
* Backward uses the saved probabilities and the fused softmax backward, a few heads at a time; the
  key/value gradients of the overlapping windows are accumulated diagonal by diagonal.
* Call-local temporaries are recycled between calls (fresh large allocations are page-faulted in
  anew every time, which costs as much as a good part of the arithmetic on CPU).

Nothing of size ``L x L`` is ever built: the band scores are ``L x W``, the global ones ``L x G``.
"""
from __future__ import annotations

import math
import sys
import threading

import torch
from torch import nn

__all__ = [
    "block_sparse_layout",
    "global_blocks_of",
    "dense_mask_from_layout",
    "block_sparse_attention",
    "BlockSparseSelfAttention",
]


# ---------------------------------------------------------------------------------------------- layout
def global_blocks_of(num_blocks: int, global_block_indices, global_block_end_indices=None) -> list[int]:
    """The sorted global block ids for a sequence of ``num_blocks`` blocks (ids past the end ignored)."""
    blocks: set[int] = set()
    if global_block_end_indices is None:
        blocks.update(i for i in global_block_indices if i < num_blocks)
    else:
        if len(global_block_end_indices) != len(global_block_indices):
            raise ValueError(
                "global_block_end_indices must have one entry per global_block_indices entry, got "
                f"{list(global_block_indices)} and {list(global_block_end_indices)}"
            )
        for start, end in zip(global_block_indices, global_block_end_indices):
            blocks.update(range(start, min(end, num_blocks)))
    return sorted(blocks)


def block_sparse_layout(
    num_blocks: int,
    num_sliding_window_blocks: int,
    global_block_indices=(0,),
    global_block_end_indices=None,
    num_heads: int = 1,
) -> torch.Tensor:
    """Block layout ``[num_heads, num_blocks, num_blocks]`` (bool, True = query block attends key block).

    The semantics of DeepSpeed's former ``BSLongformerSparsityConfig`` (bidirectional, same layout for
    every head): a sliding window of ``num_sliding_window_blocks`` blocks centred on the diagonal, plus
    global blocks (``global_block_indices``, or the ranges ``start:end`` with
    ``global_block_end_indices``) whose rows and columns are all True. Unlike DeepSpeed, sequences with
    fewer blocks than the window are allowed (the window is clipped) and global ids past the last block
    are ignored, so any padded length works.
    """
    if num_sliding_window_blocks <= 0 or num_sliding_window_blocks % 2 == 0:
        raise ValueError(f"num_sliding_window_blocks={num_sliding_window_blocks} must be a positive odd int")
    half = num_sliding_window_blocks // 2
    idx = torch.arange(num_blocks)
    layout = (idx[:, None] - idx[None, :]).abs() <= half
    for g in global_blocks_of(num_blocks, global_block_indices, global_block_end_indices):
        layout[g, :] = True
        layout[:, g] = True
    return layout.unsqueeze(0).expand(num_heads, num_blocks, num_blocks).clone()


def dense_mask_from_layout(
    layout: torch.Tensor,
    block_size: int,
    key_padding_mask: torch.Tensor | None = None,
    global_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The token-level boolean mask ``[B, 1, L, L]`` (True = attend) of ``layout`` ``[1, nb, nb]``:
    the block layout, plus every query attending the token-level ``global_tokens`` ``[B, L]``, minus
    padding keys (``key_padding_mask`` ``[B, L]``, True = padding). ``L x L``: for tests and oracles."""
    mask = layout[0].repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[None, None]
    if global_tokens is not None:
        mask = mask | global_tokens[:, None, None, :]
    if key_padding_mask is not None:
        mask = mask & ~key_padding_mask[:, None, None, :]
    return mask


# ---------------------------------------------------------------------------------------------- kernel
def _masked_value(dtype: torch.dtype) -> float:
    # Half of the most negative finite value: adding a real score to it never overflows to -inf, so a
    # fully masked row (only padding queries have one) stays finite instead of turning into NaN.
    return torch.finfo(dtype).min / 2


def _dropout_drop_mask(shape, p: float, device) -> tuple[torch.Tensor, float]:
    """A random mask of the attention probabilities to drop, and the keep probability.

    CPU's ``bernoulli_`` (behind ``F.dropout``) is slow enough to be a visible share of a training
    step; instead each 63-bit random integer gives three 16-bit uniform numbers, dropped below
    ``round(p * 2**16)``: dropout with probability ``round(p * 2**16) / 2**16`` (p to within 1e-5).
    On GPUs plain ``bernoulli_`` is used.
    """
    if torch.device(device).type != "cpu":
        return torch.empty(shape, device=device).bernoulli_(p).bool(), 1.0 - p
    numel = math.prod(shape)
    threshold = round(p * 65536)
    random = torch.empty((numel + 2) // 3, dtype=torch.int64, device=device).random_()  # 63 random bits each
    lanes = random.view(torch.int16).view(-1, 4)  # the 16-bit lanes; the top lane lacks the sign bit
    lanes = lanes[:, :3] if sys.byteorder == "little" else lanes[:, 1:]
    drop = (lanes < threshold - 32768).view(-1)[:numel].view(shape)
    return drop, 1.0 - threshold / 65536


class _ScratchPool:
    """Reusable scratch buffers for temporaries that live within one forward or one backward call.

    Large fresh allocations come straight from the OS on every call (glibc serves them with mmap) and
    page-faulting them in costs as much as a good part of the arithmetic; keeping a few buffers per
    (size, dtype, device) avoids that. Only call-local temporaries go here, never tensors saved for
    backward, so re-running a backward (``retain_graph=True``) stays correct.
    """

    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = max_bytes
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.lock = threading.Lock()

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        with self.lock:
            stack = self.free.get((numel, dtype, device))
            if stack:
                return stack.pop()
        return torch.empty(numel, dtype=dtype, device=device)

    def give_back(self, *buffers: torch.Tensor) -> None:
        with self.lock:
            held = sum(t.numel() * t.element_size() for stack in self.free.values() for t in stack)
            for t in buffers:
                size = t.numel() * t.element_size()
                if held + size <= self.max_bytes:
                    self.free.setdefault((t.numel(), t.dtype, t.device), []).append(t)
                    held += size


_SCRATCH = _ScratchPool()


class _BandAttention(torch.autograd.Function):
    """Softmax attention of each query over its block row's band of keys plus a set of global keys.

    Inputs: ``q`` [B, H, L, D] (already scaled), ``k``, ``v`` [B, H, L, D], ``kg``/``vg`` [B, H, G, D]
    (global keys/values, G may be 0), ``band_masked`` [M, 3] (the (batch, block row, band column)
    triples to mask: outside the sequence, padding, or global keys), ``global_bias`` [B, G] (0 or a
    large negative value), ``half`` (window blocks each side). Output [B, H, L, D].

    All B * H heads are handled by the same few batched matmuls: the heads are laid end to end in one
    flat buffer of rows, ``pad = half * block`` zero rows before each head and after the last (a pad is
    shared by neighbouring heads), so that with ``P = L + pad`` rows per head the band of block ``i`` of
    head ``s`` starts at row ``(s * (nb + half) + i) * block``: one overlapping strided view ("window t
    starts at t * block") serves every head. The ``half`` windows per head that start inside a pad are
    computed and ignored (about ``half / nb`` extra work).
    """

    @staticmethod
    def _flat_rows(N, L, pad, extra):
        return pad + N * (L + pad) + pad + extra

    @staticmethod
    def _to_flat(x, pad, extra, scratch=False):
        """[N, L, D] -> [pad + N * (L + pad) + pad + extra, D], each head followed by pad zero rows."""
        N, L, D = x.shape
        rows = _BandAttention._flat_rows(N, L, pad, extra)
        if scratch:
            flat = _SCRATCH.take(rows * D, x.dtype, x.device).view(rows, D).zero_()
        else:
            flat = x.new_zeros(rows, D)
        flat[pad : pad + N * (L + pad)].view(N, L + pad, D)[:, :L] = x
        return flat

    @staticmethod
    def _from_flat(flat, N, L, pad):
        D = flat.shape[-1]
        return flat[pad : pad + N * (L + pad)].view(N, L + pad, D)[:, :L]

    @staticmethod
    def forward(ctx, q, k, v, kg, vg, band_masked, global_bias, block, half, dropout_p, training):
        B, H, L, D = q.shape
        N, nb, G = B * H, L // block, kg.shape[2]
        W = (2 * half + 1) * block
        pad, per_head = half * block, nb + half
        T = N * per_head  # number of windows (nb real + half ignored per head)
        use_dropout = training and dropout_p > 0.0
        q_flat = _BandAttention._to_flat(q.reshape(N, L, D), pad, W + G)
        k_flat = _BandAttention._to_flat(k.reshape(N, L, D), pad, W + G)
        v_flat = _BandAttention._to_flat(v.reshape(N, L, D), pad, W + G)
        q_win = q_flat[pad : pad + T * block].view(T, block, D)
        # Scores of every window in one batched matmul. Windows are W + G keys wide: the G columns after
        # the band are overwritten by the global scores below; this keeps the matmul's output the whole
        # contiguous buffer (a strided output falls back to a slow per-matrix loop on CPU).
        probs = torch.empty(T, block, W + G, dtype=q.dtype, device=q.device)
        probs.baddbmm_(q_win, k_flat.unfold(0, W + G, block)[:T], beta=0.0)
        if band_masked.shape[0]:
            # masked band columns, for all heads: only those (window, column) pairs are written
            b, row, col = band_masked.unbind(1)
            heads = torch.arange(H, device=q.device)
            windows = ((b[:, None] * H + heads[None, :]) * per_head + row[:, None]).reshape(-1)
            columns = col[:, None].expand(-1, H).reshape(-1)
            probs.transpose(1, 2)[windows, columns] = _masked_value(probs.dtype)
        per_window = probs.view(N, per_head, block, W + G)
        if G:
            glob = per_window[:, :nb, :, W:].view(N, L, G)
            glob.copy_(global_bias.repeat_interleave(H, 0)[:, None, :].expand(N, L, G))
            glob.baddbmm_(q.reshape(N, L, D), kg.reshape(N, G, D).transpose(1, 2))
        torch.softmax(probs, -1, out=probs)  # row-wise, in place
        # dropout: the dropped entries are zeroed here, the 1 / keep scale goes on the (small) outputs
        dropped, keep_prob = probs, 1.0
        if use_dropout:
            drop, keep_prob = _dropout_drop_mask(probs.shape, dropout_p, probs.device)
            dropped = probs.masked_fill(drop, 0.0)
        out_win = _SCRATCH.take(T * block * D, q.dtype, q.device).view(T, block, D)
        torch.bmm(dropped[..., :W], v_flat.unfold(0, W, block)[:T].transpose(1, 2), out=out_win)
        out = out_win.view(N, per_head, block, D)[:, :nb].clone().view(N, L, D)  # a copy: out_win is scratch
        _SCRATCH.give_back(out_win)
        if G:
            dropped_glob = dropped.view(N, per_head, block, W + G)[:, :nb, :, W:].view(N, L, G)
            out.baddbmm_(dropped_glob, vg.reshape(N, G, D))
        if use_dropout:
            out.mul_(1.0 / keep_prob)
        ctx.save_for_backward(q_flat, k_flat, v_flat, kg, vg, probs, dropped if use_dropout else None)
        ctx.shape = (B, H, L, D, block, half)
        ctx.dropout_scale = 1.0 / keep_prob if use_dropout else None
        return out.view(B, H, L, D)

    @staticmethod
    def backward(ctx, grad_out):
        q_flat, k_flat, v_flat, kg, vg, probs, dropped = ctx.saved_tensors
        B, H, L, D, block, half = ctx.shape
        N, nb, G = B * H, L // block, kg.shape[2]
        W = (2 * half + 1) * block
        pad, per_head = half * block, nb + half
        T = N * per_head
        n_diag = 2 * half + 1
        if dropped is None:
            dropped = probs
        kg3, vg3 = kg.reshape(N, G, D), vg.reshape(N, G, D)
        grad3 = grad_out.reshape(N, L, D)
        if ctx.dropout_scale is not None:  # the 1 / keep scale of the forward, moved onto dO
            grad3 = grad3 * ctx.dropout_scale
        do_flat = _BandAttention._to_flat(grad3, pad, W + G, scratch=True)
        do_win = do_flat[pad : pad + T * block].view(T, block, D)
        q_win = q_flat[pad : pad + T * block].view(T, block, D)
        q3 = _BandAttention._from_flat(q_flat, N, L, pad)
        k_wins = k_flat.unfold(0, W, block)[:T].transpose(1, 2)  # [T, W, D]
        v_wins_wide = v_flat.unfold(0, W + G, block)[:T]  # [T, D, W + G]
        dk_flat = _SCRATCH.take(k_flat.numel(), k_flat.dtype, k_flat.device).view_as(k_flat).zero_()
        dv_flat = _SCRATCH.take(v_flat.numel(), v_flat.dtype, v_flat.device).view_as(v_flat).zero_()
        dq = torch.empty(N, L, D, dtype=q_flat.dtype, device=q_flat.device)
        dkg = torch.empty_like(kg3)
        dvg = torch.empty_like(vg3)

        def glob_of(x, heads):  # the [heads, L, G] global-score part of a [heads * per_head, block, W + G] slice
            return x.view(heads, per_head, block, W + G)[:, :nb, :, W:].view(heads, L, G)

        # dV = P_dropped^T dO, diagonal by diagonal of the band (window t, block d -> key block t + d)
        for d in range(n_diag):
            dv_flat[d * block : (d + T) * block].view(T, block, D).baddbmm_(
                dropped[..., d * block : (d + 1) * block].transpose(1, 2), do_win
            )
        if G:
            torch.bmm(glob_of(dropped, N).transpose(1, 2), grad3, out=dvg)
        # the score gradients are a temporary as large as the probabilities: go a few heads at a time
        heads_per_chunk = max(1, (32 << 20) // (per_head * block * (W + G) * probs.element_size()))
        chunk_windows = min(N, heads_per_chunk) * per_head
        dscores_buffer = _SCRATCH.take(chunk_windows * block * (W + G), probs.dtype, probs.device)
        dscores_buffer = dscores_buffer.view(chunk_windows, block, W + G)
        dq_buffer = _SCRATCH.take(chunk_windows * block * D, probs.dtype, probs.device).view(chunk_windows, block, D)
        for s0 in range(0, N, heads_per_chunk):
            s1 = min(N, s0 + heads_per_chunk)
            t0, t1 = s0 * per_head, s1 * per_head
            ds = dscores_buffer[: t1 - t0]
            ds.baddbmm_(do_win[t0:t1], v_wins_wide[t0:t1], beta=0.0)  # dP = dO V^T
            if G:
                glob_of(ds, s1 - s0).baddbmm_(grad3[s0:s1], vg3[s0:s1].transpose(1, 2), beta=0.0)
            if ctx.dropout_scale is not None:
                ds.masked_fill_(dropped[t0:t1] == 0, 0.0)
            # dS = P * (dP - rowsum(P * dP)), fused and in place
            torch._softmax_backward_data(ds, probs[t0:t1], -1, probs.dtype, grad_input=ds)
            dq_win = torch.bmm(ds[..., :W], k_wins[t0:t1], out=dq_buffer[: t1 - t0])
            dq[s0:s1] = dq_win.view(s1 - s0, per_head, block, D)[:, :nb].reshape(s1 - s0, L, D)
            if G:
                ds_glob = glob_of(ds, s1 - s0)
                dq[s0:s1].baddbmm_(ds_glob, kg3[s0:s1])
                torch.bmm(ds_glob.transpose(1, 2), q3[s0:s1], out=dkg[s0:s1])
            for d in range(n_diag):
                dk_flat[(t0 + d) * block : (t1 + d) * block].view(t1 - t0, block, D).baddbmm_(
                    ds[..., d * block : (d + 1) * block].transpose(1, 2), q_win[t0:t1]
                )
        dk = _BandAttention._from_flat(dk_flat, N, L, pad).clone().view(B, H, L, D)  # copies out of the scratch
        dv = _BandAttention._from_flat(dv_flat, N, L, pad).clone().view(B, H, L, D)
        _SCRATCH.give_back(do_flat, dk_flat.view(-1), dv_flat.view(-1), dscores_buffer.view(-1), dq_buffer.view(-1))
        return (dq.view(B, H, L, D), dk, dv, dkg.view(B, H, G, D), dvg.view(B, H, G, D),
                None, None, None, None, None, None)


class _Plan:
    """Everything about the masks that does not depend on the heads, computed once per call."""

    def __init__(self, L, block, num_sliding_window_blocks, global_blocks, key_padding_mask, global_tokens, dtype):
        device = key_padding_mask.device
        B = key_padding_mask.shape[0]
        nb = L // block
        self.nb = nb
        self.half = min(num_sliding_window_blocks // 2, nb - 1)
        self.W = (2 * self.half + 1) * block
        self.pad = self.half * block
        neg = _masked_value(dtype)
        in_global_block = torch.zeros(L, dtype=torch.bool, device=device)
        for g in global_blocks:
            in_global_block[g * block : (g + 1) * block] = True
        self.global_block_rows = in_global_block.nonzero().flatten()  # token positions of global blocks
        valid = ~key_padding_mask
        global_key = (in_global_block[None, :] | global_tokens) & valid  # [B, L]
        counts = global_key.sum(1)
        G = int(counts.max()) if B else 0
        # global key indices per batch element, padded to G (padding entries masked by global_bias)
        order = torch.argsort((~global_key).to(torch.int8), dim=1, stable=True)
        self.global_index = order[:, :G]
        slot_valid = torch.arange(G, device=device)[None, :] < counts[:, None]
        self.global_bias = torch.zeros(B, G, dtype=dtype, device=device).masked_fill_(~slot_valid, neg)
        # band: keys outside the sequence, padding keys and global keys (counted in the global part)
        excluded = torch.ones(B, L + 2 * self.pad, dtype=torch.bool, device=device)
        excluded[:, self.pad : self.pad + L] = key_padding_mask | global_key
        band_mask = excluded.unfold(1, self.W, block)  # [B, nb, W]
        self.band_masked = band_mask.nonzero()  # [M, 3]: batch, block row, column in the band
        self.key_padding_mask = key_padding_mask


def _dense_rows(q_rows, k, v, key_padding_mask, dropout_p, training):
    """Plain softmax attention of a few query rows ``[B, H, R, D]`` (scaled) over all keys ``[B, H, L, D]``."""
    scores = torch.matmul(q_rows, k.transpose(-1, -2))
    scores = scores.masked_fill(key_padding_mask[:, None, None, :], _masked_value(scores.dtype))
    probs = torch.softmax(scores, -1)
    probs = torch.nn.functional.dropout(probs, dropout_p, training)
    return torch.matmul(probs, v)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    num_sliding_window_blocks: int,
    global_block_indices=(0,),
    global_block_end_indices=None,
    key_padding_mask: torch.Tensor | None = None,
    global_tokens: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention core of the block-sparse layout: ``q, k, v`` [B, H, L, D] -> context [B, H, L, D].

    ``L`` must be a multiple of ``block_size``. ``key_padding_mask`` [B, L] (True = padding: never
    attended, output row zero); ``global_tokens`` [B, L] (True = every query also attends to this
    token, with the regular key/value). The rows of global tokens are *not* recomputed here (that
    needs the global projections; ``BlockSparseSelfAttention`` does it). Equal, up to rounding, to
    ``scaled_dot_product_attention`` with ``dense_mask_from_layout(...)`` on non-padding rows.
    """
    B, H, L, D = q.shape
    if L % block_size:
        raise ValueError(f"sequence length {L} is not a multiple of block_size={block_size}; pad the input first")
    device = q.device
    if key_padding_mask is None:
        key_padding_mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    if global_tokens is None:
        global_tokens = torch.zeros(B, L, dtype=torch.bool, device=device)
    global_tokens = global_tokens & ~key_padding_mask
    nb = L // block_size
    global_blocks = global_blocks_of(nb, global_block_indices, global_block_end_indices)
    plan = _Plan(L, block_size, num_sliding_window_blocks, global_blocks, key_padding_mask, global_tokens, q.dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q = q * scale
    index = plan.global_index[:, None, :, None].expand(B, H, plan.global_index.shape[1], D)
    kg = k.gather(2, index)
    vg = v.gather(2, index)
    out = _BandAttention.apply(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        kg,
        vg,
        plan.band_masked,
        plan.global_bias,
        block_size,
        plan.half,
        float(dropout_p),
        bool(training),
    )
    rows = plan.global_block_rows
    if rows.numel():
        dense = _dense_rows(q[:, :, rows], k, v, key_padding_mask, dropout_p, training)
        out = out.index_copy(2, rows, dense)
    return out.masked_fill(key_padding_mask[:, None, :, None], 0.0)


# ---------------------------------------------------------------------------------------------- module
class BlockSparseSelfAttention(nn.Module):
    """Longformer self-attention on the block-sparse layout (``config.attention_backend == "block_sparse"``).

    Parameters as BERT's self-attention plus ``query_global, key_global, value_global``.
    ``forward(hidden_states [B, L, H], is_index_masked [B, L], is_index_global_attn [B, L])`` returns
    ``(context [B, L, H], None)``: the block-sparse kernel never builds attention matrices, so
    ``output_attentions`` gives ``None``. ``L`` must be a multiple of ``config.sparse_block_size``.
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
        self.block_size = config.sparse_block_size
        self.num_sliding_window_blocks = config.layer_sliding_window_blocks(layer_id)
        self.global_block_indices = list(config.global_block_indices)
        self.global_block_end_indices = (
            None if config.global_block_end_indices is None else list(config.global_block_end_indices)
        )
        # "auto": FlexAttention on CUDA GPUs that support it when no dropout applies (see flex.py),
        # the pure-PyTorch kernel elsewhere; "torch" / "flex" force one path.
        self.kernel = "auto"

    def _use_flex(self, q: torch.Tensor) -> bool:
        if self.kernel == "torch":
            return False
        from .flex import flex_supported

        dropout_applies = self.training and self.dropout > 0.0
        if self.kernel == "flex":
            if dropout_applies:
                raise ValueError("kernel='flex' has no attention dropout; use eval mode, dropout 0 or kernel='torch'")
            if not flex_supported(q.device, needs_backward=torch.is_grad_enabled()):
                raise ValueError(f"FlexAttention does not run on {q.device} here; use kernel='torch'")
            return True
        return q.is_cuda and not dropout_applies and flex_supported(q.device)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states, is_index_masked, is_index_global_attn, output_attentions=False):
        B, L, _ = hidden_states.shape
        if L % self.block_size:
            raise ValueError(
                f"sequence length {L} is not a multiple of sparse_block_size={self.block_size} "
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
        )
        if self._use_flex(q):
            from .flex import flex_block_sparse_attention

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
            # W (sum p h) + b). Same result, O(Gq L E) instead of O(L E^2).
            w_k = self.key_global.weight.view(nh, D, E)
            w_v = self.value_global.weight.view(nh, D, E)
            q_in = torch.einsum("bhgd,hde->bhge", q_g, w_k).reshape(B, nh * Gq, E)
            # (batched over B only: broadcasting hidden_states over heads would copy it per head)
            scores = torch.bmm(q_in, hidden_states.transpose(1, 2))  # [B, nh * Gq, L]
            scores = scores.masked_fill(is_index_masked[:, None, :], _masked_value(scores.dtype))
            probs = torch.softmax(scores, -1)
            probs = torch.nn.functional.dropout(probs, self.dropout, self.training)
            mixed = torch.bmm(probs, hidden_states).view(B, nh, Gq, E)
            out_g = torch.einsum("bhge,hde->bhgd", mixed, w_v) + self.value_global.bias.view(1, nh, 1, D)
        else:
            k_g = self._heads(self.key_global(hidden_states))
            v_g = self._heads(self.value_global(hidden_states))
            out_g = _dense_rows(q_g, k_g, v_g, is_index_masked, self.dropout, self.training)
        out_g = out_g.transpose(1, 2).reshape(B * Gq, E)
        flat_index = (index + torch.arange(B, device=index.device)[:, None] * L).reshape(-1)
        keep = valid.reshape(-1)
        flat = context.reshape(B * L, E).index_copy(0, flat_index[keep], out_g[keep])
        return flat.view(B, L, E)
