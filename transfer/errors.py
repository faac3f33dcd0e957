"""The project's own error types: mistakes a user can act on, printed as one line.

``python -m transfer.train_net`` prints these as ``error: <message>`` and exits; every other
exception is a bug and keeps its traceback. Each type also derives from the builtin a caller
would expect (KeyError for an unknown name, ValueError for a bad value, ...).
"""


class UserError(Exception):
    """An error in what the user asked for (task, weights, dataset, override), not a bug."""

    def __str__(self):
        msg = str(self.args[0]) if self.args else ""
        # re-raised from a DataLoader worker, the message carries the worker's traceback
        # ("Caught X in DataLoader worker process 0.\nOriginal Traceback ...\nX: msg"):
        # keep the original message only
        if msg.startswith("Caught ") and "Original Traceback" in msg:
            last = msg.rstrip().splitlines()[-1]
            msg = last.split(": ", 1)[1] if ": " in last else last
        return msg


class ConfigError(UserError, KeyError):
    """An unknown task, scale or config key, or an override value of the wrong type."""


class WeightsError(UserError, ValueError):
    """Weights that cannot be used: missing file, wrong format, no metadata."""


class CorruptImage(UserError, OSError):
    """A dataset image that cannot be read."""


class CheckpointUnreadable(UserError, RuntimeError):
    """A checkpoint given explicitly that cannot be read."""
