"""The project's own error types: mistakes a user can act on, printed as one line.

``python -m transfer.train_net`` prints these as ``error: <message>`` and exits; every other
exception is a bug and keeps its traceback. Each type also derives from the builtin a caller
would expect (KeyError for an unknown name, ValueError for a bad value, ...). Their root,
``UserError``, is the whole project's (``convert/errors.py``).
"""
from convert.errors import UserError


class ConfigError(UserError, KeyError):
    """An unknown task, scale or config key, or an override value of the wrong type."""


class WeightsError(UserError, ValueError):
    """Weights that cannot be used: missing file, wrong format, no metadata."""


class CorruptImage(UserError, OSError):
    """A dataset image that cannot be read."""

