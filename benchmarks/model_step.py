"""Training-step cost per token of a small masked-LM at 512 vs 4096 tokens, side by side.

Models (same size: 4 layers, hidden 256, 4 heads of 64, FFN 1024, vocab 21128, dropout 0.1):

* ``lfzh block_sparse``  ``LongformerZhForMaskedLM``, block-sparse backend (window 512, block 64,
  global block 0); MLM head evaluated at the labelled positions only
* ``lfzh sliding_chunks`` the same model with the exact backend (transformers' Longformer attention)
* ``hf longformer``      transformers' ``LongformerForMaskedLM`` (window 512; head over all positions)
* ``hf bert (dense)``    transformers' ``BertForMaskedLM`` (dense SDPA attention; head over all positions)

* ``lfzh block_sparse training-vocab`` the block-sparse model with the training softmax over 9,232 of the 21,128
  tokens (``--output-vocab training``: the quick start's corpus has 9,232 distinct tokens), labels drawn from them

* ``lfzh block_sparse flex`` the block-sparse model without attention dropout: on CUDA GPUs of compute
  capability >= 8.0 its attention runs through FlexAttention (elsewhere the same kernel as above)

A step is forward + backward + AdamW on ``--tokens-per-step`` tokens (default 4096: batch 8 x 512 or 1 x
4096), 15% of positions labelled, [CLS] global for the Longformers. Times are medians over ``--rounds``
interleaved rounds; peak memory (optional, ``--memory``) is the resident-set growth of one step in a fresh
subprocess on CPU, the CUDA allocator's peak during one more step on a GPU.

On a GPU (``--device cuda``): ``--size base`` is BERT-base (12 layers, hidden 768, 12 heads of 64, FFN
3072), ``--dtype fp16`` / ``bf16`` runs the step under autocast (fp16 with a gradient scaler), fp32 weights
and AdamW states, as DeepSpeed's mixed precision does.

    python benchmarks/model_step.py
    python benchmarks/model_step.py --lengths 512 4096 --rounds 3 --memory --models "lfzh block_sparse" "lfzh sliding_chunks"
    python benchmarks/model_step.py --device cuda --size base --dtype bf16 --lengths 4096 --tokens-per-step 32768 \
        --rounds 5 --memory --models "lfzh block_sparse" "lfzh block_sparse flex" "hf longformer"
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's lfzh_ds, installed or not

SIZES = {
    "quickstart": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
VOCAB = 21128
WINDOW, BLOCK = 512, 64
TRAINING_VOCAB = 9232
ALL_MODELS = ["lfzh block_sparse", "lfzh block_sparse training-vocab", "lfzh block_sparse flex", "lfzh sliding_chunks", "hf longformer", "hf bert (dense)"]
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def build(name: str, L: int, size: str = "small", tokens_per_step: int = 4096, device: str = "cpu", dtype: str = "fp32"):
    """``step()`` running one optimisation step of model ``name`` on ``tokens_per_step`` tokens of length L."""
    torch.manual_seed(0)
    batch = max(1, tokens_per_step // L)
    dims = dict(SIZES[size], vocab_size=VOCAB)
    if name.startswith("lfzh"):
        from lfzh_ds.configuration import LongformerZhConfig
        from lfzh_ds.modeling import LongformerZhForMaskedLM

        extra = dict(attention_probs_dropout_prob=0.0) if name.endswith("flex") else {}
        config = LongformerZhConfig(
            max_position_embeddings=4096, attention_window=WINDOW, sparse_block_size=BLOCK,
            attention_backend=name.split()[1], **dims, **extra,
        )
        model = LongformerZhForMaskedLM(config)
    elif name == "hf longformer":
        from transformers import LongformerConfig, LongformerForMaskedLM

        config = LongformerConfig(max_position_embeddings=4096 + 2, attention_window=WINDOW, **dims)
        model = LongformerForMaskedLM(config)
    else:
        from transformers import BertConfig, BertForMaskedLM

        config = BertConfig(max_position_embeddings=4096, **dims)
        model = BertForMaskedLM(config, attn_implementation="sdpa") if _accepts_attn_impl() else BertForMaskedLM(config)
    model.to(device).train()
    input_ids = torch.randint(1000, VOCAB, (batch, L))
    output_vocab = None
    if name.endswith("training-vocab"):  # the corpus uses TRAINING_VOCAB tokens: inputs and labels come from them
        output_vocab = torch.sort(torch.randperm(VOCAB - 1000)[:TRAINING_VOCAB] + 1000).values
        input_ids = output_vocab[torch.randint(0, TRAINING_VOCAB, (batch, L))]
    labels = torch.full_like(input_ids, -100)
    chosen = torch.rand(batch, L) < 0.15
    labels[chosen] = input_ids[chosen]
    attention_mask = torch.ones_like(input_ids)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    if name != "hf bert (dense)":
        global_attention_mask = torch.zeros_like(input_ids)
        global_attention_mask[:, 0] = 1
        kwargs["global_attention_mask"] = global_attention_mask
    if output_vocab is not None:
        kwargs["output_vocab"] = output_vocab
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    low = DTYPES[dtype]
    scaler = torch.amp.GradScaler(device, enabled=low == torch.float16)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=low) if low is not None else contextlib.nullcontext():
            loss = model(**kwargs).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device != "cpu":
            torch.cuda.synchronize()

    return step


def _accepts_attn_impl() -> bool:
    import inspect

    from transformers import BertForMaskedLM

    return "attn_implementation" in inspect.signature(BertForMaskedLM.__init__).parameters


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name: str, L: int, **options) -> dict:
    step = build(name, L, **options)
    step()  # optimizer state and first-touch allocations outside the measurement
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return {"peak_mb": (_status_kb("VmHWM") - base) / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--models", nargs="+", default=["lfzh block_sparse", "hf longformer", "hf bert (dense)"],
                        choices=ALL_MODELS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (one subprocess each)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--tokens-per-step", type=int, default=4096)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="fp16 / bf16: autocast (GPUs)")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = dict(size=args.size, tokens_per_step=args.tokens_per_step, device=args.device, dtype=args.dtype)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], int(args.memory_child[1]), **options)))
        return

    malloc = {k: os.environ[k] for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "OMP_WAIT_POLICY") if k in os.environ}
    print(f"machine: {platform.processor() or platform.machine()} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
          f"threads {args.threads}, env {malloc or 'default (no MALLOC_*, OMP_WAIT_POLICY)'}")
    if args.device != "cpu":
        print(f"device: {torch.cuda.get_device_name(args.device)}, CUDA {torch.version.cuda}")
    print(f"model: {args.size} {SIZES[args.size]}, window {WINDOW}; {args.tokens_per_step} tokens per step (fwd + bwd + "
          f"AdamW), {args.dtype}, median of {args.rounds} interleaved rounds")
    steps = {}
    for name in args.models:
        for L in args.lengths:
            steps[(name, L)] = build(name, L, **options)
            steps[(name, L)]()  # warm-up (and compilation)
    times = {key: [] for key in steps}
    for _ in range(args.rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    gpu_peaks = {}
    if args.memory and args.device != "cpu":  # the allocator's own peak of one more step, in this process
        for key, step in steps.items():
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            gpu_peaks[key] = (torch.cuda.max_memory_allocated() - base) / 2**20
    del steps

    print("\n| model | L | batch | step s | ms per 1k tokens | tokens/s | peak MB |")
    print("|---|---|---|---|---|---|---|")
    per_token = {}
    for (name, L), values in times.items():
        t = statistics.median(values)
        per_token[(name, L)] = t / args.tokens_per_step
        peak = f"{gpu_peaks[(name, L)]:.0f}" if (name, L) in gpu_peaks else "-"
        if args.memory and args.device == "cpu":
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", name, str(L), "--threads", str(args.threads),
                   "--size", args.size, "--tokens-per-step", str(args.tokens_per_step), "--dtype", args.dtype]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            peak = f"{json.loads(done.stdout.strip().splitlines()[-1])['peak_mb']:.0f}" if done.returncode == 0 else "failed"
        print(f"| {name} | {L} | {max(1, args.tokens_per_step // L)} | {t:.3f} | {1e6 * t / args.tokens_per_step:.1f} | "
              f"{args.tokens_per_step / t:,.0f} | {peak} |", flush=True)
    short, long_ = min(args.lengths), max(args.lengths)
    print(f"\ncost per token at {long_} / at {short} (target <= 1.3x for block_sparse):")
    for name in args.models:
        if (name, short) in per_token and (name, long_) in per_token:
            print(f"  {name}: {per_token[(name, long_)] / per_token[(name, short)]:.2f}x")
    if ("lfzh block_sparse", long_) in per_token:
        for name in args.models:
            if name != "lfzh block_sparse" and (name, long_) in per_token:
                print(f"  at {long_}: {name} / lfzh block_sparse per token: "
                      f"{per_token[(name, long_)] / per_token[('lfzh block_sparse', long_)]:.2f}x")


if __name__ == "__main__":
    main()
