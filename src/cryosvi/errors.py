"""The one exception type for user mistakes: the CLI prints its message, never a traceback."""


class CryosviError(Exception):
    """A problem with the user's input (file, option or number), stated in one line."""


class CryosviWarning(UserWarning):
    """Something in the input that cryosvi works around (a default, a mismatch); the
    command line prints it as one ``warning:`` line."""
