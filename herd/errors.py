"""The one exception type for mistakes a user can fix; the CLI prints it as one line, never a traceback."""


class UserError(Exception):
    """A problem in what the user gave us (a file, a flag, a value), with the fix in the message."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
