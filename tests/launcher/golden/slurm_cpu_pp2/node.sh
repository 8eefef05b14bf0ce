#!/usr/bin/env bash
# gantry: smollm2 on 1 node(s) x 2 CPU processes (tp1 x pp2), deploy=slurm
# engine.yaml: model embedded SmolLM2, served as its own name, tensor_parallel_size 1, pipeline_parallel_size 2, dtype auto, max_model_len 8192, no API key
# Started by srun on every node of the job (environment from job.sbatch): one torchrun
# per node, node rank = $SLURM_NODEID, rendezvous on $MASTER_ADDR.
set -euo pipefail
exec /opt/gantry/bin/python -m torch.distributed.run \
  --nnodes "$SLURM_NNODES" --nproc-per-node 2 \
  --standalone \
  --max-restarts 0 \
  -m engine.serve --config /srv/gantry/job/engine.yaml
