"""The one exception that mmssm raises for a user's mistake.

Library code raises :class:`UserError` for bad input (a config value, a
file, a checkpoint, data); the tools turn it into one ``error: ...`` line
and exit status 1. Anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input (config, arguments, files, data).

    A subclass of ValueError, so that callers that catch bad values keep
    working.
    """
