"""The one exception type for mistakes in user input (files, configs, flags)."""


class UserError(Exception):
    """A user mistake, reported by the CLI as one line naming the file/line/parameter, exit code 2."""
