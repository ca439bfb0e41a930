"""XTTS v2 (coqui-tts, module ``TTS``): multilingual zero-shot cloning, in process.

A checkpoint directory holds ``config.json``, ``model.pth`` and ``vocab.json`` (plus the
optional ``speakers_xtts.pth``): ``path``, ``$SPEECHMILL_MODELS/xtts/<name>``, the HF
cache (``coqui/XTTS-v2``) or coqui-tts's own model folder, else a download (online).
Loading is coqui's documented path: ``XttsConfig.load_json`` ->
``Xtts.init_from_config`` -> ``load_checkpoint(checkpoint_dir=...)``.

The prompt audio is handed over in memory (``get_gpt_cond_latents`` and
``get_speaker_embedding``, which ``Xtts.get_conditioning_latents`` calls after reading a
file), so no FFmpeg/torchcodec is needed; the latents are cached per voice. XTTS does not
use the prompt's text. ``language`` is required (the config's ``languages``).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from speechmill.pipeline.models import ModelNotFoundError
from speechmill.synth.tts.audio import load_prompt
from speechmill.synth.tts.base import (
    TTSBackend,
    TTSError,
    VoicePrompt,
    fingerprint,
    package_version,
)
from speechmill.synth.tts.resolve import XTTS_REPO, resolve_model

PROMPT_SR = 22050  # XTTS conditions on 22.05 kHz audio


class XttsBackend(TTSBackend):
    name = "xtts"
    max_chars = 240  # coqui's English char limit is 250
    needs_prompt = True
    prompt_seconds = (2.0, 30.0)

    def load(self) -> None:
        spec = self.spec
        res = resolve_model("xtts", None if spec.path else (spec.name or XTTS_REPO), spec.path,
                            spec.device, self.offline)
        d = Path(res.location)
        if d.is_file():
            d = d.parent
        missing = [f for f in ("config.json", "model.pth", "vocab.json") if not (d / f).is_file()]
        if missing:
            raise ModelNotFoundError(f"xtts: checkpoint directory {str(d)!r} lacks "
                                     f"{', '.join(missing)}")
        from TTS.tts.configs.xtts_config import XttsConfig
        from TTS.tts.models.xtts import Xtts

        config = XttsConfig()
        config.load_json(str(d / "config.json"))
        model = Xtts.init_from_config(config)
        model.load_checkpoint(config, checkpoint_dir=str(d), eval=True, use_deepspeed=False)
        self.device = res.device
        self.model = model.to(self.device)
        self.config = config
        self.sample_rate = int(config.model_args.output_sample_rate)
        self.version = f"{package_version('coqui-tts')}+xtts:{fingerprint([d / 'model.pth'])}"
        self._latents: OrderedDict[Any, tuple[Any, Any]] = OrderedDict()

    def _conditioning(self, voice: VoicePrompt) -> tuple[Any, Any]:
        import torch

        lat = self._latents.get(voice.key)
        if lat is None:
            audio, sr = load_prompt(voice, PROMPT_SR, max_seconds=self.prompt_seconds[1])
            wav = torch.from_numpy(audio)[None, :].to(self.device)
            cfg = self.config
            wav = wav[:, : int(sr * cfg.max_ref_len)]
            gpt = self.model.get_gpt_cond_latents(wav, sr, length=cfg.gpt_cond_len,
                                                  chunk_length=cfg.gpt_cond_chunk_len)
            spk = self.model.get_speaker_embedding(wav, sr)
            lat = (gpt, spk)
            self._latents[voice.key] = lat
            while len(self._latents) > 64:
                self._latents.popitem(last=False)
        self._latents.move_to_end(voice.key)
        return lat

    def _synthesize_chunk(self, text: str, voice: VoicePrompt | None, seed: int | None,
                          language: str | None) -> np.ndarray:
        import torch

        assert voice is not None
        lang = (language or "en").lower()
        if lang == "zh":
            lang = "zh-cn"
        if lang not in self.config.languages and lang.split("-")[0] not in self.config.languages:
            raise TTSError(f"xtts does not speak {lang!r} (it speaks "
                           f"{', '.join(self.config.languages)})")
        with self.model_lock:
            gpt, spk = self._conditioning(voice)
            if seed is not None:
                torch.manual_seed(seed)
            kw: dict[str, Any] = {"temperature": self.spec.temperature
                                  if self.spec.temperature is not None
                                  else self.config.temperature,
                                  "length_penalty": self.config.length_penalty,
                                  "repetition_penalty": self.config.repetition_penalty,
                                  "top_k": self.config.top_k, "top_p": self.config.top_p,
                                  "speed": self.spec.speed}
            out = self.model.inference(text, lang, gpt, spk, **kw)
        return np.asarray(out["wav"], np.float32).reshape(-1)
