#!/usr/bin/env bash
# gantry: deepseek32b on 2 node(s) x 2 GPUs (tp2 x pp2), deploy=docker
# engine.yaml: model /models, served as deepseek-ai/DeepSeek-R1-Distill-Qwen-32B, tensor_parallel_size 2, pipeline_parallel_size 2, dtype float16, max_model_len 128000, API key from $GANTRY_API_KEY
# Node 0 of 2: starts container gantry-test-node0 from image gantry:latest.
# The last line repeats engine.yaml's values as the seed's vLLM flags (flags win over --config).
set -euo pipefail
JOB_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
printenv MY_KEY >/dev/null || { echo "gantry: set MY_KEY to the API key (or render with server=noauth)" >&2; exit 2; }
if [ ! -e /srv/models/deepseek-ai/DeepSeek-R1-Distill-Qwen-32B ]; then
  echo 'gantry: model.local_dir: /srv/models/deepseek-ai/DeepSeek-R1-Distill-Qwen-32B does not exist on this host; fetch the weights first: hf download deepseek-ai/DeepSeek-R1-Distill-Qwen-32B --local-dir /srv/models/deepseek-ai/DeepSeek-R1-Distill-Qwen-32B' >&2
  exit 2
fi
if ! docker image inspect gantry:latest >/dev/null 2>&1; then
  echo 'gantry: deploy.image: gantry:latest is not on this host; build it from the repository root: docker build -f docker/Dockerfile -t gantry:latest . (or push it to a registry and set deploy.image=REGISTRY/IMAGE)' >&2
  exit 2
fi
GANTRY_API_KEY="$(printenv MY_KEY)"
export GANTRY_API_KEY
echo 'gantry: API on http://10.0.0.1:8000/v1 once GET /ready answers 200 (logs: docker logs -f gantry-test-node0)'
docker run --init \
  --name gantry-test-node0 \
  --pull missing \
  --restart on-failure:3 \
  --gpus all \
  -e CUDA_VISIBLE_DEVICES=0,1 \
  -e NCCL_NVLS_ENABLE=0 \
  -e GANTRY_API_KEY \
  -v /srv/models/deepseek-ai/DeepSeek-R1-Distill-Qwen-32B:/models:ro \
  -v "$JOB_DIR/engine.yaml":/etc/gantry/engine.yaml:ro \
  --network host \
  --ipc=host \
  --shm-size=64g \
  --stop-timeout 60 \
  --health-cmd "python3 -c 'import sys, urllib.request as r; r.urlopen(sys.argv[1], timeout=5)' http://127.0.0.1:8000/ready" \
  --health-interval 30s \
  --health-start-period 1800s \
  --entrypoint python3 \
  gantry:latest \
  -m launcher.torchrun \
  --nnodes 2 --nproc-per-node 2 \
  --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 \
  --max-restarts 0 \
  -m engine.serve --config /etc/gantry/engine.yaml \
  --model /models --tensor-parallel-size 2 --pipeline-parallel-size 2 --dtype float16 --max-model-len 128000
