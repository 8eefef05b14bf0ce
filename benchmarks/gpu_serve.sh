#!/usr/bin/env bash
# Online serving on one GPU: the W1 model shape (random weights, a small stand-in tokenizer)
# served by `python -m engine.serve`, loaded by benchmarks/serve.py at rate inf (the peak), then
# at half the measured peak. Usage: bash benchmarks/gpu_serve.sh OUT_DIR
set -euo pipefail
out=${1:-/tmp}
dir=$(python3 -c "
from benchmarks.throughput import QWEN2_7B, write_config
from tests.conftest import write_tiny_tokenizer
d = write_config(QWEN2_7B, 4096)
write_tiny_tokenizer(d, 512)
print(d)")
python3 -m engine.serve --model "$dir" --load-format dummy --dtype bfloat16 --max-model-len 2048 \
  --host 127.0.0.1 --port 8000 --max-waiting-requests 4096 >"$out/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
python3 -m benchmarks.serve --ready-timeout 400 --find-peak --num-prompts 256 --random-input-len 512 \
  --random-output-len 256 --vocab-size 500 --result-json "$out/serve.json"
