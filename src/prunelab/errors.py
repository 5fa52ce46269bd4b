"""User-facing errors.

Every problem a user can fix (bad path, bad sparsity, missing data) is raised as a
`PrunelabError` subclass with a one-line message that names the problem and the fix. The
CLI prints the message without a traceback and exits with code 2.
"""


class PrunelabError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ModelLoadError(PrunelabError):
    """The model spec could not be resolved or loaded."""


class ConfigError(PrunelabError):
    """An option or configuration value is invalid."""


class DataError(PrunelabError):
    """A dataset or calibration file is missing, empty or malformed."""


class CheckpointError(PrunelabError):
    """A checkpoint file is corrupt, truncated or in an unexpected format."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name): what a one-line error quotes."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
