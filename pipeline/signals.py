"""Graceful interruption of a run: SIGINT (Ctrl-C) and SIGTERM (``kill``, schedulers).

The first signal raises :class:`KeyboardInterrupt` in the main thread: the runner stops
the stage (the executor's workers with it), keeps every batch already committed, marks
the run ``interrupted`` in ``run.json`` and the command exits with 130; rerunning it
resumes. A second signal while that clean-up runs exits at once (still 130; committed
batches are safe either way, each part is written whole or not at all).

The stall watchdog (:class:`Watchdog`) interrupts the main thread through the same SIGINT
handler (:func:`watchdog_interrupt_main`); that is not a user's signal and is not counted. So
does a run's lost lease on an object-store run directory (:func:`raise_in_main`): the
handler raises that error, and the run fails with it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

EXIT_INTERRUPTED = 130

_watchdog = threading.Event()
#: errors other threads raise in the main thread through the SIGINT handler
#: (:func:`raise_in_main`), and how many such interrupts are still to arrive
_pending: list[BaseException] = []
_expected = [0]
_installed: list[GracefulSignals] = []


def watchdog_interrupt_main() -> None:
    """Interrupt the main thread for the stall watchdog (not counted as a user signal)."""
    import _thread

    _watchdog.set()
    _thread.interrupt_main()


def raise_in_main(exc: BaseException) -> bool:
    """Raise ``exc`` in the main thread while a run's handlers are installed (a lost run
    lease). Returns False, doing nothing, when they are not (no run in progress)."""
    import _thread

    if not _installed:
        return False
    _pending.append(exc)
    _expected[0] += 1
    _thread.interrupt_main()
    return True


def discard_pending(exc: BaseException) -> None:
    """The main thread raised ``exc`` itself: the interrupt for it, when it comes, does
    nothing."""
    if exc in _pending:
        _pending.remove(exc)


class RunInterrupted(KeyboardInterrupt):
    """The run received SIGINT or SIGTERM (``signal_name``)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"interrupted by {signal_name}")
        self.signal_name = signal_name


class GracefulSignals:
    """Handlers for SIGINT and SIGTERM for the duration of a run (main thread only).

    ``on_force(signal_name)`` runs (best effort) before a second signal exits the process.
    Call :meth:`install` again after a library replaced the handlers (``ray.init`` sets
    its own SIGTERM handler)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_force: Callable[[str], None] | None = None) -> None:
        self.on_force = on_force
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> GracefulSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.SIGNALS:
            current = signal.getsignal(sig)
            if current is not self._handle:
                self._old.setdefault(sig, current)
                signal.signal(sig, self._handle)
        if self not in _installed:
            _installed.append(self)
        return self

    def restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old.clear()
        if self in _installed:
            _installed.remove(self)

    def __enter__(self) -> GracefulSignals:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and _expected[0] > 0:  # from raise_in_main
            _expected[0] -= 1
            if _pending:
                raise _pending.pop(0)
            return  # the main thread raised it already
        if signum == signal.SIGINT and _watchdog.is_set():
            _watchdog.clear()
            raise KeyboardInterrupt("stall watchdog")
        name = signal.Signals(signum).name
        if self.received is not None:
            try:
                sys.stderr.write(f"\nspeechmill: interrupted by {name} (a second signal): "
                                 "exiting now; committed batches are kept, rerun the same "
                                 "command to resume\n")
                sys.stderr.flush()
                if self.on_force is not None:
                    self.on_force(name)
            finally:
                os._exit(EXIT_INTERRUPTED)
        self.received = name
        raise RunInterrupted(name)


class Watchdog:
    """Interrupts the main thread when no batch finished for ``timeout_s`` seconds."""

    def __init__(self, timeout_s: float, what: str) -> None:
        self.timeout_s = timeout_s
        self.what = what
        self.last = time.monotonic()
        self.fired = False
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True, name="speechmill-watchdog")

    def __enter__(self) -> Watchdog:
        self._old_handler = None
        # background jobs (`cmd &`) start with SIGINT ignored: interrupt_main would then
        # do nothing, so install Python's handler for the watchdog's duration
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
            self._old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(timeout=5)
        if self._old_handler is not None:
            signal.signal(signal.SIGINT, self._old_handler)

    def tick(self) -> None:
        self.last = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            if time.monotonic() - self.last > self.timeout_s and not self._stop.is_set():
                self.fired = True
                watchdog_interrupt_main()
                return
