"""The one exception type the CLI turns into a single line on stderr instead of a traceback, and how any
exception's message becomes one line."""


class UserError(Exception):
    """A failure the user can fix (a bad path, file, flag or config); the message is one sentence."""


def one_line(e: BaseException) -> str:
    """The exception's message on one line (empty when it has none)."""
    return " ".join(str(e).split())
