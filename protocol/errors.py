"""The one exception root of fl-pqsu.

Every error a user can cause (bad flag, missing file, corrupt payload) derives from
`PqsuError`, so the command line prints its message as one line and exits non-zero
instead of showing a traceback. Anything else is a bug and keeps its traceback.
"""


class PqsuError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class CodecError(PqsuError):
    """A payload that is not a valid fl-pqsu message (truncated, corrupt, oversize, forged)."""
