#!/usr/bin/env bash
# gantry: llama3.1-8b on 1 node(s) x 1 GPUs (tp1 x pp1), deploy=docker
# engine.yaml: model /models, served as meta-llama/Llama-3.1-8B-Instruct, tensor_parallel_size 1, pipeline_parallel_size 1, dtype bfloat16, max_model_len 32768, API key from $GANTRY_API_KEY
# Node 0 of 1: starts container gantry-test from image gantry:latest.
# The last line repeats engine.yaml's values as the seed's vLLM flags (flags win over --config).
set -euo pipefail
JOB_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
printenv GANTRY_API_KEY >/dev/null || { echo "gantry: set GANTRY_API_KEY to the API key (or render with server=noauth)" >&2; exit 2; }
if [ ! -e /srv/models/meta-llama/Llama-3.1-8B-Instruct ]; then
  echo 'gantry: model.local_dir: /srv/models/meta-llama/Llama-3.1-8B-Instruct does not exist on this host; fetch the weights first: hf download meta-llama/Llama-3.1-8B-Instruct --local-dir /srv/models/meta-llama/Llama-3.1-8B-Instruct' >&2
  exit 2
fi
if ! docker image inspect gantry:latest >/dev/null 2>&1; then
  echo 'gantry: deploy.image: gantry:latest is not on this host; build it from the repository root: docker build -f docker/Dockerfile -t gantry:latest .' >&2
  exit 2
fi
echo 'gantry: API on http://localhost:8000/v1 once GET /ready answers 200 (logs: docker logs -f gantry-test)'
docker run -d --init \
  --name gantry-test \
  --pull missing \
  --restart no \
  --gpus all \
  -e CUDA_VISIBLE_DEVICES=0 \
  -e NCCL_NVLS_ENABLE=0 \
  -e GANTRY_API_KEY \
  -v /srv/models/meta-llama/Llama-3.1-8B-Instruct:/models:ro \
  -v /data/lora/sql:/adapters/0:ro \
  -v /data/lora/chat:/adapters/1:ro \
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
  --model /models --tensor-parallel-size 1 --dtype bfloat16 --max-model-len 32768
