"""Ctrl-C that libraries cannot swallow.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread is. Some libraries
catch it there: an interrupted import inside torch.export becomes an AttributeError about a
half-imported module, which torch.onnx.export takes for a failed strategy and retries with
the next one. The CLI counts SIGINTs here, so a stage can `check()` after such a call and
the CLI can tell an interruption from a failure.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_seen = 0


def install() -> None:
    """Count SIGINTs from now on; each still raises KeyboardInterrupt.

    Also where SIGINT came in ignored: a process started in the background of a script
    inherits it so, and Python then installs no handler, so an explicit `kill -INT` would be
    lost and the stage would run to its end. Ctrl-C and `kill -INT` always stop a stage.
    Nothing is installed off the main thread, where Python cannot set handlers. The count
    starts again at 0: a SIGINT before this call (one an earlier in-process `main()` saw, in a
    test runner) is not this stage's.
    """
    global _seen
    _seen = 0

    def on_sigint(signum, frame):
        global _seen
        _seen += 1
        signal.default_int_handler(signum, frame)

    try:
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


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold a Ctrl-C until the block ends, then raise it as usual.

    For a step that must not be cut in two: `Process.start` creates the child before it
    returns the handle that can stop it, and a KeyboardInterrupt in between would leave the
    child running alone. The handler is swapped, not the signal ignored: an ignored SIGINT
    would be lost (the other threads take it and drop it) and inherited by the child.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set on the main thread, and signals only run there
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, None)  # Python's handler, or install()'s, raises KeyboardInterrupt
        elif caught and previous == signal.SIG_DFL:
            raise KeyboardInterrupt
