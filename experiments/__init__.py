"""Experiments: reproductions that anyone can rerun (see each subpackage's docstring)."""
