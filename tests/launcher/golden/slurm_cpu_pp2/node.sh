#!/usr/bin/env bash
# gantry: smollm2 on 1 node(s) x 2 CPU processes (tp1 x pp2), deploy=slurm
# engine.yaml: model embedded SmolLM2, served as its own name, tensor_parallel_size 1, pipeline_parallel_size 2, dtype auto, max_model_len 8192, no API key
# Started by srun on every node of the job (environment from job.sbatch): one torchrun
# per node, node rank = $SLURM_NODEID, rendezvous on $MASTER_ADDR.
set -euo pipefail
JOB_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
if ! /opt/gantry/bin/python -c "import torch, engine, launcher.torchrun" >/dev/null 2>&1; then
  echo "gantry: deploy.python: /opt/gantry/bin/python on $(hostname) cannot import torch and gantry's engine; set deploy.python to an interpreter every node has (a venv's bin/python on the shared home), or deploy.setup lines that activate one" >&2
  exit 2
fi
exec /opt/gantry/bin/python -m launcher.torchrun \
  --nnodes "$SLURM_NNODES" --nproc-per-node 2 \
  --standalone \
  --max-restarts 0 \
  -m engine.serve --config "$JOB_DIR/engine.yaml"
