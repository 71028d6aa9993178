"""Logging backends.

* :mod:`kdrun.loggers.base` — the :class:`~kdrun.loggers.base.Logger` protocol every backend
  implements and :class:`~kdrun.loggers.base.MultiLogger`, which fans calls out to several.
* :mod:`kdrun.loggers.jsonl` — ``metrics.jsonl`` and ``summary.json`` in the run dir, the local
  source of truth.
* :mod:`kdrun.loggers.wandb` — Weights & Biases (offline automatically without credentials, never
  prompts); the only module that imports wandb.
"""
