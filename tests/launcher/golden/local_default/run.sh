#!/usr/bin/env bash
# gantry: smollm2 on 1 node(s) x 1 GPUs (tp1 x pp1), deploy=local
# engine.yaml: model embedded SmolLM2, served as its own name, tensor_parallel_size 1, pipeline_parallel_size 1, dtype auto, max_model_len 8192, API key from $GANTRY_API_KEY
# Runs the torchrun group in the foreground; `python -m launcher` forwards Ctrl-C/SIGTERM to it.
set -euo pipefail
printenv GANTRY_API_KEY >/dev/null || { echo "gantry: set GANTRY_API_KEY to the API key (or render with server=noauth)" >&2; exit 2; }
exec python3 -m launcher.torchrun \
  --nnodes 1 --nproc-per-node 1 \
  --standalone \
  --max-restarts 0 \
  -m engine.serve --config /srv/gantry/job/engine.yaml
