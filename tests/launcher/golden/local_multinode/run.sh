#!/usr/bin/env bash
# gantry: tiny-llama on 2 node(s) x 2 GPUs (tp2 x pp2), deploy=local
# engine.yaml: model embedded SmolLM2, served as tiny-llama, tensor_parallel_size 2, pipeline_parallel_size 2, dtype float32, max_model_len 2048, no API key
# Runs the torchrun group in the foreground; `python -m launcher` forwards Ctrl-C/SIGTERM to it.
set -euo pipefail
unset GANTRY_API_KEY  # no key configured: the engine would otherwise require this variable's key
export CUDA_VISIBLE_DEVICES=0,1
export NCCL_DEBUG=INFO
exec python3 -m launcher.torchrun \
  --nnodes 2 --nproc-per-node 2 \
  --node-rank 1 --master-addr 10.1.2.3 --master-port 29500 \
  --max-restarts 0 \
  -m engine.serve --config /srv/gantry/job/engine.yaml
