"""Compare small-model pretraining recipes on CPU by how far validation BPC falls, one lever at a time.

Each recipe trains ``LongformerZhForMaskedLM`` from scratch in this process (plain PyTorch AdamW with the
quick start's settings: betas 0.9/0.98, eps 1e-6, weight decay 0.01, clipping 1.0, linear warm-up then
linear decay), on shards written by ``launch/preprocess.py``, and validates on the first N sequences of the
validation split with the data service's fixed masks: the same sequences and masks for every recipe, so
differences between recipes are paired. It reports validation BPC at a few steps, the character-frequency
baseline of the same masks, and the seconds per step (the process's own CPU time, so a busy machine changes it
less than wall time).

This is the measuring tool behind the quick start's recipe (see the README's "What the quick start's recipe
is, and why"); the quick start itself trains with the ``deepspeed`` launcher.

    python benchmarks/pretraining_recipe.py --data SHARDS_512 --steps 500 --recipe base \\
        --recipe "mask=0.3" --recipe "mask=0.3,lr=4e-3" --out recipes.jsonl

A recipe is ``name`` or comma-separated ``key=value`` changes to the base recipe (keys: mask, lr, warmup,
batch, hidden, layers, heads, ffn, window (the full attention window: one for every layer, or one per layer
bottom first as 2/32), static, data2 (a second shard folder), switch (the step at which
training moves on to data2), bias (1: the output bias starts at the training split's log character frequencies),
steps (this recipe's number of steps instead of --steps), dropout (hidden and attention dropout, BERT's 0.1),
wordlen (mask words of at most this many tokens, longer ones token by token), vocab (1: the training softmax over
the training split's tokens), cooc (the word embeddings start at co-occurrence vectors, this many times BERT's
init scale), coocwindow (their window, default 2), pos (the position embeddings start at sinusoids, scaled to this
many times BERT's init std), posnormal (they start at BERT's normal init times this), unit (--mask-unit: word,
character or mixed)). ``--cloze-blanks FILE`` also scores top-1/top-5 on fill-in-the-blank sentences (as
``launch/evaluate.py cloze --save-blanks`` writes them) at each evaluation.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lfzh_ds.cloze import read_blanks, score_cloze  # noqa: E402
from lfzh_ds.configuration import LongformerZhConfig  # noqa: E402
from lfzh_ds.modeling import LongformerZhForMaskedLM  # noqa: E402
from lfzh_ds.shards import ShardDataset  # noqa: E402
from lfzh_ds.tokenization import load_tokenizer  # noqa: E402
from lfzh_ds.training.evaluation import (  # noqa: E402
    collate,
    frequency_baseline_bpc,
    masked_lm_cross_entropy,
    token_counts,
    validation_indices,
)
from lfzh_ds.training.initialization import init_output_bias_to_unigram, init_word_embeddings_from_cooccurrence  # noqa: E402

BASE = {"mask": None, "lr": 2e-3, "warmup": 30, "batch": 16, "hidden": 128, "layers": 2, "heads": 4, "ffn": 512,
        "window": 128, "static": 0, "data2": None, "switch": 0, "bias": 0, "steps": 0, "dropout": 0.1, "wordlen": 0, "vocab": 0, "cooc": 0.0, "coocwindow": 2,
        "pos": 0.0, "posnormal": 0.0, "unit": None}


def parse_recipe(text: str) -> dict:
    recipe = dict(BASE)
    if text == "base":
        return recipe
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in BASE:
            raise SystemExit(f"--recipe {text!r}: unknown key {key!r} (one of {', '.join(BASE)})")
        recipe[key] = value if key in ("data2", "window", "unit") else float(value) if "." in value or "e" in value else int(value)
    return recipe


def window_setting(value):
    """``window=128``: every layer's; ``window=2/32``: one per layer, bottom first."""
    windows = [int(w) for w in str(value).split("/")]
    return windows[0] if len(windows) == 1 else windows


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train_recipe(name: str, recipe: dict, args) -> dict:
    torch.manual_seed(args.seed)
    def open_train(folder):
        kwargs = {"masking": "static"} if recipe["static"] else {"masking": "dynamic",
                                                                "mask_prob": recipe["mask"],
                                                                "mask_unit": recipe["unit"]}
        dataset = ShardDataset(folder, "train", seed=args.seed, verify=False, **kwargs)
        if recipe["wordlen"]:
            dataset.config["wwm_max_word_len"] = int(recipe["wordlen"])
        return dataset

    train = open_train(args.data)
    val = ShardDataset(args.data, "validation", masking="static", verify=False)
    max_len = max(train.seq_len, ShardDataset(recipe["data2"], "train", verify=False).seq_len
                  if recipe["data2"] else 0)
    config = LongformerZhConfig(hidden_size=int(recipe["hidden"]), num_hidden_layers=int(recipe["layers"]),
                                num_attention_heads=int(recipe["heads"]), intermediate_size=int(recipe["ffn"]),
                                max_position_embeddings=max(max_len, val.seq_len),
                                attention_window=window_setting(recipe["window"]), attention_backend="block_sparse",
                                sparse_block_size=64, hidden_dropout_prob=float(recipe["dropout"]),
                                attention_probs_dropout_prob=float(recipe["dropout"]))
    model = LongformerZhForMaskedLM(config)
    counts = token_counts(train)
    if recipe["bias"]:
        init_output_bias_to_unigram(model, counts)
    if recipe["cooc"]:
        init_word_embeddings_from_cooccurrence(model, train, float(recipe["cooc"]), int(recipe["coocwindow"]))
    positions = model.base_model.embeddings.position_embeddings.weight
    with torch.no_grad():
        if recipe["pos"]:
            index = torch.arange(positions.shape[0], dtype=torch.float64)[:, None]
            frequency = 10000.0 ** (-torch.arange(0, positions.shape[1], 2, dtype=torch.float64) / positions.shape[1])
            sinusoids = torch.cat([torch.sin(index * frequency), torch.cos(index * frequency)], dim=1)
            positions.copy_(sinusoids / sinusoids.std() * float(recipe["pos"]) * config.initializer_range)
        elif recipe["posnormal"]:
            positions.mul_(float(recipe["posnormal"]))
    output_vocab = torch.from_numpy(np.flatnonzero(np.asarray(counts))) if recipe["vocab"] else None
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=recipe["lr"], betas=(0.9, 0.98), eps=1e-6)
    steps, warmup = int(recipe["steps"]) or args.steps, int(recipe["warmup"])

    def lr_at(step):  # the rate of 1-based step ``step``
        if step <= warmup:
            return recipe["lr"] * step / warmup
        return recipe["lr"] * max(0.0, (steps - step) / max(1, steps - warmup))

    indices = validation_indices(val, args.eval_sequences)
    blanks = read_blanks(args.cloze_blanks) if args.cloze_blanks else None
    tokenizer = load_tokenizer()
    result = {"recipe": name, **recipe, "steps": steps, "evals": []}

    train_cpu = [0.0]  # CPU seconds spent training so far (evaluation excluded)

    def evaluate(step):
        model.eval()
        r = masked_lm_cross_entropy(model, val, indices, 16)
        scores = {"step": step, "val_bpc": r.bpc, "masked_tokens": r.masked_tokens, "train_cpu_seconds": train_cpu[0]}
        shown = ""
        if blanks:
            cloze = score_cloze(model, tokenizer, blanks, guess=[])
            scores |= {"cloze_top1": cloze["top1"], "cloze_top5": cloze["top5"]}
            shown = f", blanks top-5 {cloze['top5']:.3f}"
        model.train()
        result["evals"].append(scores)
        print(f"{name:>40} step {step:5d} val BPC {r.bpc:.3f}{shown} after {train_cpu[0]:.0f} CPU s", flush=True)

    evaluate(0)
    rng = np.random.default_rng(args.seed)
    order, cursor, epoch = rng.permutation(len(train)), 0, 0
    batch = int(recipe["batch"])
    started, cpu_started, eval_cpu = time.time(), cpu_seconds(), [0.0]
    model.train()
    for step in range(1, steps + 1):
        if recipe["data2"] and step == int(recipe["switch"]) + 1:
            train, cursor = open_train(recipe["data2"]), 0
            order = rng.permutation(len(train))
        if cursor + batch > len(order):
            epoch, cursor = epoch + 1, 0
            order = rng.permutation(len(train))
            train.set_epoch(epoch)
        data = collate([train[int(i)] for i in order[cursor:cursor + batch]])
        cursor += batch
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(**data, output_vocab=output_vocab).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        train_cpu[0] = cpu_seconds() - cpu_started - eval_cpu[0]
        if step in args.eval_at or step == steps:
            before = cpu_seconds()
            evaluate(step)
            eval_cpu[0] += cpu_seconds() - before
    result["seconds_per_step"] = (time.time() - started) / steps
    result["cpu_seconds_per_step"] = train_cpu[0] / steps
    result["parameters"] = sum(p.numel() for p in model.parameters())
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--recipe", action="append", required=True)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--eval-at", type=int, nargs="*", default=[100, 250])
    p.add_argument("--eval-sequences", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cloze-blanks", help="also score top-1/top-5 on these fill-in-the-blank sentences "
                   "(launch/evaluate.py cloze --save-blanks) at each evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append one JSON line per recipe")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    val = ShardDataset(args.data, "validation", masking="static", verify=False)
    baseline = frequency_baseline_bpc(ShardDataset(args.data, "train", verify=False), val,
                                      validation_indices(val, args.eval_sequences))
    print(f"character-frequency baseline on the same validation masks: {baseline:.3f} BPC", flush=True)
    for text in args.recipe:
        result = train_recipe(text, parse_recipe(text), args)
        result["frequency_baseline_bpc"] = baseline
        print(f"{text:>40} final val BPC {result['evals'][-1]['val_bpc']:.3f} "
              f"({result['evals'][-1]['val_bpc'] - baseline:+.3f} vs frequencies), "
              f"{result['seconds_per_step']:.3f} s/step wall, {result['cpu_seconds_per_step']:.3f} s/step CPU",
              flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
