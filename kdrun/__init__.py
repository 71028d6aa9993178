"""kdrun — a command-line experiment runner for self-knowledge-distillation research.

Entry points: ``kdrun`` / ``python -m kdrun`` (the Hydra training app, :mod:`kdrun.cli`),
``kdrun-report`` (:mod:`kdrun.report`) and ``kdrun-hilbert`` (:mod:`kdrun.theory.cli`).
"""

__version__ = "0.1.0"
