"""Errors every layer of the engine may raise: the bottom layer, importing nothing of the engine."""


class ActionError(RuntimeError):
    """A failure the user can act on (a missing file, bad data, a device that is absent).

    The CLI writes its message to status.json as FAILURE and prints it without a traceback.
    """


class InputFileError(ValueError):
    """An input file refused for what it holds (a decompression bomb, an unsafe archive member); the message
    names the file and what was expected.

    Raised deep in the readers, where no action wraps it: the CLI treats it like :class:`ActionError`.
    """
