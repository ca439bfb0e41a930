"""eSpeak NG (formant synthesis; the last-resort offline voice). ``voice`` is an eSpeak
voice with an optional variant (``en-us``, ``en-gb+m3``, ``en-us+f2``...; list them with
``espeak-ng --voices`` and ``--voices=variant``), ``speed`` scales 175 words per minute,
``pitch`` is 0-99. Needs the ``espeak-ng`` program (``apt-get install espeak-ng``)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from speechmill.pipeline.errors import ConfigError
from speechmill.synth.tts.base import TTSBackend, TTSError, VoicePrompt

DEFAULT_VOICE = "en-us"
BASE_WPM = 175


class EspeakBackend(TTSBackend):
    name = "espeak"
    max_chars = 1000
    prompt_source = "preset"

    def load(self) -> None:
        exe = shutil.which("espeak-ng")
        if exe is None:
            raise ConfigError("backend 'espeak' needs the espeak-ng program "
                              "(apt-get install espeak-ng)", key="tts.backend")
        self.exe = exe
        self.voice = self.spec.voice or DEFAULT_VOICE
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
        ver = (out.stdout.split("text-to-speech:")[-1].split()[:1] or ["unknown"])[0]
        self.version = f"espeak-ng=={ver}+{self.voice}"
        probe = self._run("ok")  # also checks the voice exists
        self.sample_rate = probe[1]

    def _run(self, text: str) -> tuple[np.ndarray, int]:
        import soundfile as sf

        args = [self.exe, "-v", self.voice, "-s", str(int(BASE_WPM * self.spec.speed))]
        if self.spec.pitch is not None:
            args += ["-p", str(self.spec.pitch)]
        with tempfile.TemporaryDirectory(prefix="speechmill-espeak-") as tmp:
            wav = Path(tmp) / "out.wav"
            try:
                r = subprocess.run([*args, "-w", str(wav), "--", text], capture_output=True,
                                   text=True, timeout=120)
            except subprocess.TimeoutExpired:
                raise TTSError("espeak-ng timed out") from None
            err = (r.stderr or "").strip()
            if r.returncode != 0 or not wav.exists() or "does not exist" in err:
                msg = f"espeak-ng voice {self.voice!r}: {err[:200] or r.returncode}"
                if not self._loaded:
                    raise ConfigError(msg, key="tts.voice")
                raise TTSError(msg)
            x, sr = sf.read(wav, dtype="float32", always_2d=True)
        return x.mean(axis=1), int(sr)

    def _synthesize_chunk(self, text: str, voice: VoicePrompt | None, seed: int | None,
                          language: str | None) -> np.ndarray:
        return self._run(text)[0]
