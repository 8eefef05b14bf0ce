#!/usr/bin/env bash
# gantry: llama3.1-8b on 1 node(s) x 2 GPUs (tp2 x pp1), deploy=slurm
# engine.yaml: model /data/llama-8b, served as meta-llama/Llama-3.1-8B-Instruct, tensor_parallel_size 2, pipeline_parallel_size 1, dtype bfloat16, max_model_len 32768, API key in engine.yaml
# Started by srun on every node of the job (environment from job.sbatch): one torchrun
# per node, node rank = $SLURM_NODEID, rendezvous on $MASTER_ADDR.
set -euo pipefail
exec python3 -m torch.distributed.run \
  --nnodes "$SLURM_NNODES" --nproc-per-node 2 \
  --standalone \
  --max-restarts 0 \
  -m engine.serve --config /srv/gantry/job/engine.yaml
