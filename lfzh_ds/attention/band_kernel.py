"""The band kernel: block-sparse attention (the layout of ``layout.py``) in pure PyTorch, forward and
backward written out, whose time and memory grow linearly with the sequence length.

Token mode (``token_window=w``): with ``k`` band blocks each side and ``k * block`` equal to ``w`` or
``w + 1``, the band holds every key within ``w`` tokens of a query, and the keys farther than ``w`` all
lie in the band's two outermost blocks, in a triangle that is the same for every block row: two fixed
``[block, block]`` masks, added to those two blocks of the scores.

How the kernel works (``_BandAttention``, forward and backward written out; ``_Plan`` the layout):

* The keys a query block sees split into the *band* (its own block and ``w`` blocks each side:
  ``W = (2w + 1) * block`` keys, the same for every block row) and the *global keys* (tokens of the
  global blocks plus the token-level global tokens, ``G`` of them). A global key that also lies in
  a row's band is masked there, so it is counted once.
* All heads sit end to end in one zero-padded buffer, so the band of every block row of every head
  is one overlapping strided view (no copy), and the scores of a chunk of heads are one batched
  matmul ``[windows, block, D] @ [windows, D, W]``, written next to the global scores ``[L, G]`` in
  one buffer ``[windows, block, W + G]`` and normalised in place by one fused softmax.
* Chunks (whole heads, or runs of one head's windows when a head alone is too big) are sized to stay
  in the CPU's last-level cache from the scores to the output. For backward each chunk's
  probabilities are kept, signed by dropout (``P`` where kept, ``-P`` where dropped: no mask to keep
  or regenerate), or, on GPUs, recomputed like FlashAttention (one more matmul; dropout masks
  regenerated from a seed), keeping only q, k and v.
* Global query rows (the rows of global blocks) attend to every key: a few dense rows, chunked the
  same way and written over the band result.
* The key/value gradients of the overlapping windows are accumulated diagonal by diagonal.
* Temporaries, and the kept probabilities once backward has used them, are recycled between calls
  (fresh large allocations are page-faulted in anew every time, which costs as much as a good part
  of the arithmetic on CPU).

Nothing of size ``L x L`` is ever built: a layer keeps O(L W) memory for backward (O(L D) when it
recomputes), linear in the length.
"""
from __future__ import annotations

import math
import threading

import torch

from .layout import global_blocks_of, token_masks

__all__ = ["block_sparse_attention", "empty_cache", "masked_value"]


def masked_value(dtype: torch.dtype) -> float:
    """The score of a masked key: half of the most negative finite value, so adding a real score to it never
    overflows to -inf and a fully masked row (only padding queries have one) stays finite instead of NaN."""
    return torch.finfo(dtype).min / 2


def _dropout_keep_mask(out: torch.Tensor, p: float, generator: torch.Generator | None = None) -> float:
    """Fills the float tensor ``out`` with 1 (kept) or 0 (dropped) and returns the keep probability.

    CPU's ``bernoulli_`` (behind ``F.dropout``) costs more than the attention's matmuls; instead
    64-bit random integers are cut into four 16-bit uniform numbers each, dropped below
    ``round(p * 2**16)``: dropout with probability ``round(p * 2**16) / 2**16`` (p to within 1e-5).
    On GPUs plain ``bernoulli_`` is used. The same ``generator`` state gives the same mask.
    """
    keep = _keep_probability(p, out.device)
    if out.device.type != "cpu":
        out.bernoulli_(keep, generator=generator)
        return keep
    bits = torch.empty((out.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    lanes = bits.view(torch.int16)[: out.numel()].view(out.shape)
    torch.ge(lanes, round(p * 65536) - 32768, out=out)  # straight into floats: 2.5x faster than bool then copy
    return keep


def _keep_probability(p: float, device: torch.device) -> float:
    return 1.0 - (p if device.type != "cpu" else round(p * 65536) / 65536)


class _ScratchPool:
    """Reusable buffers: the temporaries of one forward or backward call, and the probabilities kept
    from forward to backward (given back once backward has used them, unless the graph is retained).

    Large fresh allocations come straight from the OS on every call (glibc serves them with mmap, or
    trims them off the heap when freed) and page-faulting them in costs as much as a good part of the
    arithmetic; keeping buffers per (size, dtype, device), up to ``max_bytes`` in all, avoids that.
    Returned tensors never come from here. ``empty_cache()`` hands the buffers back to the allocator.
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self.free: dict[tuple, list[torch.Tensor]] = {}  # least recently returned sizes first
        self.held = 0
        self.lock = threading.Lock()

    def take(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (math.prod(shape), dtype, device)
        with self.lock:
            stack = self.free.get(key)
            if stack:
                buffer = stack.pop()
                self.held -= buffer.numel() * buffer.element_size()
                if not stack:
                    del self.free[key]
                return buffer.view(shape)
        return torch.empty(shape, dtype=dtype, device=device)

    def give_back(self, *buffers: torch.Tensor) -> None:
        with self.lock:
            for t in buffers:
                size = t.numel() * t.element_size()
                if size > self.max_bytes:
                    continue
                key = (t.numel(), t.dtype, t.device)
                self.free[key] = self.free.pop(key, []) + [t.view(-1)]  # (re)inserted as the most recent size
                self.held += size
            while self.held > self.max_bytes:  # sizes no longer used (another length) go first
                key = next(iter(self.free))
                evicted = self.free[key].pop(0)
                self.held -= evicted.numel() * evicted.element_size()
                if not self.free[key]:
                    del self.free[key]

    def clear(self) -> None:
        with self.lock:
            self.free.clear()
            self.held = 0


_SCRATCH = _ScratchPool()


def empty_cache() -> None:
    """Frees the kernel's reusable buffers (up to 1 GB held between calls, like torch's CUDA cache)."""
    _SCRATCH.clear()


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); True if torch cannot tell."""
    keeps = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keeps is None else bool(keeps())

# Bytes of scores per chunk: on CPU small enough that a chunk's scores stay in the last-level
# cache from the matmul through the softmax to the next matmul; on GPUs large, so few kernels launch.
_CHUNK_BYTES = {"cpu": 16 << 20}
_CHUNK_BYTES_ELSEWHERE = 512 << 20
# Keep the probabilities for backward (device types listed True) or recompute them (FlashAttention
# style). On CPU, where memory is plentiful and arithmetic scarce, keeping them makes a layer's
# forward+backward about 1.2x faster, with or without dropout (whose masks need not be regenerated); on
# GPUs, where memory is the scarce resource and a matmul is cheap, they are recomputed.
_SAVE_PROBABILITIES = {"cpu": True}


class _Chunk:
    """Heads ``s0:s1``, block rows ``w0:w1`` of each (all of them unless the chunk is part of one head):
    token rows ``r0:r1`` of those heads, windows ``t0:t1`` of the flat layout."""

    def __init__(self, s0: int, s1: int, w0: int, w1: int, nb: int, block: int):
        self.s0, self.s1, self.w0, self.w1 = s0, s1, w0, w1
        self.r0, self.r1 = w0 * block, w1 * block
        self.t0, self.t1 = s0 * nb + w0, (s1 - 1) * nb + w1


class _Plan:
    """Everything one kernel call needs besides the tensors: the masks and the flat-row geometry.

    Flat layout: all ``N = B * H`` heads end to end in one buffer of rows, between ``pad = half *
    block`` zero rows before the first head and after the last, so window ``t = s * nb + i`` (head
    ``s``, block row ``i``) starts at flat row ``t * block`` and covers exactly its band of ``W = (2
    half + 1) block`` keys: the bands of all windows of all heads are one overlapping strided view. A
    band that reaches past its head's first or last row sees the neighbouring head's rows (or the
    zero pads) there; those columns are masked like any key outside the sequence. Windows are ``W +
    G`` keys wide: the ``G`` columns after the band are overwritten with the scores of the global
    keys, which keeps each matmul's output one contiguous buffer (a strided output falls back to a
    slow per-matrix loop on CPU).

    Masks: a key is attended in the band unless it lies outside the sequence, is padding or is a
    global key (those are counted once, in the global columns), or, in token mode, is farther than the
    token window from the query (``edge_bias``: the two outermost band blocks); the global keys of each batch element
    (tokens of global blocks and token-level global tokens, padded to ``G`` with masked slots); the
    rows of global blocks, which attend every key.
    """

    def __init__(self, q, block, num_sliding_window_blocks, global_blocks, key_padding_mask, global_tokens,
                 token_window=None):
        B, H, L, D = q.shape
        device, dtype = q.device, q.dtype
        self.B, self.H, self.L, self.D, self.N = B, H, L, D, B * H
        self.block, self.nb = block, L // block
        self.half = min(num_sliding_window_blocks // 2, self.nb - 1)
        self.W = (2 * self.half + 1) * block
        self.pad = self.half * block
        self.T = self.N * self.nb
        neg = masked_value(dtype)
        # token mode: query row r of a block sees band column c of the first block at distance
        # half * block + r - c, and column c of the last block at half * block + c - r. (A band clipped
        # to a short sequence holds no key farther than the window: nothing to mask.)
        self.edge_bias = None
        if token_window is not None and self.half == num_sliding_window_blocks // 2:
            r = torch.arange(block, device=device)
            too_far = (self.half * block + r[:, None] - r[None, :]) > token_window  # [row, column] of the first block
            first = torch.zeros(block, block, dtype=dtype, device=device).masked_fill_(too_far, neg)
            self.edge_bias = (first, first.T.contiguous())

        in_global_block = torch.zeros(L, dtype=torch.bool, device=device)
        for g in global_blocks:
            in_global_block[g * block : (g + 1) * block] = True
        self.global_rows = in_global_block.nonzero().flatten()  # token positions of global blocks
        valid = ~key_padding_mask
        global_key = (in_global_block[None, :] | global_tokens) & valid  # [B, L]
        counts = global_key.sum(1)
        G = int(counts.max()) if B else 0
        self.G = G = G + (-(self.W + G)) % 8 if G else 0  # (W + G) % 8 == 0: matmuls of ragged width run ~10% slower
        order = torch.argsort((~global_key).to(torch.int8), dim=1, stable=True)
        order = torch.nn.functional.pad(order, (0, max(0, G - L)))  # slots past the last global key: masked below
        self.global_index = order[:, :G].repeat_interleave(H, 0)  # [N, G]
        slot_valid = torch.arange(G, device=device)[None, :] < counts[:, None]
        self.global_bias = torch.zeros(B, G, dtype=dtype, device=device).masked_fill_(~slot_valid, neg)
        self.global_bias = self.global_bias.repeat_interleave(H, 0)  # [N, G]
        # padding as float factors and biases: on CPU, masked_fill with a bool mask is several times slower
        self.padding_bias = self.valid_rows = None
        if bool(key_padding_mask.any()):
            padding = key_padding_mask.repeat_interleave(H, 0)  # [N, L]
            self.padding_bias = torch.zeros(self.N, 1, L, dtype=dtype, device=device).masked_fill_(padding[:, None], neg)
            self.valid_rows = (~padding).to(dtype)[:, :, None]  # [N, L, 1]

        self.width = self.W + G
        self.flat_rows = self.pad + self.N * L + self.pad + self.width
        budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES_ELSEWHERE)
        element = torch.finfo(dtype).bits // 8
        # a chunk is several whole heads or, when one head's scores exceed the budget (long sequences), a
        # run of one head's windows: its scores stay bounded whatever the length
        head_bytes = L * self.width * element
        heads_per_chunk = max(1, min(self.N, budget // head_bytes))
        windows_per_chunk = self.nb if head_bytes <= budget else max(1, budget // (block * self.width * element))
        self.chunks = [
            _Chunk(s0, min(self.N, s0 + heads_per_chunk), w0, min(self.nb, w0 + windows_per_chunk), self.nb, block)
            for s0 in range(0, self.N, heads_per_chunk)
            for w0 in range(0, self.nb, windows_per_chunk)
        ]
        heads_per_dense_chunk = max(1, min(self.N, budget // (max(1, len(self.global_rows)) * L * element)))
        self.dense_chunks = [
            (s0, min(self.N, s0 + heads_per_dense_chunk)) for s0 in range(0, self.N, heads_per_dense_chunk)
        ]

        excluded = torch.ones(B, L + 2 * self.pad, dtype=torch.bool, device=device)
        excluded[:, self.pad : self.pad + L] = key_padding_mask | global_key
        band_masked = excluded.unfold(1, self.W, block).nonzero()  # [M, 3]: batch, block row, band column
        self.chunk_masks = self._chunk_masks(band_masked)

    def _chunk_masks(self, band_masked: torch.Tensor) -> list:
        """Per chunk, the (window in chunk, band column) pairs to mask (the same for every head of a
        batch element)."""
        if not band_masked.shape[0]:
            return [None] * len(self.chunks)
        b, row, col = band_masked.unbind(1)
        heads = (b[:, None] * self.H + torch.arange(self.H, device=b.device)[None, :]).reshape(-1)
        windows = heads * self.nb + row.repeat_interleave(self.H)
        sizes = torch.tensor([c.t1 - c.t0 for c in self.chunks], device=b.device)  # chunks cover the windows in order
        chunk = torch.repeat_interleave(torch.arange(len(self.chunks), device=b.device), sizes)[windows]
        order = torch.argsort(chunk, stable=True)
        chunk, windows, columns = chunk[order], windows[order], col.repeat_interleave(self.H)[order]
        counts = torch.bincount(chunk, minlength=len(self.chunks)).tolist()
        return [
            (w - c.t0, cols) if w.numel() else None
            for c, w, cols in zip(self.chunks, windows.split(counts), columns.split(counts))
        ]

    # views of the layouts
    def to_flat(self, x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """[B, H, L, D] (any strides) -> a scratch [flat_rows, D] in the flat layout (optionally scaled)."""
        flat = _SCRATCH.take((self.flat_rows, self.D), x.dtype, x.device)
        flat[: self.pad].zero_()
        flat[self.pad + self.N * self.L :].zero_()
        rows = self.rows_of_flat(flat).view(self.B, self.H, self.L, self.D)
        if scale is None:
            rows.copy_(x)
        else:
            torch.mul(x, scale, out=rows)
        return flat

    def rows_of_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """The [N, L, D] rows of the heads in a flat buffer."""
        return flat[self.pad : self.pad + self.N * self.L].view(self.N, self.L, self.D)

    def windows(self, flat: torch.Tensor) -> torch.Tensor:
        """The query-block rows of every window, [T, block, D], of a flat buffer."""
        return flat[self.pad : self.pad + self.T * self.block].view(self.T, self.block, self.D)

    def bands(self, flat: torch.Tensor, width: int) -> torch.Tensor:
        """The keys of every window, [T, D, width] (overlapping strided view, no copy)."""
        return flat.unfold(0, width, self.block)[: self.T]

    def glob(self, x: torch.Tensor, chunk: _Chunk) -> torch.Tensor:
        """The [heads, rows, G] global-key columns of a chunk's [windows, block, W + G] scores."""
        return x.view(chunk.s1 - chunk.s0, chunk.r1 - chunk.r0, self.width)[..., self.W :]

    def gather_globals(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, G, D]: the global keys (or values) of [N, L, D] ``rows``."""
        return rows.gather(1, self.global_index[:, :, None].expand(self.N, self.G, self.D))

    # probabilities, identical in forward and backward
    def band_probs(self, chunk, q_flat, k_flat, kg):
        """Softmax over band + global keys of the windows of chunk ``chunk``: [windows, block, W + G],
        in a buffer from ``_SCRATCH``."""
        c = self.chunks[chunk]
        probs = _SCRATCH.take((c.t1 - c.t0, self.block, self.width), q_flat.dtype, q_flat.device)
        probs.baddbmm_(self.windows(q_flat)[c.t0 : c.t1], self.bands(k_flat, self.width)[c.t0 : c.t1], beta=0.0)
        if self.edge_bias is not None:
            probs[..., : self.block].add_(self.edge_bias[0])
            probs[..., self.W - self.block : self.W].add_(self.edge_bias[1])
        if self.chunk_masks[chunk] is not None:
            probs.transpose(1, 2)[self.chunk_masks[chunk]] = masked_value(probs.dtype)
        if self.G:
            glob = self.glob(probs, c)
            glob.copy_(self.global_bias[c.s0 : c.s1, None, :].expand(glob.shape))
            glob.baddbmm_(self.rows_of_flat(q_flat)[c.s0 : c.s1, c.r0 : c.r1], kg[c.s0 : c.s1].transpose(1, 2))
        torch.softmax(probs, -1, out=probs)  # row-wise, in place
        return probs

    def dense_probs(self, s0, s1, q_global, k_rows):
        """Softmax of the global-block rows ``q_global`` [N, R, D] over all keys, heads s0:s1: [heads, R, L],
        in a buffer from ``_SCRATCH``."""
        probs = _SCRATCH.take((s1 - s0, q_global.shape[1], self.L), q_global.dtype, q_global.device)
        if self.padding_bias is None:
            torch.bmm(q_global[s0:s1], k_rows[s0:s1].transpose(1, 2), out=probs)
        else:
            torch.baddbmm(self.padding_bias[s0:s1], q_global[s0:s1], k_rows[s0:s1].transpose(1, 2), out=probs)
        torch.softmax(probs, -1, out=probs)
        return probs


class _Dropout:
    """Attention dropout whose masks can be regenerated: each chunk draws from its own generator,
    seeded from one number taken from torch's default generator in forward. The masks hold 0 / 1;
    the 1 / keep scale goes on the (narrow) outputs and output gradients instead."""

    def __init__(self, p: float, device: torch.device):
        self.p, self.device = p, device
        self.seed = int(torch.randint(0, 2**62, (1,)).item())
        self.keep = _keep_probability(p, torch.device(device))

    def dropped(self, probs: torch.Tensor, stream: int) -> torch.Tensor:
        """A scratch copy of ``probs`` with the dropped entries zeroed; give it back to ``_SCRATCH``."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed + stream)
        mask = _SCRATCH.take(probs.shape, probs.dtype, probs.device)
        _dropout_keep_mask(mask, self.p, generator)
        return mask.mul_(probs)


def _forward_probs(probs, dropout, stream, saving):
    """The probabilities to multiply the values with (``probs`` after dropout) and the scratch buffers
    to give back after that. When ``probs`` is kept for backward it is turned into *signed*
    probabilities: ``P`` where kept, ``-P`` where dropped (one tensor holds both what backward needs:
    ``P = |S|``, the dropped probabilities ``max(S, 0)``)."""
    scratch = () if saving else (probs,)
    if dropout is None:
        return probs, scratch
    dropped = dropout.dropped(probs, stream)
    if saving:
        probs.lerp_(dropped, 2.0)  # 2 * dropped - P: exactly P or -P
    return dropped, scratch + (dropped,)


def _backward_probs(saved, recompute, dropout, stream):
    """``(P, P after dropout, scratch buffers to give back)`` in backward, from the signed
    probabilities kept by forward (``saved``) or recomputed by ``recompute()`` (dropout masks
    regenerated from their seed)."""
    if saved is None:
        probs = recompute()
        if dropout is None:
            return probs, probs, (probs,)
        dropped = dropout.dropped(probs, stream)
        return probs, dropped, (probs, dropped)
    if dropout is None:
        return saved, saved, ()
    probs = torch.abs(saved, out=_SCRATCH.take(saved.shape, saved.dtype, saved.device))
    dropped = torch.clamp(saved, min=0.0, out=_SCRATCH.take(saved.shape, saved.dtype, saved.device))
    return probs, dropped, (probs, dropped)


def _softmax_backward_(ds: torch.Tensor, probs: torch.Tensor, dropped: torch.Tensor) -> None:
    """In place: ``ds`` from dP to dS. Without dropout (``dropped is probs``): dS = P (dP - rowsum(P dP)).
    With dropout, whose ``dropped`` probabilities forward multiplied the values with:
    dS = dropped dP - P rowsum(dropped dP)."""
    if dropped is probs:
        torch._softmax_backward_data(ds, probs, -1, probs.dtype, grad_input=ds)
        return
    ds.mul_(dropped)
    ds.addcmul_(probs, ds.sum(-1, keepdim=True), value=-1.0)


class _BandAttention(torch.autograd.Function):
    """Block-sparse softmax attention, forward and backward written out (see ``_Plan`` for the layout).

    Inputs: ``q, k, v`` [B, H, L, D] (any strides, ``q`` unscaled), the ``_Plan``, the softmax
    ``scale``, dropout, whether to keep the probabilities. Output [B, H, L, D] (zero on padding rows).

    Band rows go through in chunks (whole heads, or runs of one head's windows at long lengths): per
    chunk the scores are one batched matmul, normalised in place by one fused softmax, then multiplied
    with the values; the rows of global blocks are a few dense rows, done the same way. For backward
    the probabilities are either kept (signed by dropout, ``O(L W)`` memory: 126 MB per layer at
    L=4096, 12 heads, fp32) or, like FlashAttention, recomputed per chunk (one more matmul and softmax;
    dropout masks regenerated from their seed), keeping only q, k and v. ``_SAVE_PROBABILITIES``
    chooses per device type.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan, scale, dropout_p, training, saving):
        p = plan
        N, G, D, W, block = p.N, p.G, p.D, p.W, p.block
        dropout = _Dropout(dropout_p, q.device) if training and dropout_p > 0.0 else None
        saved = []
        q_flat, k_flat, v_flat = p.to_flat(q, scale), p.to_flat(k), p.to_flat(v)
        k_rows, v_rows = p.rows_of_flat(k_flat), p.rows_of_flat(v_flat)
        kg, vg = p.gather_globals(k_rows), p.gather_globals(v_rows)
        v_bands = p.bands(v_flat, W).transpose(1, 2)  # [T, W, D]
        out = q.new_empty(p.T, block, D)
        out_rows = out.view(N, p.L, D)
        for i, c in enumerate(p.chunks):
            probs = p.band_probs(i, q_flat, k_flat, kg)
            dropped, scratch = _forward_probs(probs, dropout, i, saving)
            torch.bmm(dropped[..., :W], v_bands[c.t0 : c.t1], out=out[c.t0 : c.t1])
            if G:
                out_rows[c.s0 : c.s1, c.r0 : c.r1].baddbmm_(p.glob(dropped, c), vg[c.s0 : c.s1])
            _SCRATCH.give_back(*scratch)
            saved += [probs] if saving else []
        if len(p.global_rows):
            q_global = p.rows_of_flat(q_flat).index_select(1, p.global_rows)  # [N, R, D]
            for j, (s0, s1) in enumerate(p.dense_chunks):
                probs = p.dense_probs(s0, s1, q_global, k_rows)
                dropped, scratch = _forward_probs(probs, dropout, len(p.chunks) + j, saving)
                out_rows[s0:s1].index_copy_(1, p.global_rows, torch.bmm(dropped, v_rows[s0:s1]))
                _SCRATCH.give_back(*scratch)
                saved += [probs] if saving else []
        if dropout is not None:
            out.mul_(1.0 / dropout.keep)
        if p.valid_rows is not None:
            out_rows.mul_(p.valid_rows)
        _SCRATCH.give_back(q_flat, k_flat, v_flat)
        ctx.save_for_backward(q, k, v, *saved)
        ctx.plan, ctx.scale, ctx.dropout = plan, scale, dropout
        return out_rows.view(p.B, p.H, p.L, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, *saved = ctx.saved_tensors
        p, scale, dropout = ctx.plan, ctx.scale, ctx.dropout
        N, G, D, W, block = p.N, p.G, p.D, p.W, p.block
        q_flat, k_flat, v_flat = p.to_flat(q, scale), p.to_flat(k), p.to_flat(v)
        do_flat = p.to_flat(grad_out, None if dropout is None else 1.0 / dropout.keep)  # the forward's 1 / keep
        q_rows, k_rows, v_rows, do_rows = (p.rows_of_flat(x) for x in (q_flat, k_flat, v_flat, do_flat))
        kg, vg = p.gather_globals(k_rows), p.gather_globals(v_rows)
        if p.valid_rows is not None:  # padding rows' outputs are constant zeros
            do_rows.mul_(p.valid_rows)
        R = len(p.global_rows)
        if R:  # global-block rows come from the dense part: keep their dO for it, hide it from the band
            do_global = do_rows.index_select(1, p.global_rows)
            do_rows.index_fill_(1, p.global_rows, 0.0)
        q_win, do_win = p.windows(q_flat), p.windows(do_flat)
        k_bands = p.bands(k_flat, W).transpose(1, 2)  # [T, W, D]
        v_bands = p.bands(v_flat, p.width)  # [T, D, W + G]
        dq = q.new_empty(p.T, block, D)
        dq_rows = dq.view(N, p.L, D)
        dk_flat = q.new_zeros(p.flat_rows, D)
        dv_flat = q.new_zeros(p.flat_rows, D)
        dk_rows, dv_rows = p.rows_of_flat(dk_flat), p.rows_of_flat(dv_flat)
        dkg, dvg = torch.zeros_like(kg), torch.zeros_like(vg)  # sums over the chunks of a head
        for i, c in enumerate(p.chunks):
            t0, t1, heads, rows = c.t0, c.t1, slice(c.s0, c.s1), slice(c.r0, c.r1)
            probs, dropped, scratch = _backward_probs(
                saved[i] if saved else None, lambda: p.band_probs(i, q_flat, k_flat, kg), dropout, i
            )
            ds = _SCRATCH.take(probs.shape, q.dtype, q.device)
            ds.baddbmm_(do_win[t0:t1], v_bands[t0:t1], beta=0.0)  # dP = dO V^T
            if G:
                p.glob(ds, c).baddbmm_(do_rows[heads, rows], vg[heads].transpose(1, 2), beta=0.0)
            _softmax_backward_(ds, probs, dropped)
            # dV += P'^T dO and dK += dS^T Q: band column block d of window t is key block t + d
            for d in range(2 * p.half + 1):
                columns = slice(d * block, (d + 1) * block)
                keys = slice((t0 + d) * block, (t1 + d) * block)
                dv_flat[keys].view(t1 - t0, block, D).baddbmm_(dropped[..., columns].transpose(1, 2), do_win[t0:t1])
                dk_flat[keys].view(t1 - t0, block, D).baddbmm_(ds[..., columns].transpose(1, 2), q_win[t0:t1])
            torch.bmm(ds[..., :W], k_bands[t0:t1], out=dq[t0:t1])
            if G:
                dvg[heads].baddbmm_(p.glob(dropped, c).transpose(1, 2), do_rows[heads, rows])
                ds_glob = p.glob(ds, c)
                dq_rows[heads, rows].baddbmm_(ds_glob, kg[heads])
                dkg[heads].baddbmm_(ds_glob.transpose(1, 2), q_rows[heads, rows])
            _SCRATCH.give_back(ds, *scratch)
        if G:  # the global keys are rows of k and v
            index = p.global_index[:, :, None].expand(N, G, D)
            dk_rows.scatter_add_(1, index, dkg)
            dv_rows.scatter_add_(1, index, dvg)
        if R:
            q_global = q_rows.index_select(1, p.global_rows)
            for j, (s0, s1) in enumerate(p.dense_chunks):
                probs, dropped, scratch = _backward_probs(
                    saved[len(p.chunks) + j] if saved else None,
                    lambda: p.dense_probs(s0, s1, q_global, k_rows), dropout, len(p.chunks) + j,
                )
                ds = torch.bmm(do_global[s0:s1], v_rows[s0:s1].transpose(1, 2),
                               out=_SCRATCH.take(probs.shape, q.dtype, q.device))
                _softmax_backward_(ds, probs, dropped)
                dq_rows[s0:s1].index_copy_(1, p.global_rows, torch.bmm(ds, k_rows[s0:s1]))
                dk_rows[s0:s1].baddbmm_(ds.transpose(1, 2), q_global[s0:s1])
                dv_rows[s0:s1].baddbmm_(dropped.transpose(1, 2), do_global[s0:s1])
                _SCRATCH.give_back(ds, *scratch)
        dq.mul_(scale)
        _SCRATCH.give_back(q_flat, k_flat, v_flat, do_flat)
        if not _graph_is_kept():  # the kept probabilities are used up: recycle them for the next forward
            _SCRATCH.give_back(*saved)
        shape = (p.B, p.H, p.L, D)
        return dq_rows.view(shape), dk_rows.view(shape), dv_rows.view(shape), None, None, None, None, None


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
    token_window: int | None = None,
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
    ``token_window`` (token mode): the band is cut to the keys within that many tokens of each query
    (Longformer's one-sided window); needs ``(num_sliding_window_blocks // 2) * block_size`` equal to
    it or one more (``configuration.token_window_blocks`` picks such a geometry) and no global blocks.
    The output may be a strided view.
    """
    B, H, L, D = q.shape
    key_padding_mask, global_tokens = token_masks(q, block_size, num_sliding_window_blocks, global_block_indices,
                                                  token_window, key_padding_mask, global_tokens)
    global_blocks = global_blocks_of(L // block_size, global_block_indices, global_block_end_indices)
    plan = _Plan(q, block_size, num_sliding_window_blocks, global_blocks, key_padding_mask, global_tokens, token_window)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # (inside autograd.Function.forward grad mode is always off and needs_input_grad ignores no_grad)
    saving = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    saving = saving and _SAVE_PROBABILITIES.get(q.device.type, False)
    return _BandAttention.apply(q, k, v, plan, scale, float(dropout_p), bool(training), saving)