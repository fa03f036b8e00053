"""The one exception type the command line turns into a one-line error message."""


class CapsnetError(Exception):
    """A problem with the user's input (files, flags, checkpoints): reported in one line."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its type's name if it has none):
    the part of a library's multi-line error that fits a one-line report."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_positive(*flags: tuple[str, float | None]) -> None:
    """Refuse, in one line, a flag's value that is not positive: ``("--batch-size", 0)`` gives
    "--batch-size must be positive, got 0". ``None`` means the flag was not given."""
    for flag, value in flags:
        if value is not None and not value > 0:
            raise CapsnetError(f"{flag} must be positive, got {value}")


def check_not_negative(*flags: tuple[str, float | None]) -> None:
    """As :func:`check_positive`, for flags where 0 is allowed ("--warmup must not be
    negative, got -1")."""
    for flag, value in flags:
        if value is not None and not value >= 0:
            raise CapsnetError(f"{flag} must not be negative, got {value}")
