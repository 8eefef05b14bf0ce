#!/usr/bin/env bash
# gantry: llama3.1-8b on 1 node(s) x 2 GPUs (tp2 x pp1), deploy=slurm
# engine.yaml: model /data/llama-8b, served as meta-llama/Llama-3.1-8B-Instruct, tensor_parallel_size 2, pipeline_parallel_size 1, dtype bfloat16, max_model_len 32768, API key in engine.yaml
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
  --standalone \
  --max-restarts 0 \
  -m engine.serve --config "$JOB_DIR/engine.yaml"
