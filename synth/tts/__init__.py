"""Text-to-speech backends for dialogue synthesis: one small interface (text + optional
voice prompt -> audio), in-process zero-shot cloning (F5-TTS, Kyutai pocket-tts, XTTS v2),
cloning servers over HTTP, preset voices (OpenAI, Piper, eSpeak NG) and offline voice
matching. Heavy libraries are imported only when a backend loads."""

from speechmill.synth.tts.base import (
    Synthesis,
    TTSBackend,
    TTSError,
    TTSRequest,
    VoicePrompt,
)
from speechmill.synth.tts.loader import load_backend
from speechmill.synth.tts.spec import TTSSpec, VoiceMatchSpec, parse_tts_spec

__all__ = ["Synthesis", "TTSBackend", "TTSError", "TTSRequest", "TTSSpec", "VoiceMatchSpec",
           "VoicePrompt", "load_backend", "parse_tts_spec"]
