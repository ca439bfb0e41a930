"""A voice bank (the ``voice_bank`` stage's ``voices.parquet``) and how user turns get voices.

:func:`load_voice_bank` reads the bank: one row per prompt clip (``voice_id``, ``clip_id``,
``audio_path``, ``duration``, ``text``, ``language``, ``gender``, ``embedding``, ``rank``
...; see :mod:`speechmill.synth.voices.voice_bank`). :class:`VoiceBank` hands out

* :meth:`VoiceBank.prompt` -- a voice's best clip whose length a backend accepts, as a
  :class:`~speechmill.synth.tts.base.VoicePrompt` (with the words spoken in it);
* :meth:`VoiceBank.assign_all` -- the user voice of every dialogue of a set, balanced: each
  voice gets an even share (counts differ by at most one within the voices a dialogue may
  use; never more than ``max_share`` of the dialogues), one voice for the whole dialogue,
  optionally matched on language and gender. The order dialogues are dealt in is a seeded
  hash of their ids, so the result depends only on the set of dialogue ids and the seed:
  not on batches, workers or a resume;
* :meth:`VoiceBank.assign` -- the voice for one dialogue without knowing the others
  (rendezvous hashing: even only on average). The ``tts`` stage uses :meth:`assign_all`
  over its whole input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from speechmill.pipeline.records import stable_hash
from speechmill.synth.tts.base import VoicePrompt

BANK_FILE = "voices.parquet"


class VoiceBankError(ValueError):
    """The bank cannot do what was asked (no such voice, no clip in bounds, too few
    voices for ``max_share``)."""


@dataclass(frozen=True)
class Clip:
    voice_id: str
    clip_id: str
    audio_path: str
    duration: float
    text: str
    language: str | None
    gender: str | None
    rank: int
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)
    dnsmos: float | None = None


def bank_path(path: str | Path) -> Path:
    """``voices.parquet`` itself, or the one inside a directory."""
    p = Path(path)
    return p / BANK_FILE if p.is_dir() else p


def load_voice_bank(path: str | Path) -> VoiceBank:
    """The bank in ``path`` (``voices.parquet`` or the ``voice_bank`` stage's directory)."""
    import pyarrow.parquet as pq

    p = bank_path(path)
    if not p.is_file():
        raise VoiceBankError(f"no voice bank at {str(p)!r} (run the voice_bank stage, or "
                             "point at its voices.parquet)")
    cols = ["voice_id", "clip_id", "audio_path", "duration", "text", "language", "gender",
            "rank", "embedding", "dnsmos"]
    t = pq.read_table(p)
    rows = t.select([c for c in cols if c in t.column_names]).to_pylist()
    clips = []
    for r in rows:
        emb = r.get("embedding")
        clips.append(Clip(
            voice_id=str(r["voice_id"]), clip_id=str(r.get("clip_id") or r["audio_path"]),
            audio_path=str(r["audio_path"]), duration=float(r.get("duration") or 0.0),
            text=str(r.get("text") or ""), language=r.get("language"),
            gender=r.get("gender"), rank=int(r.get("rank") or 0),
            embedding=None if emb is None else np.asarray(emb, np.float32),
            dnsmos=r.get("dnsmos")))
    return VoiceBank(clips, source=str(p))


class VoiceBank:
    """Prompt clips grouped by voice (small: a few clips per voice)."""

    def __init__(self, clips: Iterable[Clip], source: str = "") -> None:
        self.source = source
        self.clips: dict[str, list[Clip]] = {}
        for c in clips:
            self.clips.setdefault(c.voice_id, []).append(c)
        for v in self.clips.values():
            v.sort(key=lambda c: (c.rank, c.clip_id))

    # -- what the bank holds -----------------------------------------------------------------
    @property
    def voice_ids(self) -> list[str]:
        return sorted(self.clips)

    def __len__(self) -> int:
        return len(self.clips)

    def __contains__(self, voice_id: object) -> bool:
        return voice_id in self.clips

    def language(self, voice_id: str) -> str | None:
        return next((c.language for c in self.clips[voice_id] if c.language), None)

    def gender(self, voice_id: str) -> str | None:
        return next((c.gender for c in self.clips[voice_id] if c.gender), None)

    def embedding(self, voice_id: str) -> np.ndarray | None:
        """The voice's mean clip embedding (unit norm), or None without embeddings."""
        embs = [c.embedding for c in self.clips.get(voice_id, []) if c.embedding is not None]
        if not embs:
            return None
        m = np.mean(np.stack(embs), axis=0)
        n = float(np.linalg.norm(m))
        return (m / n).astype(np.float32) if n > 0 else None

    def best_voice(self, exclude: Iterable[str] = ()) -> str:
        """The voice whose best clip scores highest (DNSMOS; ties: the smaller id): the
        assistant's voice when a cloning backend is given none."""
        pool = [v for v in self.voice_ids if v not in set(exclude)]
        if not pool:
            raise VoiceBankError(f"the voice bank {self.source!r} has no voice")
        return min(pool, key=lambda v: (-(self.clips[v][0].dnsmos or 0.0), v))

    def clip(self, voice_id: str, bounds: tuple[float, float] | None = None) -> Clip:
        """The best-ranked clip of ``voice_id`` whose duration lies within ``bounds``."""
        if voice_id not in self.clips:
            raise VoiceBankError(f"voice {voice_id!r} is not in the bank ({self.source})")
        lo, hi = bounds or (0.0, math.inf)
        for c in self.clips[voice_id]:
            if lo - 1e-6 <= c.duration <= hi + 1e-6:
                return c
        durs = ", ".join(f"{c.duration:.1f}" for c in self.clips[voice_id])
        raise VoiceBankError(f"voice {voice_id!r} has no prompt clip of {lo:g}-{hi:g} s "
                             f"(its clips: {durs} s); rebuild the bank with these bounds")

    def prompt(self, voice_id: str, backend_bounds: tuple[float, float] | None = None
               ) -> VoicePrompt:
        """The voice's best clip within ``backend_bounds`` (min_s, max_s) as a prompt."""
        c = self.clip(voice_id, backend_bounds)
        return VoicePrompt(voice_id=voice_id, audio_path=c.audio_path, text=c.text,
                           language=c.language)

    # -- assignment -----------------------------------------------------------------------------
    def _eligible(self, pool: Sequence[str], language: str | None, gender: str | None,
                  match_language: bool, match_gender: bool) -> list[str]:
        out = list(pool)
        if match_language and language:
            same = [v for v in out if _lang(self.language(v)) in (None, _lang(language))]
            out = same or out
        if match_gender and gender:
            same = [v for v in out if self.gender(v) in (None, gender)]
            out = same or out
        return out

    def assign_all(self, dialogues: Iterable[Mapping[str, Any] | str], seed: int = 0,
                   max_share: float = 1.0, *, match_language: bool = False,
                   match_gender: bool = False, exclude: Iterable[str] = (),
                   ) -> dict[str, str]:
        """``{dialogue_id: voice_id}`` for every dialogue (a dialogue id, or a mapping
        with ``dialogue_id`` and optionally ``language`` and ``gender``).

        Dialogues are dealt in the order of a seeded hash of their ids; each goes to the
        least-used voice among those it may use (its language/gender when matching, ties
        broken by a seeded permutation of the voices), so counts stay even. No voice gets
        more than ``max(1, floor(max_share * n_dialogues))`` dialogues: when every matching
        voice is full the dialogue takes the least-used voice of the whole pool (matching is
        a preference); when the whole pool is full :class:`VoiceBankError` says so."""
        pool = [v for v in self.voice_ids if v not in set(exclude)]
        items: dict[str, tuple[str | None, str | None]] = {}
        for d in dialogues:
            if isinstance(d, str):
                items.setdefault(d, (None, None))
            else:
                items.setdefault(str(d["dialogue_id"]), (d.get("language"), d.get("gender")))
        if not items:
            return {}
        if not pool:
            raise VoiceBankError(f"the voice bank {self.source!r} has no voice to assign")
        n = len(items)
        cap = max(1, math.floor(max_share * n + 1e-9))
        if cap * len(pool) < n:
            need = math.ceil(1 / max_share) if max_share > 0 else n
            raise VoiceBankError(
                f"{len(pool)} voices cannot keep each under max_share {max_share:g} of "
                f"{n} dialogues (at most {cap} each); add voices (at least {need}) or raise "
                "max_share")
        order = {v: i for i, v in enumerate(sorted(pool, key=lambda v: (stable_hash("voice", seed, v),
                                                                         v)))}
        counts = dict.fromkeys(pool, 0)
        out: dict[str, str] = {}
        for did in sorted(items, key=lambda d: (stable_hash("dialogue", seed, d), d)):
            lang, gender = items[did]
            cands = [v for v in self._eligible(pool, lang, gender, match_language, match_gender)
                     if counts[v] < cap]
            if not cands:
                cands = [v for v in pool if counts[v] < cap]
            v = min(cands, key=lambda v: (counts[v], order[v]))
            counts[v] += 1
            out[did] = v
        return out

    def assign(self, dialogue_id: str, seed: int = 0, *, language: str | None = None,
               gender: str | None = None, match_language: bool = False,
               match_gender: bool = False, exclude: Iterable[str] = ()) -> str:
        """The voice of one dialogue on its own: the eligible voice with the highest seeded
        hash of (dialogue, voice) (rendezvous hashing: deterministic, even on average, but
        without :meth:`assign_all`'s share bound)."""
        pool = [v for v in self.voice_ids if v not in set(exclude)]
        if not pool:
            raise VoiceBankError(f"the voice bank {self.source!r} has no voice to assign")
        cands = self._eligible(pool, language, gender, match_language, match_gender)
        return max(cands, key=lambda v: (stable_hash("rendezvous", seed, dialogue_id, v), v))


def _lang(code: str | None) -> str | None:
    """``en-US`` -> ``en``."""
    return code.split("-")[0].split("_")[0].lower() if code else None
