"""The one exception type the command line turns into a one-line error message."""


class CapsnetError(Exception):
    """A problem with the user's input (files, flags, checkpoints): reported in one line."""
