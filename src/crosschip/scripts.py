"""What the benchmark scripts share with the CLI's manners: numbers checked by argparse,
and a library error printed as one line, never as a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from crosschip.errors import CrosschipError


def positive_int(text: str) -> int:
    """An argparse `type`: an integer >= 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    """An argparse `type`: comma-separated integers >= 1 (`1,8,32`)."""
    try:
        return [positive_int(part) for part in text.split(",")]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 1 (such as 1,8,32), got {text!r}: {e}"
        ) from None


def run_main(main: Callable[[], None]) -> None:
    """Run a script's `main`; a CrosschipError (a bad config value, a missing bundle) ends it
    with `SCRIPT: error: ...` and exit status 1."""
    try:
        main()
    except CrosschipError as e:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")
