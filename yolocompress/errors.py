"""The one exception type users see: its message is a one-line, user-facing error."""

__all__ = ["YoloCompressError"]


class YoloCompressError(Exception):
    """A user-facing error: the CLI prints `error: <message>` and exits with status 2, no traceback."""
