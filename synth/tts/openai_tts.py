"""OpenAI's text-to-speech API (preset voices) through the ``openai`` package.

``client.audio.speech.create(model, voice, input, response_format="wav")``; the key comes
from ``$OPENAI_API_KEY`` or the variable ``api_key_env`` names, ``base_url`` points at any
server speaking the same API. Retries (honouring ``Retry-After``) and timeouts are the
``openai`` client's, set from ``max_retries``/``timeout_s``. Voice prompts are ignored
(preset voices), unless ``voice_match`` is configured.

A failure after those retries is a :class:`TTSError` with ``transient=True`` when the
service failed (connection errors, timeouts, HTTP 408/409/425/429/5xx:
:func:`speechmill.pipeline.http_policy.service_failed`): the stage's reject is retried by
a rerun; other 4xx answers and answers that are not audio are data
(``transient=False``). The key is registered with :mod:`speechmill.pipeline.redact`;
error messages are redacted whole before they are cut short
(:func:`speechmill.pipeline.http_policy.error_text`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from speechmill.pipeline.http_policy import error_text, service_failed
from speechmill.pipeline.redact import register_secret, register_secrets
from speechmill.synth.tts.audio import decode_audio, resample
from speechmill.synth.tts.base import (
    Synthesis,
    TTSBackend,
    TTSError,
    TTSRequest,
    VoicePrompt,
    package_version,
)
from speechmill.synth.tts.http import api_key

DEFAULT_MODEL = "gpt-4o-mini-tts"
DEFAULT_VOICE = "alloy"
SAMPLE_RATE = 24000  # the API's wav output


class OpenAIBackend(TTSBackend):
    name = "openai"
    max_chars = 1000  # the API takes 4096; shorter calls keep the prosody natural
    prompt_source = "preset"

    def load(self) -> None:
        import openai

        spec = self.spec
        key = api_key(spec.api_key_env or "OPENAI_API_KEY", required=spec.base_url is None,
                      what="backend 'openai'")
        register_secret(key)
        register_secrets(spec.base_url or "")
        self._key = key
        self.client = openai.OpenAI(api_key=key or "none", base_url=spec.base_url,
                                    timeout=spec.timeout_s, max_retries=spec.max_retries)
        self.model = spec.model or DEFAULT_MODEL
        self.voice = spec.voice or DEFAULT_VOICE
        self.sample_rate = SAMPLE_RATE
        self.version = f"{package_version('openai')}+{self.model}:{self.voice}"

    def _synthesize_chunk(self, text: str, voice: VoicePrompt | None, seed: int | None,
                          language: str | None) -> np.ndarray:
        import httpx
        import openai

        kw: dict[str, Any] = {"model": self.model, "voice": self.voice, "input": text,
                              "response_format": "wav"}
        if self.spec.speed != 1.0:
            kw["speed"] = self.spec.speed
        if self.spec.instructions:
            kw["instructions"] = self.spec.instructions
        try:
            resp = self.client.audio.speech.create(**kw)
            data = resp.read()
        except openai.APIStatusError as e:
            st = e.status_code
            msg = error_text(str(e.message), [self._key] if self._key else [], limit=200)
            raise TTSError(f"openai speech: HTTP {st}: {msg}",
                           transient=service_failed(st)) from None
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise TTSError(f"openai speech: {type(e).__name__} (after the client's "
                           f"{self.spec.max_retries} retries)", transient=True) from None
        except openai.APIError as e:
            raise TTSError(f"openai speech: {type(e).__name__}") from None
        except httpx.TransportError as e:  # the answer broke off while it was read
            raise TTSError(f"openai speech: {type(e).__name__}", transient=True) from None
        x, sr = decode_audio(data, "wav")
        return resample(x, sr, self.sample_rate)

    def synthesize_batch(self, requests: Sequence[TTSRequest]) -> list[Synthesis | TTSError]:
        self.ensure_loaded()

        def one(r: TTSRequest) -> Synthesis | TTSError:
            try:
                return self.synthesize(r.text, r.voice, r.seed, r.language)
            except TTSError as e:
                return e

        with ThreadPoolExecutor(max_workers=max(1, min(self.spec.max_concurrency,
                                                       len(requests)))) as ex:
            return list(ex.map(one, requests))
