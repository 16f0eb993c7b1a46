"""Errors the user can act on. Their text is one line: what is wrong and what to do."""


class AdapruneError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class Cancelled(Exception):
    """Raised at a safe point when the control object asks the engine to stop."""
