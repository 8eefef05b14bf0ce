#!/usr/bin/env bash
# gantry: smollm2 on 1 node(s) x 1 CPU processes (tp1 x pp1), deploy=docker
# engine.yaml: model embedded SmolLM2, served as its own name, tensor_parallel_size 1, pipeline_parallel_size 1, dtype auto, max_model_len 8192, no API key
# Node 0 of 1: starts container gantry-test from image gantry:latest.
# The last line repeats engine.yaml's values as the seed's vLLM flags (flags win over --config).
set -euo pipefail
JOB_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
if ! docker image inspect gantry:latest >/dev/null 2>&1; then
  echo 'gantry: deploy.image: gantry:latest is not on this host; build it from the repository root: docker build -f docker/Dockerfile -t gantry:latest .' >&2
  exit 2
fi
echo 'gantry: API on http://localhost:8000/v1 once GET /ready answers 200 (logs: docker logs -f gantry-test)'
docker run -d --init \
  --name gantry-test \
  --pull never \
  --restart no \
  -e NCCL_NVLS_ENABLE=0 \
  -v "$JOB_DIR/engine.yaml":/etc/gantry/engine.yaml:ro \
  --network host \
  --ipc=host \
  --shm-size=1g \
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
  --tensor-parallel-size 1 --dtype auto --max-model-len 8192
