#!/usr/bin/env bash
# gantry: smollm2 on 1 node(s) x 1 GPUs (tp1 x pp1), deploy=local
# engine.yaml: model embedded SmolLM2, served as its own name, tensor_parallel_size 1, pipeline_parallel_size 1, dtype auto, max_model_len 8192, no API key
# Runs the torchrun group in the foreground; `python -m launcher` forwards Ctrl-C/SIGTERM to it.
set -euo pipefail
unset GANTRY_API_KEY  # no key configured: the engine would otherwise require this variable's key
exec python3 -m launcher.torchrun \
  --nnodes 1 --nproc-per-node 1 \
  --standalone \
  --max-restarts 0 \
  -m engine.serve --config /srv/gantry/job/engine.yaml
