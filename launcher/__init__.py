"""Gantry launcher: one Hydra config to docker run scripts, sbatch jobs, k8s manifests or local torchrun."""
