"""``python -m kdrun`` runs the training app (same as the ``kdrun`` console script)."""

from kdrun.cli import main

if __name__ == "__main__":
    main()
