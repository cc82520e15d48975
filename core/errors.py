"""The one exception type for mistakes a user can fix: the CLI prints it as one line, exit 2."""


class UserError(Exception):
    """Bad input (config, file, architecture); the message names the problem in one line."""
