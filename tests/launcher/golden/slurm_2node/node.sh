#!/usr/bin/env bash
# gantry: deepseek32b on 2 node(s) x 2 GPUs (tp2 x pp2), deploy=slurm
# engine.yaml: model /srv/models/deepseek-ai/DeepSeek-R1-Distill-Qwen-32B, served as deepseek-ai/DeepSeek-R1-Distill-Qwen-32B, tensor_parallel_size 2, pipeline_parallel_size 2, dtype float16, max_model_len 128000, API key from $GANTRY_API_KEY
# Started by srun on every node of the job (environment from job.sbatch): one torchrun
# per node, node rank = $SLURM_NODEID, rendezvous on $MASTER_ADDR.
set -euo pipefail
exec python3 -m torch.distributed.run \
  --nnodes "$SLURM_NNODES" --nproc-per-node 2 \
  --node-rank "$SLURM_NODEID" --master-addr "$MASTER_ADDR" --master-port 29500 \
  --max-restarts 0 \
  -m engine.serve --config /srv/gantry/job/engine.yaml
