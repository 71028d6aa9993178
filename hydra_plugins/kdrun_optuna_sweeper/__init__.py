"""kdrun's Hydra sweeper on Optuna (``hydra/sweeper: kdrun_optuna``, used by the
``hparams_search=...`` presets).

Hydra finds plugins in the ``hydra_plugins`` namespace package and imports every public module
of it at start-up, in every kdrun command: :mod:`.kdrun_optuna_sweeper` (the config schema and
the :class:`~hydra.plugins.sweeper.Sweeper` class) imports only Hydra and OmegaConf; Optuna and
the search loop (``_search.py``, ``_space.py``, ``_results.py``) load only when a search runs.
"""
