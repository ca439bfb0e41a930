"""Engine errors. Per-row problems are never exceptions: they are reject rows."""

from __future__ import annotations

import errno as _errno


class SpeechmillError(Exception):
    """Base of errors that stop a run (misconfiguration, engine failures)."""


class ConfigError(SpeechmillError):
    """The DAG or a stage config is wrong. Raised before any work starts."""

    def __init__(self, message: str, *, stage: str | None = None, key: str | None = None):
        where = ""
        if stage:
            where = f"stage {stage!r}"
            if key:
                where += f", key {key!r}"
            where += ": "
        elif key:
            where = f"key {key!r}: "
        super().__init__(where + message)
        self.stage = stage
        self.key = key


class StallError(SpeechmillError):
    """No batch finished for longer than the executor's stall timeout."""


class RunLockedError(SpeechmillError):
    """Another live process is running a DAG on the same run directory."""


class LeaseLostError(RunLockedError):
    """This run's lease on its run directory (on object storage) could not be renewed in
    time or was taken over by another run: the run stops rather than write beside it."""


class StageFailedError(SpeechmillError):
    """A stage cannot go on: its ``setup()`` failed, the run directory cannot be written,
    or it raised an error that no row is to blame for (disk full, a :class:`SpeechmillError`
    such as a missing model). Never turned into per-row rejects, on any executor.

    ``cause_type`` and ``cause`` are the original error's type name and message (the
    original exception may have lived in another process)."""

    def __init__(self, stage: str, message: str, *, cause_type: str | None = None,
                 cause: str | None = None, traceback: str | None = None) -> None:
        super().__init__(f"stage {stage!r}: {message}")
        self.stage = stage
        self.cause_type = cause_type
        self.cause = cause
        #: the worker's traceback (text: it may come from another process)
        self.traceback = traceback


class ErrorBudgetExceeded(StageFailedError):
    """More of a stage's rows failed with engine errors (``error``, ``worker_crash``)
    than its ``max_error_fraction`` allows: that is a broken stage or environment, not
    bad input."""


class StoreError(SpeechmillError):
    """The run directory could not be written (disk full, read-only, permission denied).
    A worker raises it instead of turning the batch into rejects."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


#: errno values that mean "the disk or filesystem refuses writes": never a row's fault
FATAL_ERRNOS = frozenset({_errno.ENOSPC, _errno.EROFS, _errno.EDQUOT})


def is_fatal(exc: BaseException) -> bool:
    """Whether an exception raised while processing rows must stop the stage instead of
    rejecting the row: engine errors (:class:`SpeechmillError`, e.g. a missing model, a
    run store that cannot be written, an LLM budget) and a full or read-only disk
    (``ENOSPC``, ``EDQUOT``, ``EROFS``) anywhere in the exception's chain (a library that
    wraps the ``OSError`` keeps it as ``__cause__`` / ``__context__``)."""
    if isinstance(exc, SpeechmillError):
        return True
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FATAL_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    return False
