"""Test-support: the ``tts`` stage's output turn rows over real synthetic speech.

Rows follow the synthesis contract exactly (``synth/text/turns.py`` columns plus what ``tts``
adds): ``id = f"{dialogue_id}-{round:03d}"``, ``dialogue_id`` (16 hex), ``round``,
``n_rounds``, ``role``, ``text``, ``language``, ``system``, ``topic``, ``persona``,
``source`` (JSON), ``synthetic``; ``audio_path`` (absolute mono WAV), ``offset`` 0,
``duration``, ``sample_rate``, ``channels`` 1, ``speaker`` = ``voice_id``,
``voice_source``, ``tts_backend``, ``tts_version``, ``tts_seed``, ``attempts``,
``words`` (list<struct word,start,end,prob>), ``qc`` (struct) and ``synth`` (JSON).

Speech is real: user turns in eSpeak NG voices (or Piper's joe at other speeds when
eSpeak NG is missing), assistant turns in Piper's joe, from
:func:`testkit.conversations.synthesize` (trimmed, cached). ``words`` stand in for
the QC ASR round trip: the text's words spread evenly over the clip (what matters to the
sinks is that they are clip-relative times).

* :class:`DialogueSpec` -- one dialogue to make (rounds, user voice, rounds to drop).
* :func:`make_dialogue_rows` -- write the clips, return the rows (an Arrow table).
* :func:`write_tts_stage` -- write rows (and rejects for dropped rounds) as a run
  directory's ``tts`` stage through the engine's store.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import soundfile as sf

from speechmill.pipeline.records import conform, reject, rejects_table
from speechmill.pipeline.store import RunStore
from speechmill.synth.text.turns import dialogue_id, turn_rows
from testkit.conversations import espeak_available, synthesize

SR = 16000
ASSISTANT = ("piper:joe", 1.0, "assistant-joe", "piper", "piper-tts-1.2+joe-us")
_ESPEAK_USERS = (("espeak:en-us+f3", None), ("espeak:en-gb+m3", None),
                 ("espeak:en-us+grandma", None), ("espeak:en-us+klatt2", None))
_PIPER_USERS = (("piper:joe", 0.8), ("piper:joe", 0.9), ("piper:joe", 1.15),
                ("piper:joe", 1.3))

QUESTIONS = ("What time does the library open?", "Can you name a red fruit?",
             "How many legs does a spider have?", "Is it going to rain today?",
             "What is the capital of France?", "Should I bring an umbrella?")
ANSWERS = ("It opens at nine in the morning.", "A strawberry is a red fruit.",
           "A spider has eight legs.", "Yes, there is a good chance of rain.",
           "The capital of France is Paris.", "Yes, take one just in case.")


def user_voices() -> list[tuple[str, float | None, str]]:
    """(voice spec, rate, voice id) of the user voices (4 distinct ones)."""
    pool = _ESPEAK_USERS if espeak_available() else _PIPER_USERS
    out = []
    for spec, rate in pool:
        name = spec.split(":", 1)[1].replace("+", "-")
        out.append((spec, rate, f"user-{name}" + (f"-x{rate}" if rate else "")))
    return out


@dataclass(frozen=True)
class DialogueSpec:
    n_rounds: int = 2
    user: int = 0  # index into user_voices()
    drop: tuple[int, ...] = ()  # rounds left out (rejected upstream)
    key: str = ""  # makes the dialogue id (default: its position)


def _words(text: str, seconds: float) -> list[dict[str, Any]]:
    words = re.findall(r"[\w']+", text)
    step = seconds / max(1, len(words))
    return [{"word": w, "start": round(i * step, 3), "end": round((i + 0.8) * step, 3),
             "prob": 0.9} for i, w in enumerate(words)]


def make_dialogue_rows(dirpath: Path, specs: Sequence[DialogueSpec] | None = None,
                       sample_rate: int = SR, llm: str = "fixture-llm") -> pa.Table:
    """Write every turn's clip under ``dirpath`` (``<turn id>.wav``) and return the
    ``tts`` output rows of the dialogues in ``specs`` (default: 4 dialogues of 2 and 4
    rounds in 4 user voices), without the dropped rounds."""
    specs = list(specs) if specs is not None else [
        DialogueSpec(2, 0), DialogueSpec(4, 1), DialogueSpec(2, 2), DialogueSpec(4, 3)]
    dirpath = Path(dirpath).resolve()
    dirpath.mkdir(parents=True, exist_ok=True)
    users = user_voices()
    rows: list[dict[str, Any]] = []
    q = 0
    for i, spec in enumerate(specs):
        did = dialogue_id("fixture", spec.key or str(i))
        turns = []
        for r in range(spec.n_rounds):
            pool = QUESTIONS if r % 2 == 0 else ANSWERS
            turns.append({"role": "user" if r % 2 == 0 else "assistant",
                          "text": pool[(q + r // 2) % len(pool)]})
        q += 1
        source = {"generator": "dialogue_generate", "model": llm, "prompt_version": "p1",
                  "seed": i}
        base = turn_rows(did, turns, parent_id=did, language="en",
                         system="You are a helpful voice assistant.", topic="everyday",
                         persona="curious", source=source)
        spec_u, rate_u, vid_u = users[spec.user % len(users)]
        for row in base:
            if row["round"] in spec.drop:
                continue
            if row["role"] == "user":
                voice, rate, vid = spec_u, rate_u, vid_u
                backend = "espeak-ng" if spec_u.startswith("espeak") else "piper"
                version = "espeak-ng-1.51" if backend == "espeak-ng" else "piper-tts-1.2"
                vsrc = "preset"
            else:
                voice, rate, vid, backend, version = ASSISTANT
                vsrc = "preset"
            x = synthesize(voice, row["text"], sample_rate=sample_rate, rate=rate)
            path = dirpath / f"{row['id']}.wav"
            sf.write(path, x, sample_rate, subtype="PCM_16")
            dur = len(x) / sample_rate
            # the tts stage's provenance JSON
            synth = {"llm": {k: source[k] for k in ("model", "prompt_version", "seed",
                                                    "generator")},
                     "tts": {"backend": backend, "version": version, "seed": 1000 + i,
                             "attempts": 1},
                     "voice_id": vid, "voice_source": vsrc, "prompt": None,
                     "voice_match": None}
            rows.append({
                **row, "parent_id": row["id"], "audio_path": str(path), "offset": 0.0,
                "duration": round(dur, 6), "sample_rate": sample_rate, "channels": 1,
                "speaker": vid, "voice_id": vid, "voice_source": vsrc,
                "tts_backend": backend, "tts_version": version, "tts_seed": 1000 + i,
                "attempts": 1, "words": _words(row["text"], dur),
                "qc": {"wer": 0.0, "cer": 0.0, "speaker_sim": None, "dnsmos": None,
                       "sec_per_char": dur / max(1, len(row["text"])),
                       "lead_silence_s": 0.0, "trail_silence_s": 0.0,
                       "clipped_frac": 0.0},
                "synth": json.dumps(synth, sort_keys=True),
            })
    return conform(pa.Table.from_pylist(rows))


def dropped_rejects(specs: Sequence[DialogueSpec], reason: str = "qc_wer") -> pa.Table:
    """Reject rows (stage ``tts``) for the rounds ``specs`` drop."""
    out = []
    for i, spec in enumerate(specs):
        did = dialogue_id("fixture", spec.key or str(i))
        for r in spec.drop:
            out.append(reject({"id": f"{did}-{r:03d}"}, "tts", reason,
                              "wer 0.42 > 0.15 (best of 3 attempts)"))
    return rejects_table(out)


def write_tts_stage(run_dir: Path, table: pa.Table, rejects: pa.Table | None = None,
                    stage_id: str = "tts") -> Path:
    """``table`` (and ``rejects``) as ``RUN_DIR/stages/<stage_id>`` parts, written with
    the engine's store; returns the stage directory (``read_parquet`` reads it)."""
    store = RunStore(run_dir)
    store.write_outputs(stage_id, "fixture-000", table)
    if rejects is not None and rejects.num_rows:
        store.write_rejects(stage_id, "fixture-000", rejects)
    store.mark_done(stage_id)
    return store.stage_dir(stage_id)


def clip(row: dict[str, Any], sample_rate: int | None = None) -> np.ndarray:
    """A turn's clip as float32 (resampled when asked)."""
    from speechmill.pipeline.clips import read_clip

    return read_clip(row, sample_rate)[0]
