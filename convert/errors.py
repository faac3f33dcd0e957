"""The project's root error type: a mistake a user can act on, printed as one line.

Every stage's entry point prints a ``UserError`` as ``error: <message>`` and exits non-zero;
every other exception is a bug and keeps its traceback. It lives here, at the bottom of the
pipeline, so that an error raised by a shared piece (a refused checkpoint, ``safe_load.py``) is
a user error for every stage that calls it.
"""

class UserError(Exception):
    """An error in what the user asked for (task, weights, checkpoint, dataset), not a bug."""

    def __str__(self):
        msg = str(self.args[0]) if self.args else ""
        # re-raised from a DataLoader worker, the message carries the worker's traceback
        # ("Caught X in DataLoader worker process 0.\nOriginal Traceback ...\nX: msg"):
        # keep the original message only
        if msg.startswith("Caught ") and "Original Traceback" in msg:
            last = msg.rstrip().splitlines()[-1]
            msg = last.split(": ", 1)[1] if ": " in last else last
        return msg

