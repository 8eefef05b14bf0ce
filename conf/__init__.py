"""Hydra config groups of the launcher (data only; a package so that it ships in the wheel)."""
