"""Jinja templates of the launcher's artefacts (data only; a package so that it ships in the wheel)."""
