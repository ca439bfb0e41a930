"""Voice cloning over HTTP: OpenAI-compatible speech servers that take a reference voice,
CosyVoice's FastAPI server, and a configurable multipart client for servers such as
Chatterbox-TTS-Server and xtts-api-server.

Every request carries the prompt audio and its text (field names configurable with
``fields:``, fixed extra fields with ``extra_fields:``). Responses are decoded from WAV /
FLAC / MP3, or raw 16-bit PCM at ``sample_rate``. Requests run concurrently up to
``max_concurrency`` in ``synthesize_batch``, with retries and timeouts (see
:mod:`speechmill.synth.tts.http`).

Failures: a server that stays unreachable, times out or answers 408/425/429/5xx after
the retries raises a transient :class:`TTSError` (the ``tts`` stage's reject is retried by
a rerun); other 4xx answers, an upload answer without the expected name, unreadable
prompts and responses that do not decode as audio are data (``transient=False``).
"""

from __future__ import annotations

import base64
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from speechmill.pipeline.safe_names import safe_name
from speechmill.synth.tts.audio import decode_audio, load_prompt, resample, wav_bytes
from speechmill.synth.tts.base import (
    Synthesis,
    TTSBackend,
    TTSError,
    TTSRequest,
    VoicePrompt,
)
from speechmill.synth.tts.http import HttpClient, api_key


def _public_url(url: str) -> str:
    """The URL without user:password (versions and logs must not carry credentials)."""
    u = urlsplit(url)
    netloc = u.hostname or ""
    if u.port:
        netloc += f":{u.port}"
    return urlunsplit((u.scheme, netloc, u.path, "", ""))


class HttpBackend(TTSBackend):
    """Shared plumbing: client, field mapping, response decoding, concurrent batches."""

    url_path = ""
    default_fields: dict[str, str | None] = {}
    default_format = "wav"
    default_sample_rate: int | None = None
    default_prompt_rate: int | None = None

    def load(self) -> None:
        spec = self.spec
        assert spec.base_url
        self.client = HttpClient(
            spec.base_url, key=api_key(spec.api_key_env, required=False, what=self.name),
            timeout_s=spec.timeout_s, max_retries=spec.max_retries, backoff_s=spec.backoff_s,
            max_backoff_s=spec.max_backoff_s, max_concurrency=spec.max_concurrency)
        self.path = spec.url_path or self.url_path
        self.fields = {**self.default_fields, **spec.fields}
        self.format = spec.response_format or self.default_format
        self.pcm_rate = spec.sample_rate or self.default_sample_rate
        self.prompt_rate = spec.prompt_sample_rate or self.default_prompt_rate
        self.sample_rate = spec.sample_rate or 0
        self._rate_lock = threading.Lock()
        self._prompts: OrderedDict[Any, Any] = OrderedDict()
        self._prompt_lock = threading.Lock()
        model = f" model={spec.model}" if spec.model else ""
        self.version = f"{self.name}:{_public_url(self.client.url(self.path))}{model}"
        if spec.voice:
            self.needs_prompt = False

    # -- helpers --------------------------------------------------------------------------

    def _cached(self, key: Any, make: Any) -> Any:
        with self._prompt_lock:
            if key in self._prompts:
                self._prompts.move_to_end(key)
                return self._prompts[key]
        val = make()
        with self._prompt_lock:
            self._prompts[key] = val
            while len(self._prompts) > 256:
                self._prompts.popitem(last=False)
        return val

    def _prompt_wav(self, voice: VoicePrompt) -> bytes:
        def make() -> bytes:
            x, sr = load_prompt(voice, self.prompt_rate, max_seconds=self.prompt_seconds[1])
            return wav_bytes(x, sr)

        return self._cached(("wav", voice.key), make)

    def _put(self, body: dict[str, Any], logical: str, value: Any) -> None:
        name = self.fields.get(logical)
        if name and value is not None:
            body[name] = value

    def _common(self, body: dict[str, Any], seed: int | None, language: str | None) -> None:
        spec = self.spec
        self._put(body, "language", language)
        self._put(body, "speed", spec.speed if spec.speed != 1.0 else None)
        self._put(body, "seed", seed)
        self._put(body, "model", spec.model)
        self._put(body, "voice", spec.voice)

    def _audio(self, r: Any) -> np.ndarray:
        rate = self.pcm_rate
        hdr = r.headers.get("X-Custom-Header-sampleRate")  # CosyVoice's server says it
        if self.format == "pcm" and hdr and hdr.isdigit():
            rate = int(hdr)
        x, sr = decode_audio(r.content, self.format, rate)
        with self._rate_lock:
            if not self.sample_rate:
                self.sample_rate = sr
        return resample(x, sr, self.sample_rate)

    def synthesize_batch(self, requests: Sequence[TTSRequest]) -> list[Synthesis | TTSError]:
        self.ensure_loaded()

        def one(r: TTSRequest) -> Synthesis | TTSError:
            try:
                return self.synthesize(r.text, r.voice, r.seed, r.language)
            except TTSError as e:
                return e

        if len(requests) <= 1:
            return [one(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.spec.max_concurrency,
                                                len(requests))) as ex:
            return list(ex.map(one, requests))


class OpenAICompatBackend(HttpBackend):
    """``POST /v1/audio/speech`` with a reference voice in the JSON body (vLLM-Omni's
    convention: ``ref_audio`` as a data URI, ``file://`` URI or URL, ``ref_text``)."""

    name = "openai_compat"
    max_chars = 600
    needs_prompt = True
    url_path = "/v1/audio/speech"
    default_fields = {"input": "input", "ref_audio": "ref_audio", "ref_text": "ref_text",
                      "model": "model", "voice": "voice", "response_format": "response_format",
                      "speed": "speed", "language": None, "seed": None}

    def load(self) -> None:
        super().load()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def _ref_audio(self, voice: VoicePrompt) -> str:
        how = self.spec.ref_audio_as
        whole = voice.offset == 0 and voice.duration is None
        if how == "url":
            if not voice.audio_path.startswith(("http://", "https://")) or not whole:
                raise TTSError(f"voice {voice.voice_id!r}: ref_audio_as=url needs a whole "
                               f"http(s) file, got {voice.audio_path!r}")
            return voice.audio_path
        if how == "file_uri":
            if whole and "://" not in voice.audio_path:
                return Path(voice.audio_path).resolve().as_uri()

            def cut() -> str:  # the clip of a longer file, written where the server can read
                if self._tmp is None:
                    self._tmp = tempfile.TemporaryDirectory(prefix="speechmill-tts-")
                safe = re.sub(r"[^A-Za-z0-9_.-]", "_", voice.voice_id)[:60]
                p = Path(self._tmp.name) / f"{safe}-{abs(hash(voice.key)):x}.wav"
                p.write_bytes(self._prompt_wav(voice))
                return p.as_uri()

            return self._cached(("file", voice.key), cut)

        def data_uri() -> str:
            return "data:audio/wav;base64," + base64.b64encode(
                self._prompt_wav(voice)).decode("ascii")

        return self._cached(("uri", voice.key), data_uri)

    def _synthesize_chunk(self, text: str, voice: VoicePrompt | None, seed: int | None,
                          language: str | None) -> np.ndarray:
        body: dict[str, Any] = {}
        self._put(body, "input", text)
        if voice is not None:
            self._put(body, "ref_audio", self._ref_audio(voice))
            self._put(body, "ref_text", voice.text)
        self._put(body, "response_format", self.format)
        self._common(body, seed, language)
        body.update(self.spec.extra_fields)
        return self._audio(self.client.post(self.path, json=body))


class MultipartBackend(HttpBackend):
    """A form POST with the prompt as a file field (``fields.prompt_audio``), or — for
    servers that keep reference files (Chatterbox-TTS-Server, xtts-api-server) — an
    upload to ``upload_path`` once per voice, then requests that name the upload."""

    name = "multipart"
    max_chars = 300  # Chatterbox degrades past ~300 characters
    needs_prompt = True
    url_path = "/tts"
    default_fields = {"text": "text", "prompt_audio": "audio", "prompt_text": "prompt_text",
                      "language": None, "speed": None, "seed": None, "model": None,
                      "voice": None}

    def _upload(self, voice: VoicePrompt) -> str:
        spec = self.spec

        def make() -> str:
            fname = safe_name(voice.voice_id, strict=True, max_bytes=80, suffix=".wav")
            assert spec.upload_path
            r = self.client.post(spec.upload_path, files={
                spec.upload_field: (fname, self._prompt_wav(voice), "audio/wav")})
            name = fname
            if spec.upload_name_key:
                try:
                    cur: Any = r.json()
                    for part in spec.upload_name_key.split("."):
                        cur = cur[int(part)] if isinstance(cur, list) else cur[part]
                    name = str(cur)
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    raise TTSError(f"upload answer has no {spec.upload_name_key!r} "
                                   f"({type(e).__name__})") from None
            return spec.reference_template.format(name=name, stem=Path(name).stem,
                                                  voice_id=voice.voice_id)

        return self._cached(("upload", voice.key), make)

    def _synthesize_chunk(self, text: str, voice: VoicePrompt | None, seed: int | None,
                          language: str | None) -> np.ndarray:
        spec = self.spec
        form: dict[str, Any] = {}
        files: dict[str, Any] = {}
        self._put(form, "text", text)
        if voice is not None:
            self._put(form, "prompt_text", voice.text)
            field = self.fields.get("prompt_audio")
            if field:
                if spec.upload_path:
                    form[field] = self._upload(voice)
                else:
                    files[field] = (safe_name(voice.voice_id, strict=True, max_bytes=80,
                                              suffix=".wav"),
                                    self._prompt_wav(voice), "audio/wav")
        self._common(form, seed, language)
        form.update(spec.extra_fields)
        if spec.body == "json":
            r = self.client.post(self.path, json=form)
        else:
            data = {k: v if isinstance(v, str) else str(v) for k, v in form.items()}
            r = self.client.post(self.path, data=data, files=files or None)
        return self._audio(r)


class CosyVoiceBackend(MultipartBackend):
    """CosyVoice's FastAPI server (``runtime/python/fastapi/server.py``):
    ``POST /inference_zero_shot`` with ``tts_text``, ``prompt_text`` and the ``prompt_wav``
    file; the answer is raw 16-bit PCM (22.05 kHz for CosyVoice 1, 24 kHz for CosyVoice 2:
    set ``sample_rate``; a ``X-Custom-Header-sampleRate`` header wins)."""

    name = "cosyvoice"
    max_chars = 300
    url_path = "/inference_zero_shot"
    default_fields = {"text": "tts_text", "prompt_audio": "prompt_wav",
                      "prompt_text": "prompt_text", "language": None, "speed": None,
                      "seed": None, "model": None, "voice": None}
    default_format = "pcm"
    default_sample_rate = 22050
    default_prompt_rate = 16000
