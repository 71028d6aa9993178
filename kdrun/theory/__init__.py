"""Theory experiments of kdrun.

Contract: :mod:`kdrun.theory.hilbert` implements the exact kernel model of self-distillation in
Hilbert space (Mobahi, Farajtabar & Bartlett, NeurIPS 2020; see docs/theory.md),
:mod:`kdrun.theory.plots` its plots and :mod:`kdrun.theory.cli` the ``kdrun-hilbert`` Hydra app.
Importing this package imports nothing heavy (no hydra, matplotlib or rich).
"""
