#!/usr/bin/env bash
# The GPU checks of issue 5 in one run, for a session lent a CUDA machine (at most 8.5 min: each part has its own time limit):
#   1. the kernel's equality tests on the GPU (CUDA parametrisations of tests/test_block_sparse.py: the
#      pure-PyTorch kernel in fp32/fp16/bf16 and the FlexAttention path, forward and backward);
#   2. the attention layer (benchmarks/attention.py) in bf16 and fp16 at 4,096 and 16,384 tokens;
#   3. the training step of a 12-layer, 768-hidden masked LM at 4,096 tokens (benchmarks/model_step.py):
#      block_sparse (with attention dropout: the PyTorch kernel), block_sparse without attention dropout
#      (FlexAttention) and transformers' LongformerForMaskedLM, tokens per second, bf16 and fp16.
# Needs python with CUDA torch, transformers and pytest; nothing else of the package is imported.
# Logs go to ${OUT:-gpu_check_out}/. Each part has its own time limit, so a slow part cannot eat the rest.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'capability', torch.cuda.get_device_capability(), 'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/gpu.txt"

echo "=== 1/3 equality tests on the GPU"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_block_sparse.py -k cuda 2>&1 | tee "$OUT/tests.log"

echo "=== 2/3 attention layer"
for dtype in bf16 fp16; do
  timeout 90 "$PY" benchmarks/attention.py --device cuda --dtype "$dtype" --lengths 4096 16384 --rounds 5 \
      --max-quadratic-len 16384 2>&1 | tee "$OUT/attention_$dtype.log"
done

echo "=== 3/3 training step, 12 layers x 768, 4 x 4,096 tokens"
for dtype in bf16 fp16; do
  timeout 90 "$PY" benchmarks/model_step.py --device cuda --size base --dtype "$dtype" --lengths 4096 \
      --tokens-per-step 16384 --rounds 3 --memory \
      --models "lfzh block_sparse" "lfzh block_sparse flex" "hf longformer" 2>&1 | tee "$OUT/model_step_$dtype.log"
done
