"""Attention benchmark: block-sparse kernel vs transformers' Longformer vs dense SDPA (vs FlexAttention).

Side by side in one run, at hidden 768 / 12 heads / window 512 (block 64, 9 window blocks), batch 1,
fp32, dropout 0:

* ``bs core``      ``block_sparse_attention(q, k, v)`` in block mode (the kernel, global block 0 as configured)
* ``bs core+4g``   the same with 4 token-level global tokens (the "handful of globals" target)
* ``bs module``    ``BlockSparseSelfAttention`` in block mode (q/k/v projections + kernel)
* ``bs module+4g`` the module with 4 global tokens (adds the global-projection rows)
* ``tok core``     the kernel in token mode (exact Longformer: 256 tokens each side, no global block)
* ``tok core+4g``  the same with 4 global tokens
* ``tok module``   ``BlockSparseSelfAttention`` in token mode (the model's default; what ``hf module`` computes)
* ``tok module+4g`` the token-mode module with 4 global tokens
* ``hf module``    transformers' ``LongformerSelfAttention`` (projections + sliding chunks), no globals
* ``sdpa core``    dense ``scaled_dot_product_attention(q, k, v)`` (no mask: the quadratic baseline)
* ``flex core``    compiled FlexAttention on the same block mask (built once, outside the timing), forward
                   only on CPU (it has no backward there)

On a GPU (``--device cuda``, ``--dtype fp16`` / ``bf16`` for half-precision inputs and modules) peak memory is
the CUDA allocator's peak during the call, measured in this process.

Times are medians over ``--rounds`` interleaved rounds (every implementation once per round, so drift
of a shared machine hits all alike). Peak memory is measured in a fresh subprocess per
(implementation, length): the growth of the resident set (VmHWM after resetting it) over the inputs.

    python benchmarks/attention.py                          # L = 1024 2048 4096
    python benchmarks/attention.py --lengths 4096 8192 16384 --impls "bs core" "bs module" "hf module"
    python benchmarks/attention.py --lengths 1024 4096 16384 --impls "bs core" "tok core" "bs module" "tok module" "hf module"
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python benchmarks/attention.py
    python benchmarks/attention.py --device cuda --dtype bf16 --lengths 4096 16384 --rounds 10
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from transformers import LongformerConfig
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

from lfzh_ds.attention.band_kernel import block_sparse_attention
from lfzh_ds.attention.block_sparse import BlockSparseSelfAttention
from lfzh_ds.attention.flex import FlexBlockSparse
from lfzh_ds.configuration import LongformerZhConfig

HIDDEN, HEADS, WINDOW, BLOCK = 768, 12, 512, 64
HEAD_DIM = HIDDEN // HEADS
NUM_GLOBAL_TOKENS = 4
ALL_IMPLS = ["bs core", "bs core+4g", "bs module", "bs module+4g", "tok core", "tok core+4g", "tok module",
             "tok module+4g", "hf module", "sdpa core", "flex core"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE, DTYPE = "cpu", torch.float32  # set by --device / --dtype
# The ratios printed under "Targets": (slower, faster, columns of the time table, target); columns 0 fwd, 1 fwd+bwd.
COLUMN_NAMES = ("fwd", "fwd+bwd")
TARGET_RATIOS = [
    ("hf module", "bs core", (1,), ">= 10x"),
    ("hf module", "bs module", (1,), None),
    ("sdpa core", "bs core", (1,), ">= 4x"),
    ("bs core", "flex core", (0,), "<= 2x"),
    ("bs core+4g", "bs core", (1,), "<= 1.2x"),
    ("bs module+4g", "bs module", (1,), None),
    ("tok core", "bs core", (0, 1), "<= 1.15x"),
    ("tok module", "bs module", (0, 1), None),
    ("hf module", "tok core", (1,), ">= 10x"),
    ("hf module", "tok module", (1,), None),
]


def forward_only(impl: str) -> bool:
    return impl == "flex core" and DEVICE == "cpu"


def _global_tokens(L: int) -> torch.Tensor:
    mask = torch.zeros(1, L, dtype=torch.bool)
    mask[0, torch.linspace(0, L - 1, NUM_GLOBAL_TOKENS).long()] = True
    return mask


def build(impl: str, L: int):
    """Returns ``run(backward: bool)`` for one implementation at length ``L`` (inputs made here)."""
    torch.manual_seed(0)
    no_padding = torch.zeros(1, L, dtype=torch.bool, device=DEVICE)
    tensor = dict(device=DEVICE, dtype=DTYPE)
    if impl.startswith(("bs core", "tok core")) or impl in ("sdpa core", "flex core"):
        q, k, v = (torch.randn(1, HEADS, L, HEAD_DIM, **tensor, requires_grad=True) for _ in range(3))
        grad = torch.randn(1, HEADS, L, HEAD_DIM, **tensor)
        if impl.startswith(("bs core", "tok core")):
            globals_ = _global_tokens(L) if impl.endswith("+4g") else None
            token = impl.startswith("tok")  # band of 9 blocks of 64 reaching 256 tokens: exactly the window

            def forward():
                return block_sparse_attention(
                    q, k, v, block_size=BLOCK, num_sliding_window_blocks=WINDOW // BLOCK + 1,
                    global_block_indices=[] if token else [0], global_tokens=globals_,
                    token_window=WINDOW // 2 if token else None,
                )
        elif impl == "sdpa core":
            def forward():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            flex = FlexBlockSparse(BLOCK, WINDOW // BLOCK + 1, [0])
            qd, kd, vd = (x.detach() for x in (q, k, v)) if forward_only(impl) else (q, k, v)

            def forward():
                return flex(qd, kd, vd)
    else:
        hidden = torch.randn(1, L, HIDDEN, **tensor, requires_grad=True)
        grad = torch.randn(1, L, HIDDEN, **tensor)
        if impl.startswith(("bs module", "tok module")):
            config = LongformerZhConfig(
                hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=1, attention_window=WINDOW,
                attention_backend="block_sparse", sparse_block_size=BLOCK, attention_probs_dropout_prob=0.0,
                max_position_embeddings=max(L, 4096), sparse_window_mode="token" if impl.startswith("tok") else "block",
            )
            module = BlockSparseSelfAttention(config, 0).to(**tensor)
            globals_ = _global_tokens(L) if impl.endswith("+4g") else no_padding

            def forward():
                return module(hidden, no_padding, globals_)[0]
        else:
            config = LongformerConfig(
                hidden_size=HIDDEN, num_attention_heads=HEADS, attention_window=[WINDOW],
                attention_probs_dropout_prob=0.0,
            )
            module = LongformerSelfAttention(config, 0).to(**tensor)
            attention_mask = torch.zeros(1, L, **tensor)

            def forward():
                return module(hidden, attention_mask=attention_mask, is_index_masked=no_padding,
                              is_index_global_attn=no_padding, is_global_attn=False)[0]

    def run(backward: bool):
        if backward:
            forward().backward(grad)
        else:
            with torch.no_grad():
                forward()
        if DEVICE != "cpu":
            torch.cuda.synchronize()

    return run


# ------------------------------------------------------------------------------------------- memory
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory_here(impl: str, L: int) -> dict:
    """Peak resident-set growth (MB) of one forward and one forward+backward, in this (fresh) process."""
    run = build(impl, L)
    result = {}
    for backward in ([False] if forward_only(impl) else [False, True]):
        if impl == "flex core":
            run(backward)  # compile outside the measurement
        if DEVICE != "cpu":
            run(backward)  # warm-up (compilation, cuBLAS workspaces)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run(backward)
            result["fb" if backward else "fwd"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            continue
        base = _rss_kb("VmRSS")
        if not _reset_peak():
            result["note"] = "VmHWM could not be reset: peaks include set-up"
        run(backward)
        result["fb" if backward else "fwd"] = (_rss_kb("VmHWM") - base) / 1024
    return result


def measure_memory(impl: str, L: int, threads: int, dtype: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", impl, str(L), "--threads", str(threads),
           "--dtype", dtype]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- timing
def measure_times(impls: list[str], L: int, rounds: int) -> dict:
    runs = {}
    for impl in impls:
        try:
            runs[impl] = build(impl, L)
            for backward in ([False] if forward_only(impl) else [False, True]):
                runs[impl](backward)  # warm-up (and compilation for flex)
        except Exception as error:  # noqa: BLE001 - a missing optional path is reported, not fatal
            print(f"  {impl} at L={L}: not run ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
            runs.pop(impl, None)
    times = {(impl, mode): [] for impl in runs for mode in ("fwd", "fb") if not (mode == "fb" and forward_only(impl))}
    for _ in range(rounds):
        for (impl, mode) in times:
            start = time.perf_counter()
            runs[impl](mode == "fb")
            times[(impl, mode)].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def fmt(x, unit="s"):
    if x is None:
        return "-"
    return f"{x:.3f}" if unit == "s" else f"{x:.0f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--impls", nargs="+", default=[i for i in ALL_IMPLS], choices=ALL_IMPLS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--max-quadratic-len", type=int, default=8192,
                        help="skip dense SDPA and transformers' Longformer above this length (they take minutes)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--memory-child", nargs=2, metavar=("IMPL", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE, DTYPE
    DEVICE, DTYPE = args.device, DTYPES[args.dtype]

    if args.memory_child:
        print(json.dumps(measure_memory_here(args.memory_child[0], int(args.memory_child[1]))))
        return

    malloc = {k: os.environ[k] for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "OMP_WAIT_POLICY") if k in os.environ}
    print(f"machine: {platform.processor() or platform.machine()} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
          f"threads {args.threads}, env {malloc or 'default (no MALLOC_*, OMP_WAIT_POLICY)'}")
    print(f"hidden {HIDDEN}, heads {HEADS}, window {WINDOW} (block {BLOCK}, {WINDOW // BLOCK + 1} window blocks; "
          f"block mode: global block 0), batch 1, {args.dtype} on {DEVICE}, median of {args.rounds} interleaved rounds; memory = "
          + ("peak RSS growth" if DEVICE == "cpu" else "CUDA allocator peak"))
    if DEVICE != "cpu":
        print(f"device: {torch.cuda.get_device_name(DEVICE)}, CUDA {torch.version.cuda}")
    rows = []
    for L in args.lengths:
        impls = [i for i in args.impls if not (i in ("sdpa core", "hf module") and L > args.max_quadratic_len)]
        times = measure_times(impls, L, args.rounds)
        for impl in impls:
            if (impl, "fwd") not in times:
                continue
            # flex would recompile in the memory subprocess (tens of seconds each): memory is not measured
            if args.no_memory or (impl == "flex core" and DEVICE == "cpu"):
                memory = {}
            elif DEVICE != "cpu":  # the allocator's own peak, in this process
                memory = measure_memory_here(impl, L)
            else:
                memory = measure_memory(impl, L, args.threads, args.dtype)
            rows.append((L, impl, times.get((impl, "fwd")), times.get((impl, "fb")), memory.get("fwd"), memory.get("fb")))
            print(f"  L={L:6d} {impl:13s} fwd {fmt(rows[-1][2])} s  fwd+bwd {fmt(rows[-1][3])} s  "
                  f"peak MB fwd {fmt(rows[-1][4], 'MB')} fwd+bwd {fmt(rows[-1][5], 'MB')}"
                  + (f"  ({memory['error']})" if "error" in memory else ""), flush=True)

    print("\n| L | implementation | fwd s | fwd+bwd s | peak MB fwd | peak MB fwd+bwd |")
    print("|---|---|---|---|---|---|")
    for L, impl, f, fb, mf, mfb in rows:
        print(f"| {L} | {impl} | {fmt(f)} | {fmt(fb)} | {fmt(mf, 'MB')} | {fmt(mfb, 'MB')} |")

    table = {(L, impl): (f, fb, mf, mfb) for L, impl, f, fb, mf, mfb in rows}

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "-"

    print("\nTargets (issues 5 and 17):")
    for L in args.lengths:
        parts = []
        for slow, fast, columns, target in TARGET_RATIOS:
            a, b = table.get((L, slow)), table.get((L, fast))
            if a and b:
                measured = ", ".join(f"{COLUMN_NAMES[c]} {ratio(a[c], b[c])}" for c in columns)
                parts.append(f"{slow} / {fast} {measured}" + (f" (target {target})" if target else ""))
        core, hf = table.get((L, "bs core")), table.get((L, "hf module"))
        if core and hf and core[3] and hf[3]:
            parts.append(f"peak fwd+bwd bs core {fmt(core[3], 'MB')} MB vs hf {fmt(hf[3], 'MB')} MB")
        if parts:
            print(f"  L={L}: " + "; ".join(parts))
    longest = [L for L in args.lengths if L >= 4096]
    if 4096 in args.lengths and len(longest) > 1:
        top = max(longest)
        for impl in ("bs core", "tok core", "bs module", "tok module", "hf module", "sdpa core"):
            a, b = table.get((4096, impl)), table.get((top, impl))
            if a and b:
                print(f"  growth 4096 -> {top} ({top // 4096}x length), {impl}: time {ratio(b[1], a[1])}, "
                      f"peak memory {ratio(b[3], a[3])} (target <= 4.5x for block_sparse)")


if __name__ == "__main__":
    main()
