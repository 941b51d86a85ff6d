"""The one exception root of fl-pqsu.

Every error a user can cause (bad flag, missing file, corrupt payload) derives from
`PqsuError`, so the command line prints its message as one line and exits non-zero
instead of showing a traceback. Anything else is a bug and keeps its traceback.

A rejected update payload raises a `CodecError` whose class attribute `reason` is a short,
stable key a coordinator can count rejections by (docs/protocol.md, "Rejection reasons").
"""


class PqsuError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class CodecError(PqsuError):
    """A payload that is not a valid fl-pqsu message (truncated, corrupt, oversize, forged).

    Raised as is for malformed content that the subclasses below do not name.
    """

    reason = "corrupt"


class ChecksumError(CodecError):
    """The CRC32 does not match the bytes before it."""

    reason = "bad-checksum"


class SignatureError(CodecError):
    """A key was given and the HMAC does not verify with it, or the message is unsigned."""

    reason = "bad-signature"


class OversizeError(CodecError):
    """The payload or a size it declares exceeds the receiver's `Limits`."""

    reason = "oversize"


class TruncatedError(CodecError):
    """The bytes end before the structure they declare does."""

    reason = "truncated"


class UnsupportedError(CodecError):
    """Not a message this build can read: bad magic, or an unknown version, kind or flag."""

    reason = "unsupported"
