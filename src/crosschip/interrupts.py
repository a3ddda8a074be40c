"""Ctrl-C (and SIGTERM) that libraries cannot swallow.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread is. Some libraries
catch it there: an interrupted import inside torch.export becomes an AttributeError about a
half-imported module, which torch.onnx.export takes for a failed strategy and retries with
the next one. The CLI counts SIGINTs here, so a stage can `check()` after such a call and
the CLI can tell an interruption from a failure.

SIGTERM, the signal a supervisor (systemd, docker stop, Kubernetes) stops a process with,
takes the same path: by default it ends Python at once, with no `finally`, and a stage's
processes in their own sessions (`crosschip run`'s server, torchrun's workers) would live on.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_seen = 0
_last = signal.SIGINT


def install() -> dict:
    """Count SIGINTs and SIGTERMs from now on; each raises KeyboardInterrupt.

    Also where SIGINT came in ignored: a process started in the background of a script
    inherits it so, and Python then installs no handler, so an explicit `kill -INT` would be
    lost and the stage would run to its end. Ctrl-C, `kill -INT` and `kill` always stop a
    stage. Nothing is installed off the main thread, where Python cannot set handlers. The
    count starts again at 0: a signal before this call (one an earlier in-process `main()`
    saw, in a test runner) is not this stage's. Returns the handlers it replaced.
    """
    global _seen, _last
    _seen, _last = 0, signal.SIGINT
    previous = {}
    try:
        for signum in SIGNALS:
            previous[signum] = signal.signal(signum, _on_signal)
    except ValueError:  # not the main thread
        pass
    return previous


def restore(previous: dict) -> None:
    """Put back the handlers `install()` replaced."""
    for signum, handler in previous.items():
        if handler is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signum, handler)


def _on_signal(signum, frame):
    global _seen, _last
    _seen += 1
    _last = signum
    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt


def seen() -> bool:
    """Whether a SIGINT or SIGTERM arrived since `install()`."""
    return _seen > 0


def exit_code() -> int:
    """The shell's code for the last stopping signal: 130 after SIGINT, 143 after SIGTERM."""
    return 128 + int(_last)


def signal_name() -> str:
    return signal.Signals(_last).name


def stopped_by_signal(code: int) -> bool:
    """Whether a stage process's exit code says it was stopped by SIGINT or SIGTERM."""
    return code in {128 + int(s) for s in SIGNALS}


def check() -> None:
    """Raise KeyboardInterrupt if a SIGINT or SIGTERM arrived, whatever a library did with it."""
    if _seen:
        raise KeyboardInterrupt


@contextlib.contextmanager
def held(*, second_stops: bool = False) -> Iterator[list[int]]:
    """Hold a Ctrl-C (or SIGTERM) until the block ends, then raise it as usual. Yields the list
    of signals caught so far, for a block that acts on them before it ends.

    For a step that must not be cut in two: `Process.start` creates the child before it
    returns the handle that can stop it, and a KeyboardInterrupt in between would leave the
    child running alone. The handler is swapped, not the signal ignored: an ignored SIGINT
    would be lost (the other threads take it and drop it) and inherited by the child.
    With `second_stops`, a second signal raises at once, inside the block: for a block that
    can take long or hang (a training step), where the user must still be able to stop it.
    """
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught  # handlers can only be set on the main thread, and signals only run there
        return
    previous: dict = {}

    def hold(signum, frame):
        caught.append(signum)
        if second_stops and len(caught) == 2:
            restore(previous)
            _deliver(previous[signum], signum, frame)

    previous.update({signum: signal.signal(signum, hold) for signum in SIGNALS})
    try:
        yield caught
    finally:
        restore(previous)
        if caught and not (second_stops and len(caught) >= 2):  # a second one was delivered already
            _deliver(previous[caught[0]], caught[0], None)


@contextlib.contextmanager
def forwarded_to(proc) -> Iterator[list[int]]:
    """Send each SIGINT or SIGTERM this process gets to `proc` as a SIGTERM until the block
    ends, instead of raising here. Yields the list of signals forwarded.

    For a process the user stops this way on purpose: `crosschip run --serve` stays up until
    Ctrl-C, and the server drains on its first SIGTERM and aborts what is left on its second,
    so each Ctrl-C does to it what it does to `crosschip serve` itself. The stage then ends as
    finished, not interrupted. Off the main thread, nothing is forwarded.
    """
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def forward(signum, frame):
        caught.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    previous = {signum: signal.signal(signum, forward) for signum in SIGNALS}
    try:
        yield caught
    finally:
        restore(previous)


def _deliver(handler, signum: int, frame) -> None:
    """What `handler` would have done with the signal, now."""
    if callable(handler):
        handler(signum, frame)  # Python's SIGINT handler, or install()'s, raises KeyboardInterrupt
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # the default action, as if the signal came now
