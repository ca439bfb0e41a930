"""Engine errors. Per-row problems are never exceptions: they are reject rows."""

from __future__ import annotations


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
