"""Tests against real daemons (Slurm, Docker) started by the fixtures in conftest.py."""
