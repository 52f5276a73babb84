"""Errors every layer of the engine may raise: the bottom layer, importing nothing of the engine."""


class ActionError(RuntimeError):
    """A failure the user can act on (a missing file, bad data, a device that is absent).

    The CLI writes its message to status.json as FAILURE and prints it without a traceback.
    """
