"""User-facing errors.

Every error a user can cause by bad input derives from :class:`KdrunError`. The CLI prints such
errors as one line (``kdrun: error: ...``) without a traceback and exits with status 2; anything
else is a bug and keeps its traceback.
"""


class KdrunError(RuntimeError):
    """An error caused by input the user can fix; ``str(err)`` is one line naming the fix."""


class ConfigError(KdrunError):
    """A config value is unknown, of the wrong type, or out of range."""


class DatasetError(KdrunError):
    """Dataset files are missing or broken, a download failed, or a dataset option is invalid."""


class CheckpointError(KdrunError):
    """A checkpoint file is missing, truncated or corrupt."""


class NonFiniteLossError(KdrunError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``"<ExceptionType>: <message>"`` on one line (whitespace collapsed, cut to ``limit`` chars),
    for quoting a library's exception inside a kdrun error or warning."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
