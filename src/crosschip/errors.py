"""Errors that reach the user as one clear line, never a traceback."""


class CrosschipError(Exception):
    """A problem the user can fix; the CLI prints the message and exits with `exit_code`."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class BundleError(CrosschipError):
    """A bundle that is missing files, has wrong tensors or fails its checksums."""
