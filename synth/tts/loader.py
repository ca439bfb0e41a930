"""``load_backend``: the one way a config becomes a ready TTS backend."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import import_module
from typing import Any

from speechmill.synth.tts.base import TTSBackend
from speechmill.synth.tts.spec import TTSSpec, parse_tts_spec

# backend -> "module:Class" (imported lazily: TTS libraries are heavy)
BACKENDS = {
    "f5_tts": "speechmill.synth.tts.f5:F5Backend",
    "pocket_tts": "speechmill.synth.tts.pocket:PocketBackend",
    "xtts": "speechmill.synth.tts.xtts:XttsBackend",
    "openai_compat": "speechmill.synth.tts.http_backends:OpenAICompatBackend",
    "cosyvoice": "speechmill.synth.tts.http_backends:CosyVoiceBackend",
    "multipart": "speechmill.synth.tts.http_backends:MultipartBackend",
    "openai": "speechmill.synth.tts.openai_tts:OpenAIBackend",
    "piper": "speechmill.synth.tts.piper:PiperBackend",
    "espeak": "speechmill.synth.tts.espeak:EspeakBackend",
}


def backend_class(name: str) -> type[TTSBackend]:
    mod, cls = BACKENDS[name].split(":")
    return getattr(import_module(mod), cls)


def load_backend(spec: TTSSpec | Mapping[str, Any], offline: bool = False,
                 load: bool = True) -> TTSBackend:
    """Build the backend ``spec`` names and (with ``load``) load its model or check its
    server settings now, so a missing model or key fails before any work starts
    (``ModelNotFoundError`` naming every place tried; ``ConfigError`` for settings).
    A preset backend with ``voice_match`` comes back wrapped in the voice matcher."""
    spec = parse_tts_spec(spec)
    backend = backend_class(spec.backend)(spec, offline=offline)
    if spec.voice_match is not None:
        from speechmill.synth.voices.voice_match import VoiceMatchBackend

        backend = VoiceMatchBackend(backend, spec.voice_match)
    if load:
        backend.ensure_loaded()
    return backend
