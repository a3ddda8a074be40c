"""Errors that reach the user as one clear line, never a traceback."""


class CrosschipError(Exception):
    """A problem the user can fix; the CLI prints the message and exits with `exit_code`."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def flag(name: str) -> str:
    """A setting's command-line flag, as errors name it: block_size -> --block-size,
    drain_timeout_s -> --drain-timeout."""
    return "--" + name.removesuffix("_s").replace("_", "-")


class BundleError(CrosschipError):
    """A bundle that is missing files, has wrong tensors or fails its checksums."""


def first_line(error: BaseException) -> str:
    """`Type: first line of the message`: an exception named in one line of a log or a
    warning (a compiler's or a kernel's message can run to pages of advice)."""
    line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {line}" if line else type(error).__name__
