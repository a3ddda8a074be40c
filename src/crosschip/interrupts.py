"""Ctrl-C that libraries cannot swallow.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread is. Some libraries
catch it there: an interrupted import inside torch.export becomes an AttributeError about a
half-imported module, which torch.onnx.export takes for a failed strategy and retries with
the next one. The CLI counts SIGINTs here, so a stage can `check()` after such a call and
the CLI can tell an interruption from a failure.
"""

from __future__ import annotations

import signal

_seen = 0


def install() -> None:
    """Count SIGINTs from now on; each still raises KeyboardInterrupt.

    Left alone when SIGINT is not Python's default handler (ignored in a background job) or
    off the main thread: a stage that wants Ctrl-C there sets its own handler.
    """

    def on_sigint(signum, frame):
        global _seen
        _seen += 1
        signal.default_int_handler(signum, frame)

    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        pass


def seen() -> bool:
    """Whether a SIGINT arrived since `install()`."""
    return _seen > 0


def check() -> None:
    """Raise KeyboardInterrupt if a SIGINT arrived, whatever a library did with it."""
    if _seen:
        raise KeyboardInterrupt
