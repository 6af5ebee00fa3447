"""The one exception type the CLI turns into a one-line error."""


class DpmotError(ValueError):
    """Bad input or an unusable resource; the message names the object and the problem."""
