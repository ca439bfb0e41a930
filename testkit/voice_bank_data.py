"""Cleaning-run segment rows over real multi-speaker speech, and the
``voice_bank`` sink run the way the engine runs it (scratch directory renamed into place).

Speech comes from :func:`testkit.conversations.synthesize` (Piper's joe, eSpeak NG
voices; trimmed, cached). ``words`` spread each sentence's words over its own span (what
the bank reads from them: clip-relative times and sentence ends)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import soundfile as sf

from speechmill.pipeline.stage import StageContext
from speechmill.synth.voices.voice_bank import VoiceBank, VoiceBankConfig
from testkit.conversations import SENTENCES, synthesize

SR = 16000


def words_over(text: str, start: float, end: float) -> list[dict[str, Any]]:
    """The text's words spread over [start, end] (what matters: clip-relative times)."""
    ws = text.split()
    step = (end - start) / len(ws)
    return [{"word": w, "start": round(start + i * step, 3),
             "end": round(start + (i + 0.9) * step, 3), "prob": 0.9} for i, w in enumerate(ws)]


def write_segment(path: Path, voice: str, sentences: list[str], lead: float, trail: float,
             gap: float = 0.4) -> tuple[float, list[dict[str, Any]]]:
    """Write the sentences spoken by ``voice`` with silence around them; (duration, words)."""
    parts = [np.zeros(int(lead * SR), np.float32)]
    words: list[dict[str, Any]] = []
    t = lead
    for k, s in enumerate(sentences):
        x = synthesize(voice, s, SR)
        words += words_over(s, t, t + x.shape[0] / SR)
        parts.append(x)
        t += x.shape[0] / SR
        if k < len(sentences) - 1:
            parts.append(np.zeros(int(gap * SR), np.float32))
            t += gap
    parts.append(np.zeros(int(trail * SR), np.float32))
    audio = np.concatenate(parts)
    sf.write(path, audio, SR, subtype="PCM_16")
    return audio.shape[0] / SR, words


def segment_row(rid: str, path: Path, speaker: str, dur: float, words: list[dict[str, Any]],
         dnsmos: float, split: str = "train", source: str | None = None) -> dict[str, Any]:
    return {"id": rid, "audio_path": str(path), "offset": 0.0, "duration": dur,
            "speaker": speaker, "language": "en", "split": split,
            "text": " ".join(w["word"] for w in words), "words": words,
            "source_url": source or f"file://{path}",
            "scores": {"dnsmos_ovrl": dnsmos, "asr_avg_logprob": -0.3}}



def make_segments(dirpath: Path, voices: dict[str, str], clips: int = 2,
                  dnsmos: float = 3.0) -> pa.Table:
    """``clips`` segment rows per speaker (speaker id -> voice spec), each two sentences
    (6-9 s) with a little silence around them, split ``train``."""
    dirpath.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (spk, voice) in enumerate(voices.items()):
        for k in range(clips):
            j = (2 * (i * clips + k)) % (len(SENTENCES) - 1)
            path = dirpath / f"{spk}-{k}.wav"
            dur, w = write_segment(path, voice, [SENTENCES[j], SENTENCES[j + 1]], 0.3, 0.3)
            rows.append(segment_row(f"{spk}-{k}", path, spk, dur, w, dnsmos - 0.1 * k))
    return pa.Table.from_pylist(rows)


def export(table: pa.Table, run: Path, stage_id: str = "voices", **cfg: Any
           ) -> tuple[Path, dict[str, Any]]:
    """Run the sink like the engine does (scratch dir renamed into place)."""
    config = VoiceBankConfig(**cfg)
    VoiceBank.validate_config(config)
    stage = VoiceBank(config, StageContext(stage_id=stage_id, run_dir=str(run)))
    final = run / "voices" / stage_id
    scratch = final.parent / f".{stage_id}.partial"
    scratch.mkdir(parents=True)
    res = stage.export(table, scratch)
    shutil.rmtree(final, ignore_errors=True)
    scratch.rename(final)
    return final, res.summary


