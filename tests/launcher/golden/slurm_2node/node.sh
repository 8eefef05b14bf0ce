#!/usr/bin/env bash
# gantry: deepseek32b on 2 node(s) x 2 GPUs (tp2 x pp2), deploy=slurm
# engine.yaml: model /srv/models/deepseek-ai/DeepSeek-R1-Distill-Qwen-32B, served as deepseek-ai/DeepSeek-R1-Distill-Qwen-32B, tensor_parallel_size 2, pipeline_parallel_size 2, dtype float16, max_model_len 128000, API key from $GANTRY_API_KEY
# Started by srun on every node of the job (environment from job.sbatch): one torchrun
# per node, node rank = $SLURM_NODEID, rendezvous on $MASTER_ADDR.
set -euo pipefail
JOB_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
if ! python3 -c "import torch, engine, launcher.torchrun" >/dev/null 2>&1; then
  echo "gantry: deploy.python: python3 on $(hostname) cannot import torch and gantry's engine; set deploy.python to an interpreter every node has (a venv's bin/python on the shared home), or deploy.setup lines that activate one" >&2
  exit 2
fi
exec python3 -m launcher.torchrun \
  --nnodes "$SLURM_NNODES" --nproc-per-node 2 \
  --node-rank "$SLURM_NODEID" --master-addr "$MASTER_ADDR" --master-port 29500 \
  --max-restarts 0 \
  -m engine.serve --config "$JOB_DIR/engine.yaml"
