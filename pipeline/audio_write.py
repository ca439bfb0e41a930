"""Writing audio files so that a full or read-only disk surfaces as the ``OSError`` it is.

libsndfile reports a failed write as its own error ("problem with initialization of the
flac decoder", "System error") and drops the ``errno``, so a full disk under a stage's
media would look like a bad row and become a reject. Here soundfile writes through a
Python file object instead: the file's own ``OSError`` (``ENOSPC``, ``EDQUOT``,
``EROFS``) is kept and raised, with libsndfile's error as its context, which
:func:`speechmill.pipeline.errors.is_fatal` recognises as a run failure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


class _TrapWrites:
    """A binary file for soundfile's virtual I/O that remembers the first failed write.

    ``write`` returns 0 instead of raising (an exception inside soundfile's C callback
    would only be printed), which libsndfile reports as its own error; the caller then
    raises the remembered ``OSError``.
    """

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        if self.error is not None:
            return 0
        try:
            n = self._f.write(data)
        except OSError as e:
            self.error = e
            return 0
        return len(data) if n is None else n

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


@contextlib.contextmanager
def sound_writer(path: str | Path, samplerate: int, channels: int = 1, format: str = "FLAC",
                 subtype: str | None = None) -> Iterator[Any]:
    """``soundfile.SoundFile`` opened for writing ``path``; a failed write of the disk
    raises its ``OSError`` (errno kept), whatever libsndfile made of it."""
    import soundfile as sf

    trap: _TrapWrites | None = None
    try:
        with open(path, "w+b", buffering=0) as raw:
            trap = _TrapWrites(raw)
            with sf.SoundFile(trap, "w", samplerate=samplerate, channels=channels,
                              format=format, subtype=subtype) as out:
                yield out
    except Exception as e:  # libsndfile's error, soundfile's assertion, or the OSError
        if trap is not None and trap.error is not None and trap.error is not e:
            raise trap.error from e
        raise
    if trap is not None and trap.error is not None:  # libsndfile did not notice
        raise trap.error


def write_audio(path: str | Path, data: np.ndarray, samplerate: int, format: str = "WAV",
                subtype: str | None = "PCM_16") -> None:
    """Write a whole clip (float samples, clipped to [-1, 1]) like ``soundfile.write``."""
    x = np.clip(np.asarray(data, dtype=np.float32), -1.0, 1.0)
    channels = 1 if x.ndim == 1 else int(x.shape[1])
    with sound_writer(path, samplerate, channels=channels, format=format,
                      subtype=subtype) as out:
        out.write(x)
