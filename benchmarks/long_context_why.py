"""Why reading whole CCF documents does not pay for the quick start's model: where the evidence sits, what the
fine-tuned model reads, and whether the small model's fine-tuning is the limit.

    python benchmarks/long_context_why.py --model quickstart_out/model      # after bash launch/quickstart.sh

Three measurements, each a table (run by hand, never by the tests; everything lands in ``--work``, which it shares
with benchmarks/long_context_value.py, so the fine-tunings of that script are reused and the other way round):

1. **Where the evidence sits.** The TF-IDF baseline (launch/baseline.py's model, C chosen on dev) fit and scored on
   views of every document: its title alone, the title with the first N characters of the text, with N characters
   of head+tail (a quarter from the start, as fine-tuning's head+tail), the text's last 512 characters, the text's
   middle (without its first and last 512 characters) and the whole. If a short view scores as well as the whole,
   the label's evidence sits there and reading on cannot add much.
2. **What the fine-tuned model reads.** The model fine-tuned at 4,096 tokens (seed 0, best epoch) scored on dev and
   test with its inputs cut to 128 and 512 tokens (head+tail) beside whole documents; and, in every layer, the share
   of the global [CLS] token's attention (mean over heads and over the dev documents longer than 2,048 tokens) that
   falls in each position band, beside each band's share of the tokens.
3. **Fit.** Macro-F1 on 600 train documents of the models fine-tuned at 128 and 4,096 tokens beside their dev
   macro-F1: a model that scores on train about what it scores on dev has not fit its training set, and the model
   and its fine-tuning budget, not the input length, are the limit. ``--epochs-more N`` adds a fine-tuning at
   4,096 tokens with N epochs (seed 0).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.pretraining_value import FINETUNE_DEFAULTS, finetune_ccf  # noqa: E402

BANDS = ((0, 128), (128, 512), (512, 2048), (2048, 4096))
TRAIN_SAMPLE = 600


def views(tail_chars: int = 512):
    """(name, function of an Example giving the Example TF-IDF reads)."""
    def text_view(cut, keep_title=True):
        return lambda e: replace(e, text=cut(e.text), title=e.title if keep_title else "")

    def head_tail(n):
        head = n // 4
        return lambda t: t if len(t) <= n else t[:head] + t[len(t) - (n - head):]

    return [
        ("title alone", text_view(lambda t: "")),
        ("title + first 128 characters", text_view(lambda t: t[:128])),
        ("title + 128 characters head+tail", text_view(head_tail(128))),
        ("title + first 512 characters", text_view(lambda t: t[:512])),
        ("title + 512 characters head+tail", text_view(head_tail(512))),
        (f"last {tail_chars} characters (no title)", text_view(lambda t: t[-tail_chars:], keep_title=False)),
        (f"middle: text without its first and last {tail_chars} characters (no title)",
         text_view(lambda t: t[tail_chars:-tail_chars], keep_title=False)),
        ("whole document", text_view(lambda t: t)),
    ]


def evidence_table(task) -> list[str]:
    from lfzh_ds.classification.baseline import tfidf_baseline

    rows = ["| TF-IDF reads | dev macro-F1 | test macro-F1 | empty inputs (dev) |", "| --- | --- | --- | --- |"]
    for name, view in views():
        cut = replace(task, train=[view(e) for e in task.train], dev=[view(e) for e in task.dev],
                      test=[view(e) for e in task.test])
        empty = sum(1 for e in cut.dev if not (e.title or e.text).strip())
        result = tfidf_baseline(cut)
        dev, test = (result["splits"][s]["metrics"]["macro_f1"] for s in ("dev", "test"))
        rows.append(f"| {name} | {dev:.4f} | {test:.4f} | {empty} |")
        print(rows[-1], flush=True)
    return rows


def scores(model, task, split_examples, max_len: int) -> float:
    from lfzh_ds.classification.encoding import encode_examples
    from lfzh_ds.classification.metrics import classification_metrics
    from lfzh_ds.finetuning import predict
    from lfzh_ds.tokenization import load_tokenizer

    encoded = encode_examples(split_examples, load_tokenizer(), max_len, "head+tail")
    predictions, _ = predict(model, encoded, 8 if max_len > 512 else 32, "cpu")
    return classification_metrics([e.label for e in split_examples], predictions, task.label_names)["macro_f1"]


def cls_attention_shares(model, examples, max_docs: int) -> tuple[list[list[float]], list[float], int]:
    """Per layer, the mean share of [CLS]'s global attention in each band (over heads and documents), and the mean
    share of the tokens in each band, over up to ``max_docs`` documents longer than 2,048 tokens."""
    import math

    import torch

    from lfzh_ds.classification.encoding import encode_examples
    from lfzh_ds.finetuning import make_batch
    from lfzh_ds.tokenization import load_tokenizer

    encoded = encode_examples(examples, load_tokenizer(), 4096, "head+tail")
    long_docs = [i for i, ids in enumerate(encoded.input_ids) if len(ids) > 2048][:max_docs]
    layers = model.base_model.encoder.layer
    captured = {}

    def capture(index):
        def hook(module, args):
            captured[index] = (module, args[0].detach(), args[1].detach())
        return hook

    handles = [layer.attention.self.register_forward_pre_hook(capture(i)) for i, layer in enumerate(layers)]
    per_layer = [[0.0] * len(BANDS) for _ in layers]
    token_shares = [0.0] * len(BANDS)
    try:
        with torch.no_grad():
            for i in long_docs:
                model(**make_batch(encoded, [i], None, "cpu"))
                n = len(encoded.input_ids[i])
                for b, (lo, hi) in enumerate(BANDS):
                    token_shares[b] += max(0, min(hi, n) - lo) / n / len(long_docs)
                for index, (attn, hidden, masked) in captured.items():
                    heads, dim = attn.num_heads, attn.head_dim
                    q = attn.query_global(hidden[0, :1]).view(heads, dim) / math.sqrt(dim)
                    k = attn.key_global(hidden[0]).view(-1, heads, dim)
                    probs = torch.einsum("hd,lhd->hl", q, k).masked_fill(masked[0][None, :], float("-inf"))
                    probs = torch.softmax(probs, -1).mean(0)
                    for b, (lo, hi) in enumerate(BANDS):
                        per_layer[index][b] += float(probs[lo:hi].sum()) / len(long_docs)
    finally:
        for handle in handles:
            handle.remove()
    return per_layer, token_shares, len(long_docs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "quickstart_out" / "model",
                   help="the start: a 4,096-position model folder (default: the quick start's export)")
    p.add_argument("--work", type=Path, default=REPO / "benchmarks_out" / "long_context_value")
    p.add_argument("--attention-docs", type=int, default=100, help="dev documents longer than 2,048 tokens read")
    p.add_argument("--epochs-more", type=int, default=0, help="also fine-tune at 4,096 tokens with this many epochs")
    p.add_argument("--skip-evidence", action="store_true", help="leave out table 1 (TF-IDF views)")
    args = p.parse_args(argv)

    import random

    import torch

    from lfzh_ds.classification.tasks import load_ccf_task
    from lfzh_ds.finetuning import BEST_CHECKPOINT_DIR
    from lfzh_ds.loading import load_model

    torch.set_num_threads(2)
    work = args.work.resolve()
    task = load_ccf_task()
    out = {}
    if not args.skip_evidence:
        print("1. where the evidence sits (TF-IDF on views of each document)", flush=True)
        out["evidence"] = evidence_table(task)

    runs = {}
    for max_len, epochs in ((128, FINETUNE_DEFAULTS["epochs"]), (4096, FINETUNE_DEFAULTS["epochs"]),
                            *(((4096, args.epochs_more),) if args.epochs_more else ())):
        variant = "" if epochs == FINETUNE_DEFAULTS["epochs"] else f"-epochs={epochs}"
        run_dir = work / "finetune" / f"len{max_len}{variant}-seed0"
        summary = finetune_ccf(args.model.resolve(), run_dir, seed=0, max_len=max_len, epochs=epochs,
                               lr=FINETUNE_DEFAULTS["lr"], class_weight=FINETUNE_DEFAULTS["class_weight"],
                               eval_batch_size=32 if max_len <= 512 else 8)
        runs[(max_len, epochs)] = (run_dir, summary)

    long_model = load_model(runs[(4096, FINETUNE_DEFAULTS["epochs"])][0] / BEST_CHECKPOINT_DIR,
                            label_names=task.label_names)
    print("2. what the model fine-tuned at 4,096 tokens reads", flush=True)
    rows = ["| inputs of the model fine-tuned at 4,096 | dev macro-F1 | test macro-F1 |", "| --- | --- | --- |"]
    for max_len in (128, 512, 4096):
        dev, test = scores(long_model, task, task.dev, max_len), scores(long_model, task, task.test, max_len)
        rows.append(f"| {max_len} tokens{', head+tail' if max_len < 4096 else ' (whole)'} | {dev:.4f} | {test:.4f} |")
        print(rows[-1], flush=True)
    out["reads"] = rows
    per_layer, token_shares, docs = cls_attention_shares(long_model, task.dev, args.attention_docs)
    band_names = [f"{lo}-{hi - 1}" for lo, hi in BANDS]
    rows = [f"| [CLS] attention share ({docs} dev documents > 2,048 tokens) | " + " | ".join(band_names) + " |",
            "| --- |" + " --- |" * len(BANDS),
            "| share of the tokens | " + " | ".join(f"{s:.3f}" for s in token_shares) + " |"]
    rows += [f"| layer {i + 1} | " + " | ".join(f"{s:.3f}" for s in shares) + " |" for i, shares in enumerate(per_layer)]
    print("\n".join(rows), flush=True)
    out["cls_attention"] = rows

    print("3. fit: train against dev", flush=True)
    sample = random.Random(0).sample(task.train, min(TRAIN_SAMPLE, len(task.train)))
    rows = [f"| fine-tuned at | epochs | train macro-F1 ({len(sample)} documents) | dev macro-F1 | test macro-F1 |",
            "| --- | --- | --- | --- | --- |"]
    for (max_len, epochs), (run_dir, summary) in runs.items():
        model = load_model(run_dir / BEST_CHECKPOINT_DIR, label_names=task.label_names)
        train = scores(model, task, sample, max_len)
        rows.append(f"| {max_len} tokens | {epochs} | {train:.4f} | {summary['metrics']['dev']['macro_f1']:.4f} | "
                    f"{summary['metrics']['test']['macro_f1']:.4f} |")
        print(rows[-1], flush=True)
    out["fit"] = rows
    lengths = [len(e.title) + len(e.text) for e in task.dev]
    out["dev_characters"] = {"median": statistics.median(lengths), "mean": statistics.mean(lengths)}
    (work / "why.json").write_text(json.dumps(out, ensure_ascii=False, indent=1))
    print(f"tables in {work / 'why.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
