"""The quick start's closing summary, from what its steps wrote: the run's metrics and the evaluations' JSON.

    python launch/quickstart_summary.py --out quickstart_out --seconds 420
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lfzh_ds.run_folder import read_latest_tag
from lfzh_ds.training.metrics import read_metrics


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8").strip().splitlines()[-1])


def summary(out: Path, seconds: int) -> str:
    run = out / "run"
    train, val = read_metrics(run)
    first, last = val[0], val[-1]
    lines = [f"=== done in {seconds} s ({seconds / 60:.1f} min)",
             f"validation BPC: {first['val_bpc']:.2f} before training -> {last['val_bpc']:.3f} after {last['step']} "
             f"steps (95% interval {last['val_bpc_low']:.3f}-{last['val_bpc_high']:.3f}, {last['val_masked_tokens']:,} "
             f"masked tokens in {last['val_sequences']:,} held-out sequences)",
             f"  character frequencies alone score {last['frequency_baseline_bpc']:.3f} on the same masks: the model is "
             f"{last['frequency_baseline_bpc'] - last['val_bpc']:.2f} bits below them (a uniform guess scores 14.37; the "
             "upstream's 12-layer model went 14.78 -> 3.10 in 3K steps on 4 GPUs)"]
    steady = train[len(train) // 2:]  # the second half: no start-up, no first validation
    tokens_per_second = sum(r["tokens_per_second"] for r in steady) / len(steady)
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    lines.append(f"throughput: {tokens_per_second:,.0f} tokens/s over both processes"
                 + (f", MFU {100 * sum(mfu) / len(mfu):.1f}% of two cores' fp32 matmul peak" if mfu else ""))
    model_config = json.loads((out / "model" / "config.json").read_text())
    lines.append(f"model: lengthened to {model_config['max_position_embeddings'] - 2:,} positions (rows tiled) and "
                 f"exported as a stock transformers {model_config['architectures'][0]}: {out / 'model'}")
    fill = (out / "fill_mask.txt").read_text(encoding="utf-8").splitlines()
    lines.append(f"fill-mask: {fill[0]}\n  {fill[1]}")
    news = read_json(out / "news_blanks.json")
    right = sum(e["answer"] in e["top"] for e in news["examples"])
    lines.append(f"the ten written news sentences: the answer in its top 5 for {right} of {len(news['examples'])}")
    for e in news["examples"]:
        lines.append(f"  {e['text']}  answer {e['answer']}  model: {' '.join(e['top'])}"
                     + ("  (in its top 5)" if e["answer"] in e["top"] else ""))
    cloze = read_json(out / "cloze.json")
    lines.append(f"fill-in-the-blank on {cloze['blanks']} blanks of held-out news: top-1 {cloze['top1']:.3f}, top-5 "
                 f"{cloze['top5']:.3f}; the frequency guess {''.join(cloze['frequency_guess'])}: top-1 "
                 f"{cloze['frequency_top1']:.3f}, top-5 {cloze['frequency_top5']:.3f}")
    by_position = read_json(out / "by_position.json")
    lines.append(f"blanks by position in {by_position['inputs']} held-out inputs of {by_position['seq_len']:,} tokens "
                 "(consecutive dev documents, each read whole in one pass):")
    lines.append("  positions      blanks  top-1  top-5")
    for band in by_position["bands"]:
        scores = "  -      -" if band["top1"] is None else f"  {band['top1']:.3f}  {band['top5']:.3f}"
        lines.append(f"  {band['start']:>5}-{band['end']:<5}  {band['blanks']:>7}{scores}")
    if by_position["ratio_far_to_near"] is not None:
        lines.append(f"  top-5 past position 2,500 / in the first 500: {by_position['ratio_far_to_near']:.2f}")
    long_fill = read_json(out / "long_fill_mask.json")
    lines.append(f"a long held-out document ({long_fill['document_chars']:,} characters, {long_fill['tokens']:,} tokens, "
                 f"read whole), blank at character {long_fill['blank_char']:,}: ...{long_fill['context']}...")
    lines.append(f"  answer {long_fill['answer']}; model: {' '.join(long_fill['top'])}"
                 + ("  (in its top 5)" if long_fill["answer"] in long_fill["top"] else ""))
    lines.append(f"""
where everything is:
  corpus (JSON lines)        {out}/corpus/  (held-out dev split: {out}/heldout/)
  shards + manifest          {out}/shards/  (manifest.json, rejects.json)
  run                        {run}/
    metrics, one line a step {run}/metrics.jsonl
    curves                   {run}/curves.png
    TensorBoard              {run}/tensorboard/   (tensorboard --logdir {run}/tensorboard)
    checkpoints              {run}/checkpoints/   (latest -> {read_latest_tag(run / 'checkpoints')})
  4,096-position model       {out}/model_4096/  (LongformerZhForMaskedLM; lfzh_ds.loading.load_model)
  exported model             {out}/model/  (transformers.LongformerForMaskedLM.from_pretrained)
  evaluations (JSON)         {out}/cloze.json, news_blanks.json, by_position.json, long_fill_mask.json

what to run next:
  # train on to 1000 steps: --rewarm-steps climbs back to the peak learning rate, then decays to the new end
  deepspeed --num_gpus 2 launch/pretrain.py --deepspeed_config ds_configs/quickstart_cpu.json \\
      --data {out}/shards --output-dir {run} --model-config launch/quickstart_model.json --max-steps 1000 --resume \\
      --rewarm-steps 30 --save-interval 100 --keep-checkpoints 2 --eval-interval 100 --eval-sequences 64 \\
      --final-eval-sequences all --eval-batch-size 16 --log-interval 25
  # lengthen, evaluate, draw curves, fill masks, score blanks
  python launch/convert.py --from {run} --to {out}/model_4096 --max-pos 4096
  python launch/evaluate.py bpc --model {run} --data {out}/shards
  python launch/evaluate.py curves --run {run}
  python launch/evaluate.py fill-mask --model {out}/model_4096 --text "今天天气很[MASK]。"
  python launch/evaluate.py by-position --model {out}/model_4096 --corpus {out}/heldout/*.jsonl
  # does reading whole documents pay? CCF sentiment at 128, 512 and 4,096 tokens from this model
  python benchmarks/long_context_value.py --model {out}/model_4096
  # on GPUs, the real thing: 4,096 tokens, BERT-base, 2^18 tokens per step
  deepspeed launch/pretrain.py --deepspeed_config ds_configs/zero2.json --data SHARDS_DIR --output-dir RUN_DIR \\
      --init-from MODEL_DIR --max-steps 15000""")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the quick start's OUT_DIR")
    p.add_argument("--seconds", type=int, required=True, help="the quick start's wall time so far")
    args = p.parse_args(argv)
    print("\n" + summary(args.out.resolve(), args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
