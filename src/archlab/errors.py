"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, corrupt checkpoint)."""
