"""The one base class for input a user must fix: the CLI prints it as one line, the API maps it to a 4xx."""


class UserError(ValueError):
    """Bad input (a file, a setting, a model name); the message says what to fix."""
