#!/usr/bin/env bash
# gantry: llama3.1-8b on 1 node(s) x 1 GPUs (tp1 x pp1), deploy=docker
# engine.yaml: model /models/llama-8b-q4.gguf, served as meta-llama/Llama-3.1-8B-Instruct, tensor_parallel_size 1, pipeline_parallel_size 1, dtype bfloat16, max_model_len 32768, API key from a file
# Node 0 of 1: starts container llama from image gantry:latest.
# The last line repeats engine.yaml's values as the seed's vLLM flags (flags win over --config).
set -euo pipefail
JOB_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
if [ ! -e /data/llama-8b-q4.gguf ]; then
  echo 'gantry: model.path: /data/llama-8b-q4.gguf does not exist on this host; copy the .gguf file there first' >&2
  exit 2
fi
if ! docker image inspect gantry:latest >/dev/null 2>&1; then
  echo 'gantry: deploy.image: gantry:latest is not on this host; build it from the repository root: docker build -f docker/Dockerfile -t gantry:latest .' >&2
  exit 2
fi
echo 'gantry: API on http://localhost:8000/v1 once GET /ready answers 200 (logs: docker logs -f llama)'
docker run -d --init \
  --name llama \
  --pull never \
  --restart no \
  --gpus all \
  -e CUDA_VISIBLE_DEVICES=0 \
  -e NCCL_NVLS_ENABLE=0 \
  -v /data/llama-8b-q4.gguf:/models/llama-8b-q4.gguf:ro \
  -v /data/cache:/cache \
  -v /etc/gantry/api-key:/run/secrets/gantry-api-key:ro \
  -v "$JOB_DIR/engine.yaml":/etc/gantry/engine.yaml:ro \
  -p 8000:8000 \
  --ipc=host \
  --shm-size=64g \
  --stop-timeout 60 \
  --health-cmd "python3 -c 'import sys, urllib.request as r; r.urlopen(sys.argv[1], timeout=5)' http://127.0.0.1:8000/ready" \
  --health-interval 30s \
  --health-start-period 1800s \
  --entrypoint python3 \
  gantry:latest \
  -m launcher.torchrun \
  --nnodes 1 --nproc-per-node 1 \
  --standalone \
  --max-restarts 0 \
  -m engine.serve --config /etc/gantry/engine.yaml \
  --model /models/llama-8b-q4.gguf --tensor-parallel-size 1 --dtype bfloat16 --max-model-len 32768
