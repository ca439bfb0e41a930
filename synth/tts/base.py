"""The TTS interface every backend implements: text + optional voice prompt -> audio.

A backend is configured by a :class:`~speechmill.synth.tts.spec.TTSSpec` and built by
:func:`~speechmill.synth.tts.loader.load_backend`. ``synthesize`` splits text longer
than the backend's ``max_chars`` at sentence boundaries, synthesizes each chunk with the
same voice and joins them with pauses; a backend implements only ``load`` and
``_synthesize_chunk``. Per-call failures (unreadable prompt, server error after retries,
model error) raise :class:`TTSError`, which a stage turns into a ``tts_error`` reject;
misconfiguration (missing model, bad key) raises at load time.

A :class:`TTSError` carries ``transient``: True when a service failed after its retries
(a TTS server that refuses connections or times out, HTTP 408/425/429/5xx beyond the
retry budget): the ``tts`` stage's reject is then transient (counted toward the error
budget, retried by a rerun). False for what the input earns: empty text, an unreadable
prompt, other 4xx answers, audio that cannot be decoded, a model failing on the text.
Messages are redacted (:func:`speechmill.pipeline.redact.redact_text`) before they are
cut short.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from speechmill.synth.tts.text import join_with_pauses, split_text

if TYPE_CHECKING:
    from speechmill.synth.tts.spec import TTSSpec

VoiceSource = Literal["clone", "preset", "voice_match"]


class TTSError(RuntimeError):
    """One synthesis failed (bad prompt, server error after retries, model error).
    ``transient``: the service failed (connection, timeout, 408/425/429/5xx after the
    retries), not the input."""

    def __init__(self, message: str = "", *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient

    def __reduce__(self) -> tuple[Any, ...]:
        return (_tts_error, (str(self), self.transient))


def _tts_error(message: str, transient: bool) -> TTSError:
    return TTSError(message, transient=transient)


@dataclass(frozen=True)
class VoicePrompt:
    """A reference voice: ``duration`` seconds of ``audio_path`` from ``offset`` (all of it
    when ``duration`` is None) and the words spoken in it."""

    voice_id: str
    audio_path: str
    text: str
    offset: float = 0.0
    duration: float | None = None
    language: str | None = None

    @property
    def key(self) -> tuple[str, str, float, float | None]:
        return (self.voice_id, self.audio_path, self.offset, self.duration)


@dataclass
class Synthesis:
    audio: np.ndarray  # float32 mono
    sample_rate: int
    backend: str
    backend_version: str  # package version + checkpoint fingerprint
    voice_source: VoiceSource
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.audio.shape[0] / self.sample_rate if self.sample_rate else 0.0


@dataclass(frozen=True)
class TTSRequest:
    text: str
    voice: VoicePrompt | None = None
    seed: int | None = None
    language: str | None = None


def package_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{dist}=={version(dist)}"
    except PackageNotFoundError:
        return f"{dist}==unknown"


def fingerprint(paths: Sequence[str | Path]) -> str:
    """A short, cheap checkpoint fingerprint: name, size and the first and last MiB of
    each file (hashing multi-GB weights in full on every load would be slow)."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        if not p.is_file():
            continue
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with p.open("rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), 2)
                h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # preset backends run without torch
        pass


class TTSBackend:
    """Base class of all backends. Subclasses set the class attributes and implement
    :meth:`load` and :meth:`_synthesize_chunk`."""

    name: str = ""
    #: characters per model call; longer text is split at sentence boundaries
    max_chars: int = 400
    #: True: every call needs a :class:`VoicePrompt` (zero-shot cloning)
    needs_prompt: bool = False
    #: prompt clip length the backend accepts, seconds (voice banks pick clips inside it)
    prompt_seconds: tuple[float, float] = (1.0, 30.0)
    #: the voice source a call with a prompt produces (``preset``: prompts are ignored)
    prompt_source: VoiceSource = "clone"

    def __init__(self, spec: TTSSpec, offline: bool = False) -> None:
        self.spec = spec
        self.offline = offline
        if spec.max_chars:
            self.max_chars = spec.max_chars
        self.sample_rate = 0
        self.version = ""
        self._loaded = False
        self._lock = threading.Lock()
        self.model_lock = threading.Lock()  # in-process models run one call at a time

    # -- to implement ---------------------------------------------------------------------

    def load(self) -> None:
        """Resolve and load the model (or check the server config); idempotent."""
        raise NotImplementedError

    def _synthesize_chunk(self, text: str, voice: VoicePrompt | None, seed: int | None,
                          language: str | None) -> np.ndarray:
        """Audio (float32 mono at ``self.sample_rate``) of one chunk within ``max_chars``."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------

    def ensure_loaded(self) -> None:
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    self.load()
                    self._loaded = True

    def voice_source(self, voice: VoicePrompt | None) -> VoiceSource:
        return self.prompt_source if voice is not None else "preset"

    def synthesize(self, text: str, voice: VoicePrompt | None = None, seed: int | None = None,
                   language: str | None = None) -> Synthesis:
        text = " ".join(str(text or "").split())
        if not text:
            raise TTSError("empty text")
        if self.needs_prompt and voice is None:
            raise TTSError(f"backend {self.name!r} clones a voice: it needs a voice prompt")
        self.ensure_loaded()
        language = language or (voice.language if voice else None) or self.spec.language
        chunks = split_text(text, self.max_chars)
        parts: list[np.ndarray] = []
        for i, ch in enumerate(chunks):
            s = None if seed is None else seed + i
            try:
                x = np.asarray(self._synthesize_chunk(ch.text, voice, s, language),
                               np.float32)
            except TTSError:
                raise
            except Exception as e:  # a model failing on one input rejects that input only
                from speechmill.pipeline.redact import redact_text

                raise TTSError(f"backend {self.name!r} failed: {type(e).__name__}: "
                               f"{redact_text(str(e), limit=300)}",
                               transient=isinstance(e, ConnectionError | TimeoutError)
                               ) from e
            x = x.reshape(-1)
            if x.shape[0] == 0 or not np.all(np.isfinite(x)):
                raise TTSError(f"backend {self.name!r} returned no usable audio for chunk "
                               f"{i} ({len(ch.text)} chars)")
            parts.append(x)
        audio = join_with_pauses(parts, self.sample_rate, [c.ends_sentence for c in chunks],
                                 pause_ms=self.spec.pause_ms)
        return Synthesis(audio=audio, sample_rate=self.sample_rate, backend=self.name,
                         backend_version=self.version, voice_source=self.voice_source(voice),
                         details={"chunks": len(chunks)})

    def synthesize_batch(self, requests: Sequence[TTSRequest]) -> list[Synthesis | TTSError]:
        """One result per request, in order; a failed request yields its :class:`TTSError`
        instead of stopping the batch. Backends that can run several requests at once
        (HTTP clients) override this."""
        out: list[Synthesis | TTSError] = []
        for r in requests:
            try:
                out.append(self.synthesize(r.text, r.voice, r.seed, r.language))
            except TTSError as e:
                out.append(e)
        return out
