"""Segment rows as the cleaning stages leave them (``filter``'s output schema), over real
synthetic speech: a few recordings (FLAC, 24 kHz) of several voices, each cut into
utterances that reference the recording by ``offset``/``duration``.

``make_segments(dirpath)`` returns an Arrow table with the core columns (id, parent_id,
source_url, audio_path, offset, duration, sample_rate, channels, speaker, language, text,
words, scores) that exporters, splits and tokenizers consume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import soundfile as sf

from speechmill.pipeline.records import conform, content_id, segment_id
from testkit.conversations import SENTENCES, espeak_available, synthesize

SR = 24000


def voices() -> list[str]:
    vs = ["piper:joe"]
    if espeak_available():
        vs += ["espeak:en-us+m3", "espeak:en+f2"]
    return vs


def make_segments(dirpath: Path, n_recordings: int = 4, per_recording: int = 3,
                  sample_rate: int = SR) -> pa.Table:
    """``n_recordings`` FLAC files, each one voice saying ``per_recording`` sentences with
    0.4 s pauses; one row per sentence. Speakers cycle through :func:`voices` (global ids
    ``spk-<voice>``), so with eSpeak NG there are 3 speakers, otherwise 1."""
    dirpath.mkdir(parents=True, exist_ok=True)
    vs = voices()
    rows: list[dict[str, Any]] = []
    k = 0
    for r in range(n_recordings):
        voice = vs[r % len(vs)]
        pieces: list[np.ndarray] = []
        spans: list[tuple[float, float, str]] = []
        t = 0.3
        pieces.append(np.zeros(int(0.3 * sample_rate), np.float32))
        for _ in range(per_recording):
            text = SENTENCES[k % len(SENTENCES)]
            k += 1
            x = synthesize(voice, text, sample_rate=sample_rate)
            spans.append((t, t + len(x) / sample_rate, text))
            pieces.append(x)
            pieces.append(np.zeros(int(0.4 * sample_rate), np.float32))
            t += len(x) / sample_rate + 0.4
        audio = np.concatenate(pieces)
        path = dirpath / f"rec{r:02d}.flac"
        sf.write(path, audio, sample_rate, subtype="PCM_16")
        import hashlib

        rid = content_id(hashlib.sha256(path.read_bytes()).hexdigest())
        spk = "spk-" + voice.split(":", 1)[1].replace("+", "-")
        for start, end, text in spans:
            words = text.rstrip(".").split()
            step = (end - start) / max(1, len(words))
            rows.append({
                "id": segment_id(rid, start, end),
                "parent_id": segment_id(rid, start, end),
                "source_url": f"https://example.org/audio/rec{r:02d}.mp3",
                "audio_path": str(path),
                "offset": round(start, 3),
                "duration": round(end - start, 3),
                "sample_rate": sample_rate,
                "channels": 1,
                "speaker": spk,
                "language": "en",
                "text": text,
                "words": [{"word": w, "start": round(i * step, 3),
                           "end": round((i + 1) * step, 3), "prob": 0.9}
                          for i, w in enumerate(words)],
                "scores": {"dnsmos_ovrl": 3.1 + 0.01 * len(rows), "snr_db": 30.0,
                           "chars_per_s": len(text) / (end - start)},
            })
    return conform(pa.Table.from_pylist(rows))
