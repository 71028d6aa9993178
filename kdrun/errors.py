"""User-facing errors.

Every error a user can cause by bad input derives from :class:`KdrunError`. The CLI prints such
errors as one line (``kdrun: error: ...``) without a traceback and exits with status 2; anything
else is a bug and keeps its traceback.
"""


class KdrunError(RuntimeError):
    """An error caused by input the user can fix; ``str(err)`` is one line naming the fix."""


class ConfigError(KdrunError):
    """A config value is unknown, of the wrong type, or out of range."""


class CheckpointError(KdrunError):
    """A checkpoint file is missing, truncated or corrupt."""


class NonFiniteLossError(KdrunError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""
