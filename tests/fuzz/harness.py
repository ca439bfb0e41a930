"""What the fuzz targets share: a per-example deadline and each target's example budget."""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings


def budget(n_targets: int) -> Any:
    """Settings that share the loaded profile's examples among a file's ``n_targets``."""
    return settings(max_examples=max(1, settings.default.max_examples // n_targets))


class Hang(BaseException):  # noqa: N818 - not an Exception: the code under test can't catch it
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread when the block runs past ``seconds``."""
    def fire(*_: Any) -> None:
        raise Hang(f"example took more than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def refuse_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """No name lookups and no connections: a target never reaches the network."""
    def refuse(*_: Any, **__: Any) -> Any:
        raise OSError("network refused in the fuzz target")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
