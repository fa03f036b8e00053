"""The one exception type the command line turns into a one-line error message."""


class CapsnetError(Exception):
    """A problem with the user's input (files, flags, checkpoints): reported in one line."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its type's name if it has none):
    the part of a library's multi-line error that fits a one-line report."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
