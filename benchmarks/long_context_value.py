"""Does reading whole documents pay? CCF sentiment fine-tuned from one 4,096-position start at several lengths.

    python benchmarks/long_context_value.py --model quickstart_out/model      # after bash launch/quickstart.sh

The same start (a 4,096-position masked LM: the quick start's export, or any model folder) is fine-tuned on CCF
sentiment with ``launch/finetune.py`` under the ``deepspeed`` launcher (2 CPU processes, ``ds_configs/cpu.json``)
at each ``--lengths`` (default 128, 512 and 4,096 tokens; head+tail for the truncated documents, about 94% of the
documents fit whole in 4,096) for every ``--seeds``, with one budget (epochs, batch, learning rate, class weights,
the settings chosen on dev in the README); the TF-IDF baseline (``launch/baseline.py``) reads whole documents beside
it. The table gives, per length, dev and test macro-F1 (mean +- standard deviation over the seeds), fine-tuning
tokens/s (real tokens, both processes), padding efficiency, the share of documents truncated and the wall time of
one fine-tuning. Everything lands in ``--work``; a rerun skips finished fine-tunings and continues a killed one
with ``--resume``. Never run by the tests.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.pretraining_value import FINETUNE_DEFAULTS, finetune_ccf, spread, tfidf  # noqa: E402


def steady_tokens_per_second(run_dir: Path) -> float:
    """Mean training tokens/s over the run's step lines after the first 10% (no start-up)."""
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"val' not in line]
    steady = steps[len(steps) // 10:]
    return statistics.mean(r["tokens_per_second"] for r in steady)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "quickstart_out" / "model",
                   help="the start: a 4,096-position model folder (default: the quick start's export)")
    p.add_argument("--work", type=Path, default=REPO / "benchmarks_out" / "long_context_value")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 4096])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=FINETUNE_DEFAULTS["epochs"])
    p.add_argument("--lr", type=float, default=FINETUNE_DEFAULTS["lr"])
    p.add_argument("--class-weight", choices=("balanced", "none"), default=FINETUNE_DEFAULTS["class_weight"])
    args = p.parse_args(argv)
    model, work = args.model.resolve(), args.work.resolve()
    config = json.loads((model / "config.json").read_text()) if (model / "config.json").is_file() else None
    if config is None:
        raise SystemExit(f"{model} holds no model: run bash launch/quickstart.sh first, or give --model")
    if max(args.lengths) > config["max_position_embeddings"]:
        raise SystemExit(f"{model} has {config['max_position_embeddings']} positions, fewer than --lengths "
                         f"{max(args.lengths)}: lengthen it first (launch/convert.py --max-pos)")
    work.mkdir(parents=True, exist_ok=True)
    variant = "".join(f"-{key}={getattr(args, key)}" for key in ("epochs", "lr", "class_weight")
                      if getattr(args, key) != FINETUNE_DEFAULTS[key])

    results = {max_len: [] for max_len in args.lengths}
    for seed in args.seeds:  # seed by seed, so a run stopped early still compares every length
        for max_len in args.lengths:
            out = work / "finetune" / f"len{max_len}{variant}-seed{seed}"
            summary = finetune_ccf(model, out, seed=seed, max_len=max_len, epochs=args.epochs, lr=args.lr,
                                   class_weight=args.class_weight, eval_batch_size=32 if max_len <= 512 else 8)
            results[max_len].append({"summary": summary, "tokens_per_second": steady_tokens_per_second(out)})
    baseline = tfidf(work)

    rows = ["| input | dev macro-F1 | test macro-F1 | test accuracy | per-seed test macro-F1 | fine-tuning tokens/s | "
            "padding efficiency | truncated (train) | wall time per run |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for max_len, runs in results.items():
        summaries = [r["summary"] for r in runs]
        dev = [s["metrics"]["dev"]["macro_f1"] for s in summaries]
        test = [s["metrics"]["test"]["macro_f1"] for s in summaries]
        accuracy = [s["metrics"]["test"]["accuracy"] for s in summaries]
        efficiency = summaries[0].get("padding_efficiency", {}).get("with_model_padding")
        truncated = summaries[0]["truncated_share"]["train"]
        wall = statistics.mean(s["total_seconds"] for s in summaries) / 60
        rows.append(f"| {max_len} tokens{'' if max_len >= 4096 else ', head+tail'} | {spread(dev)} | {spread(test)} | "
                    f"{spread(accuracy)} | {', '.join(f'{t:.4f}' for t in test)} | "
                    f"{statistics.mean(r['tokens_per_second'] for r in runs):,.0f} | "
                    f"{'-' if efficiency is None else f'{100 * efficiency:.1f}%'} | "
                    f"{'-' if truncated is None else f'{100 * truncated:.1f}%'} | {wall:.1f} min |")
    m = baseline["metrics"]
    rows.append(f"| TF-IDF char 1-3-grams + LR, whole documents | {m['dev']['macro_f1']:.4f} | "
                f"{m['test']['macro_f1']:.4f} | {m['test']['accuracy']:.4f} | - | - | - | - | - |")
    table = "\n".join(rows)
    settings = (f"start {model}; fine-tuning: launch/finetune.py, deepspeed --num_gpus 2, ds_configs/cpu.json, "
                f"head+tail, {args.epochs} epochs, batch 16, micro-batch 4, lr {args.lr}, class weight "
                f"{args.class_weight}, seeds {args.seeds}")
    print(table)
    print(settings)
    (work / f"table{variant}.md").write_text(table + "\n\n" + settings + "\n")
    (work / f"results{variant}.json").write_text(json.dumps({"settings": vars(args), "results": results,
                                                            "tfidf": baseline}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
