"""``python -m kdrun.report`` — the ``kdrun-report`` command."""

import sys

from kdrun.report.cli import main

sys.exit(main())
