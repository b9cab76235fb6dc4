"""The one exception type the CLI turns into a single line on stderr instead of a traceback."""


class UserError(Exception):
    """A failure the user can fix (a bad path, file, flag or config); the message is one sentence."""
