"""The one error type of spec resolution."""


class SpecError(ValueError):
    """A spec or override that cannot be run; the message says which key and what is allowed."""
