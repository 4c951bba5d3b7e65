"""The one error type of every converter."""


class ConvertError(Exception):
    """The model cannot be converted; the message is one user-facing line."""
