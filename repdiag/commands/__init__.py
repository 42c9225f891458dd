"""Typer command groups, one module per group; :mod:`repdiag.cli` mounts them.

Each module defines ``register(app)``. Command bodies parse arguments and call the rooms
(models, transition, theory, ...); they hold no logic of their own and import torch lazily.
"""
