"""Sink stage ``dialogue_assemble``: synthesized turns -> conversations.

Per dialogue (complete ones; see :mod:`speechmill.synth.text.dialogues` for incomplete ones and
``truncate_incomplete``), in one directory per split (``RUN_DIR/exports/<id>/<split>/``):

- ``dialogues.jsonl``: one line per dialogue with its turns in order, each with its clip
  (the ``tts`` stage's file, absolute path), text, voice and its ``start``/``end`` on the
  conversation's timeline, plus ``synthetic: true`` and the provenance (LLM, TTS backend
  and version, voice source).
- ``audio/<dialogue_id>.wav`` (``mono: true``): the turns one after the other at
  ``sample_rate``, separated by ``gap_s`` seconds of silence (each gap drawn from
  ``gap_s ± gap_jitter_s``, seeded per dialogue, never below 0). Its length is exactly the
  sum of the turns' and the gaps' samples.
- moshi-finetune's layout (``stereo: true``) in ``moshi/``: ``stereo/<dialogue_id>.wav``
  with the assistant on the left channel and the user on the right (same timeline, the
  other channel silent), ``stereo/<dialogue_id>.json`` with the word alignment moshi's
  interleaver reads (``{"alignments": [[word, [start, end], speaker], ...]}`` sorted by
  start, the assistant's words labelled ``SPEAKER_MAIN``), and ``data.jsonl`` with
  ``{"path": "stereo/<id>.wav", "duration": seconds}`` per file (paths relative to it, as
  sphn resolves them). Word times are the ASR words of the ``tts`` stage's QC round
  trip shifted to the conversation; a turn without words contributes none (counted in
  the summary as ``turns_without_words``).
- ``lhotse/`` (``lhotse: true``, needs ``mono``): ``recordings``/``supervisions``/``cuts``
  ``.jsonl.gz``: one recording and one ``MonoCut`` per dialogue over the mono audio, one
  supervision per turn (``speaker`` = voice id, ``text``, word alignment on the
  conversation's timeline, ``custom`` with the turn's role, round and provenance).

File names are the dialogue id as a safe name (``<dialogue_id>`` above:
:func:`speechmill.pipeline.safe_names.safe_name`; an id that is not a plain file name gets
a readable part plus a hash, so two dialogues never share a file).
Files are byte-identical for the same input (jitter seeded by ``seed`` and the dialogue
id; 16-bit PCM WAV; gzip without mtime). A turn whose clip cannot be read rejects its
dialogue whole (that turn with the decoder's reason, the others ``dialogue_incomplete``).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from speechmill.manifests.common import dumps_line, open_text_out, split_groups, track
from speechmill.manifests.lhotse_export import supervision
from speechmill.pipeline.audio import AudioError
from speechmill.pipeline.clips import read_clip
from speechmill.pipeline.publish import published_dir, rel_or_abs
from speechmill.pipeline.records import reject, rejects_table
from speechmill.pipeline.safe_names import safe_name
from speechmill.pipeline.stage import Resources, SinkResult, Stage, StageConfig
from speechmill.synth.text.dialogues import (
    DIALOGUE_COLUMNS,
    PROVENANCE_COLUMNS,
    Dialogue,
    check_turn_columns,
    dialogue_provenance,
    iter_dialogues,
    survey,
    turn_provenance,
    user_voice,
)

#: row columns this sink reads
READ_COLUMNS = ("audio_path", "offset", "duration", "sample_rate", "speaker", "text",
                "words", "parent_id", *PROVENANCE_COLUMNS, *DIALOGUE_COLUMNS)


class AssembleConfig(StageConfig):
    gap_s: float = Field(0.4, ge=0, le=30, description="silence between turns (s)")
    gap_jitter_s: float = Field(0.0, ge=0, le=30, description="each gap is drawn from "
                                "gap_s +- this (uniform, seeded per dialogue, never < 0)")
    seed: int = Field(0, description="seed of the gap jitter")
    sample_rate: int = Field(24000, ge=8000, le=192000, description="conversation audio "
                             "rate (moshi's Mimi codec runs at 24 kHz)")
    mono: bool = Field(True, description="write audio/<dialogue>.wav (all turns, mono)")
    stereo: bool = Field(True, description="write moshi-finetune's layout: two-channel "
                         "wavs (assistant left, user right), alignment JSON, data.jsonl")
    lhotse: bool = Field(True, description="Lhotse recordings/supervisions/cuts over the "
                         "mono conversations (needs mono)")
    relative_paths: bool = Field(False, description="Lhotse audio paths relative to the "
                                 "lhotse/ directory (else absolute)")
    assistant_label: str = Field("SPEAKER_MAIN", min_length=1, description="speaker of "
                                 "the assistant's words in the alignment JSON (moshi's "
                                 "main speaker)")
    user_label: str = Field("SPEAKER_OTHER", min_length=1, description="speaker of the "
                            "user's words in the alignment JSON")
    truncate_incomplete: bool = Field(False, description="keep the rounds before a "
                                      "dialogue's first missing one (ending on an assistant "
                                      "turn) instead of rejecting the dialogue")
    by_split: bool = Field(True, description="one subdirectory per value of `split`")


def gaps_for(dialogue_id: str, n: int, gap_s: float, jitter_s: float, seed: int
             ) -> list[float]:
    """The ``n`` gaps (seconds) between a dialogue's turns: ``gap_s`` plus a uniform
    draw in ``[-jitter_s, jitter_s]`` seeded by (``seed``, dialogue id), never below 0."""
    if n <= 0:
        return []
    if jitter_s <= 0:
        return [gap_s] * n
    h = hashlib.sha256(f"{seed}\x1f{dialogue_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(h[:8], "little"))
    return [max(0.0, gap_s + float(x)) for x in rng.uniform(-jitter_s, jitter_s, n)]


class DialogueAssemble(Stage):
    name = "dialogue_assemble"
    description = ("dialogues -> conversation audio (mono + moshi stereo with word "
                   "alignments), dialogues.jsonl with turn timings, Lhotse cuts")
    Config = AssembleConfig
    resources = Resources(cpus=1)
    is_sink = True
    output_root = "exports"

    config: AssembleConfig

    @classmethod
    def validate_config(cls, config: StageConfig) -> None:
        assert isinstance(config, AssembleConfig)
        if config.lhotse and not config.mono:
            raise ValueError("key 'lhotse': the Lhotse cuts are over the mono conversation "
                             "audio; set mono: true (or lhotse: false)")
        if config.assistant_label == config.user_label:
            raise ValueError("key 'user_label': must differ from assistant_label")

    def export(self, inputs: pa.Table, out_dir: Path) -> SinkResult:
        cfg = self.config
        sid = self.ctx.stage_id
        check_turn_columns(inputs, sid)
        out_dir = Path(out_dir)
        pub_root = published_dir(out_dir, self.ctx, self.output_root)
        info = survey(inputs, self.ctx.run_dir, splits=cfg.by_split)
        rejects: list[dict[str, Any]] = []
        splits: dict[str, dict[str, Any]] = {}
        n_turns, seconds = 0, 0.0
        no_words = truncated = 0
        for split, table in split_groups(inputs, cfg.by_split):
            sub = out_dir / split if split else out_dir
            pub = pub_root / split if split else pub_root
            sub.mkdir(parents=True, exist_ok=True)
            w = _Writers(sub, pub, cfg)
            stats = {"dialogues": 0, "turns": 0, "hours": 0.0, "user_voices": set()}
            try:
                dialogues = iter_dialogues(table, sid, rejects,
                                           truncate_incomplete=cfg.truncate_incomplete,
                                           columns=READ_COLUMNS, info=info)
                for d in track(dialogues, table.num_rows // 2, f"{sid} {split or ''}"):
                    made = self._dialogue(d, w, rejects)
                    if made is None:
                        continue
                    secs, missing_words = made
                    stats["dialogues"] += 1
                    stats["turns"] += d.rounds
                    stats["hours"] += secs / 3600.0
                    v = user_voice(d)
                    if v:
                        stats["user_voices"].add(v)
                    n_turns += d.rounds
                    seconds += secs
                    no_words += missing_words
                    truncated += int(d.truncated)
            finally:
                w.close()
            stats["user_voices"] = len(stats["user_voices"])
            stats["hours"] = round(stats["hours"], 6)
            splits[split or "all"] = stats
        reasons = Counter(r["reason"] for r in rejects)
        summary = {
            "dialogues": sum(s["dialogues"] for s in splits.values()), "turns": n_turns,
            "hours": round(seconds / 3600.0, 6), "truncated": truncated,
            "turns_without_words": no_words, "rejected": len(rejects),
            "reasons": dict(sorted(reasons.items())), "splits": splits,
            "sample_rate": cfg.sample_rate, "mono": cfg.mono, "stereo": cfg.stereo,
            "lhotse": cfg.lhotse,
        }
        return SinkResult(rows_out=n_turns, seconds_out=seconds,
                          rejects=rejects_table(rejects), summary=summary)

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        lines = [f"{name}: {s['dialogues']} dialogues, {s['turns']} turns, "
                 f"{s['hours']:.3f} h, {s['user_voices']} user voices"
                 for name, s in summary.get("splits", {}).items()]
        if summary.get("turns_without_words"):
            lines.append(f"{summary['turns_without_words']} turns without ASR words (no "
                         "alignment for them)")
        if summary.get("rejected"):
            why = ", ".join(f"{k} {v}" for k, v in summary.get("reasons", {}).items())
            lines.append(f"rejected: {summary['rejected']} turns ({why})")
        return lines

    # -- one dialogue -----------------------------------------------------------------------
    def _dialogue(self, d: Dialogue, w: _Writers, rejects: list[dict[str, Any]]
                  ) -> tuple[float, int] | None:
        cfg = self.config
        sr = cfg.sample_rate
        clips: list[np.ndarray] = []
        for t in d.turns:
            try:
                x, _ = read_clip(t, sr)
                if x.shape[0] == 0:
                    raise AudioError("empty_audio", "the clip has no samples")
                if not np.isfinite(x).all():
                    raise AudioError("nonfinite_samples", "NaN or inf samples")
            except Exception as e:  # noqa: BLE001 - one bad clip rejects its dialogue
                reason = e.reason if isinstance(e, AudioError) else "unreadable"
                why = e.detail if isinstance(e, AudioError) else f"{type(e).__name__}: {e}"
                for u in d.turns:
                    if u is t:
                        rejects.append(reject(u, self.ctx.stage_id, reason, why))
                    else:
                        rejects.append(reject(u, self.ctx.stage_id, "dialogue_incomplete",
                                              f"dialogue {d.dialogue_id}: round {t['round']}"
                                              f" ({t.get('role')}) unreadable: {reason}"))
                return None
            clips.append(x)
        gaps = gaps_for(d.dialogue_id, len(clips) - 1, cfg.gap_s, cfg.gap_jitter_s, cfg.seed)
        gap_n = [int(round(g * sr)) for g in gaps]
        starts: list[int] = []
        pos = 0
        for i, x in enumerate(clips):
            starts.append(pos)
            pos += x.shape[0] + (gap_n[i] if i < len(gap_n) else 0)
        total = pos
        stem = safe_name(d.dialogue_id, max_bytes=200)  # distinct ids, distinct files
        if cfg.mono:
            mono = np.zeros(total, np.float32)
            for s, x in zip(starts, clips, strict=True):
                mono[s:s + x.shape[0]] = x
            w.write_wav(f"audio/{stem}.wav", mono, sr)
        if cfg.stereo:
            st = np.zeros((total, 2), np.float32)
            for s, x, t in zip(starts, clips, d.turns, strict=True):
                st[s:s + x.shape[0], 0 if t.get("role") == "assistant" else 1] = x
            w.write_wav(f"moshi/stereo/{stem}.wav", st, sr)
        words, missing_words = self._alignments(d, starts, clips, sr)
        if cfg.stereo:
            w.write_text(f"moshi/stereo/{stem}.json",
                         json.dumps({"alignments": words}, ensure_ascii=False))
            w.moshi.write(dumps_line({"path": f"stereo/{stem}.wav",
                                      "duration": round(total / sr, 6)}) + "\n")
        turns = []
        for s, x, t, g in zip(starts, clips, d.turns, [*gap_n, 0], strict=True):
            p = turn_provenance(t)
            turns.append({
                "id": t["id"], "round": t["round"], "role": t.get("role"),
                "text": t.get("text"), "speaker": t.get("speaker"),
                "voice_id": p["voice_id"], "voice_source": p["voice_source"],
                "tts_backend": p["tts_backend"], "tts_version": p["tts_version"],
                "audio_path": rel_or_abs(str(t["audio_path"]), w.pub, False),
                "clip_duration": round(x.shape[0] / sr, 6),
                "start": round(s / sr, 6), "end": round((s + x.shape[0]) / sr, 6),
                "gap_after": round(g / sr, 6),
            })
        first = d.turns[0]
        line = {
            "id": d.dialogue_id, "split": d.split, "n_rounds": d.n_rounds,
            "rounds": d.rounds, "truncated": d.truncated,
            "duration": round(total / sr, 6), "sample_rate": sr,
            "audio": f"audio/{stem}.wav" if cfg.mono else None,
            "stereo": f"moshi/stereo/{stem}.wav" if cfg.stereo else None,
            "alignment": f"moshi/stereo/{stem}.json" if cfg.stereo else None,
            "language": first.get("language"), "system": first.get("system"),
            "topic": first.get("topic"), "persona": first.get("persona"),
            "user_voice": user_voice(d), "synthetic": True,
            "provenance": dialogue_provenance(d.turns), "turns": turns,
        }
        w.dialogues.write(dumps_line(line) + "\n")
        if cfg.lhotse:
            w.lhotse(d, stem, starts, clips, total, sr)
        return total / sr, missing_words

    def _alignments(self, d: Dialogue, starts: list[int], clips: list[np.ndarray],
                    sr: int) -> tuple[list[list[Any]], int]:
        """moshi alignment entries ``[word, [start, end], speaker]`` of every turn's words
        on the conversation's timeline (sorted by start), and the number of turns that
        had no words."""
        cfg = self.config
        out: list[tuple[float, int, list[Any]]] = []
        missing = 0
        for k, (s, x, t) in enumerate(zip(starts, clips, d.turns, strict=True)):
            label = cfg.assistant_label if t.get("role") == "assistant" else cfg.user_label
            base, dur = s / sr, x.shape[0] / sr
            n = 0
            for w in t.get("words") or []:
                if not w or w.get("start") is None or w.get("end") is None:
                    continue
                text = str(w.get("word") or "").strip()
                if not text:
                    continue
                a = min(max(0.0, float(w["start"])), dur)
                b = min(max(a, float(w["end"])), dur)
                out.append((base + a, k, [text, [round(base + a, 3), round(base + b, 3)],
                                          label]))
                n += 1
            if n == 0:
                missing += 1
        out.sort(key=lambda e: (e[0], e[1]))
        return [e[2] for e in out], missing


class _Writers:
    """The open files of one split's directory."""

    def __init__(self, sub: Path, pub: Path, cfg: AssembleConfig) -> None:
        self.sub = sub
        self.pub = pub
        self.cfg = cfg
        self.dialogues = open_text_out(sub / "dialogues.jsonl")
        self.moshi = open_text_out(sub / "moshi" / "data.jsonl") if cfg.stereo else None
        self.sup_f = self.cut_f = self.rec_f = None
        if cfg.lhotse:
            lh = sub / "lhotse"
            self.rec_f = open_text_out(lh / "recordings.jsonl.gz")
            self.sup_f = open_text_out(lh / "supervisions.jsonl.gz")
            self.cut_f = open_text_out(lh / "cuts.jsonl.gz")

    def write_wav(self, rel: str, x: np.ndarray, sr: int) -> None:
        from speechmill.pipeline.audio_write import write_audio

        path = self.sub / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_audio(path, x, sr, format="WAV", subtype="PCM_16")

    def write_text(self, rel: str, text: str) -> None:
        path = self.sub / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")

    def lhotse(self, d: Dialogue, stem: str, starts: list[int], clips: list[np.ndarray],
               total: int, sr: int) -> None:
        from lhotse import AudioSource, MonoCut, Recording
        from lhotse.utils import fastcopy

        assert self.rec_f is not None and self.sup_f is not None and self.cut_f is not None
        audio = self.pub / "audio" / f"{stem}.wav"
        src = rel_or_abs(str(audio), self.pub / "lhotse", self.cfg.relative_paths)
        rec = Recording(id=d.dialogue_id, sources=[AudioSource(type="file", channels=[0],
                                                               source=src)],
                        sampling_rate=sr, num_samples=total, duration=total / sr)
        sups = []
        for s, x, t in zip(starts, clips, d.turns, strict=True):
            start, dur = round(s / sr, 6), round(x.shape[0] / sr, 6)
            row = {**t, "speaker": turn_provenance(t)["voice_id"]}
            sup = supervision(row, d.dialogue_id, start, dur, ali_base=start)
            self.sup_f.write(dumps_line(sup.to_dict()) + "\n")
            sups.append(fastcopy(sup, start=start))  # the cut starts at 0: same times
        custom = {"dialogue_id": d.dialogue_id, "n_rounds": d.n_rounds,
                  "truncated": d.truncated, "synthetic": True,
                  "provenance": dialogue_provenance(d.turns)}
        cut = MonoCut(id=d.dialogue_id, start=0.0, duration=total / sr, channel=0,
                      recording=rec, supervisions=sups, custom=custom)
        self.rec_f.write(dumps_line(rec.to_dict()) + "\n")
        self.cut_f.write(dumps_line(cut.to_dict()) + "\n")

    def close(self) -> None:
        for f in (self.dialogues, self.moshi, self.rec_f, self.sup_f, self.cut_f):
            if f is not None:
                f.close()
