"""The one error type users see. The CLI prints its message without a traceback."""


class HdistillError(Exception):
    """A problem with the user's input or configuration, worded for the user.

    The message names the option, file or sample at fault and, where there is one,
    what to do about it.
    """
