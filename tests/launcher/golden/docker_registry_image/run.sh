#!/usr/bin/env bash
# gantry: tiny-llama on 1 node(s) x 1 GPUs (tp1 x pp1), deploy=docker
# engine.yaml: model embedded SmolLM2, served as tiny-llama, tensor_parallel_size 1, pipeline_parallel_size 1, dtype float32, max_model_len 2048, no API key
# Node 0 of 1: starts container gantry-test from image registry.example/gantry:1.0.
# The last line repeats engine.yaml's values as the seed's vLLM flags (flags win over --config).
set -euo pipefail
JOB_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
echo 'gantry: API on http://localhost:8000/v1 once GET /ready answers 200 (logs: docker logs -f gantry-test)'
docker run -d --init \
  --name gantry-test \
  --pull missing \
  --restart no \
  --gpus all \
  -e CUDA_VISIBLE_DEVICES=0 \
  -e NCCL_NVLS_ENABLE=0 \
  -v "$JOB_DIR/engine.yaml":/etc/gantry/engine.yaml:ro \
  -p 8000:8000 \
  --ipc=host \
  --shm-size=64g \
  --stop-timeout 60 \
  --health-cmd "python3 -c 'import sys, urllib.request as r; r.urlopen(sys.argv[1], timeout=5)' http://127.0.0.1:8000/ready" \
  --health-interval 30s \
  --health-start-period 1800s \
  --entrypoint python3 \
  registry.example/gantry:1.0 \
  -m launcher.torchrun \
  --nnodes 1 --nproc-per-node 1 \
  --standalone \
  --max-restarts 0 \
  -m engine.serve --config /etc/gantry/engine.yaml \
  --tensor-parallel-size 1 --dtype float32 --max-model-len 2048
