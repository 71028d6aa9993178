"""Hydra config tree of kdrun (a package so the configs are found from the installed package)."""
