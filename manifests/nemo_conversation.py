"""Sink stage ``nemo_conversation``: NeMo multimodal conversations + per-turn manifests.

Per split (``<split>/`` when the input has a ``split`` column), for the complete
dialogues (see :mod:`speechmill.synth.text.dialogues`):

- ``conversations.jsonl``: what NeMo's ``NeMoMultimodalConversationJsonlAdapter``
  (``nemo.collections.common.data.lhotse``, input type ``multimodal_conversation``)
  reads, one dialogue per line::

      {"id": "<dialogue_id>",
       "conversations": [
         {"from": "User", "type": "audio", "value": "<wav path>", "duration": 2.31},
         {"from": "Assistant", "type": "text", "value": "<answer text>"}, ...],
       "custom": {"synthetic": true, "provenance": {...}, ...}}

  The adapter lower-cases ``from`` into the turn's role, builds an audio turn from
  ``value`` (a path, resolved against the manifest's directory when relative) cut to
  ``duration``, and hands ``custom`` to the conversation object. Which turns are audio is
  chosen per role: ``user: audio`` and ``assistant: text`` by default (speech in, text
  out, as SALM-style models train); ``assistant: audio`` makes the answers audio turns.
  ``duration`` is written for audio turns only; ``offset`` is never needed (``tts``
  clips are whole files). Audio turn file names are unique per turn (the adapter names
  a turn's cut after the file's stem).
- ``turns_manifest.json``: a NeMo ASR/TTS manifest of the same turns, one per line:
  ``audio_filepath``, ``duration``, ``text``, ``lang``, ``speaker`` (the voice id),
  ``id``, then ``dialogue_id``, ``round``, ``role``, ``synthetic``, ``voice_source``,
  ``tts_backend``, ``tts_version``, ``llm`` (extra keys NeMo's loaders ignore; filter
  by ``role`` for user-only ASR or assistant-only TTS data).

Paths are relative to the manifest's directory (``paths: relative``, NeMo resolves them
there) or absolute. A turn whose clip is missing rejects its dialogue whole (that turn
``unreadable``, the others ``dialogue_incomplete``).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from speechmill.manifests.common import dumps_line, open_text_out, split_groups, track
from speechmill.pipeline.audio import AudioError, is_url
from speechmill.pipeline.clips import check_span
from speechmill.pipeline.publish import published_dir, rel_or_abs
from speechmill.pipeline.records import reject, rejects_table
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
)

READ_COLUMNS = ("audio_path", "offset", "duration", "speaker", "text",
                *PROVENANCE_COLUMNS, *DIALOGUE_COLUMNS)
ROLE_NAMES = {"user": "User", "assistant": "Assistant"}


class NemoConversationConfig(StageConfig):
    user: Literal["audio", "text"] = Field("audio", description="user turns as audio "
                                           "(default) or text")
    assistant: Literal["text", "audio"] = Field("text", description="assistant turns as "
                                                "text (default) or audio")
    paths: Literal["relative", "absolute"] = Field(
        "relative", description="audio paths relative to the manifest's directory (NeMo "
        "resolves them there) or absolute")
    turn_manifest: bool = Field(True, description="also write turns_manifest.json (NeMo "
                                "ASR/TTS manifest of every kept turn)")
    truncate_incomplete: bool = Field(False, description="keep the rounds before a "
                                      "dialogue's first missing one instead of rejecting it")
    by_split: bool = Field(True, description="one subdirectory per value of `split`")


class NemoConversation(Stage):
    name = "nemo_conversation"
    description = ("NeMo multimodal conversation JSONL (NeMoMultimodalConversationJsonl"
                   "Adapter) + per-turn NeMo ASR/TTS manifests")
    Config = NemoConversationConfig
    resources = Resources(cpus=1)
    is_sink = True
    output_root = "exports"

    config: NemoConversationConfig

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
        for split, table in split_groups(inputs, cfg.by_split):
            sub = out_dir / split if split else out_dir
            pub = pub_root / split if split else pub_root
            sub.mkdir(parents=True, exist_ok=True)
            conv_f = open_text_out(sub / "conversations.jsonl")
            turn_f = open_text_out(sub / "turns_manifest.json") if cfg.turn_manifest \
                else None
            n_dlg, n_t, secs = 0, 0, 0.0
            try:
                dialogues = iter_dialogues(table, sid, rejects,
                                           truncate_incomplete=cfg.truncate_incomplete,
                                           columns=READ_COLUMNS, info=info)
                for d in track(dialogues, table.num_rows // 2, f"{sid} {split or ''}"):
                    made = self._dialogue(d, pub, rejects)
                    if made is None:
                        continue
                    line, turn_lines, d_secs = made
                    conv_f.write(dumps_line(line) + "\n")
                    if turn_f is not None:
                        for t in turn_lines:
                            turn_f.write(dumps_line(t) + "\n")
                    n_dlg += 1
                    n_t += d.rounds
                    secs += d_secs
            finally:
                conv_f.close()
                if turn_f is not None:
                    turn_f.close()
            splits[split or "all"] = {"dialogues": n_dlg, "turns": n_t,
                                      "hours": round(secs / 3600.0, 6)}
            n_turns += n_t
            seconds += secs
        reasons = Counter(r["reason"] for r in rejects)
        summary = {"dialogues": sum(s["dialogues"] for s in splits.values()),
                   "turns": n_turns, "hours": round(seconds / 3600.0, 6),
                   "user": cfg.user, "assistant": cfg.assistant, "paths": cfg.paths,
                   "rejected": len(rejects), "reasons": dict(sorted(reasons.items())),
                   "splits": splits}
        return SinkResult(rows_out=n_turns, seconds_out=seconds,
                          rejects=rejects_table(rejects), summary=summary)

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        lines = [f"{n}: {s['dialogues']} conversations, {s['turns']} turns, "
                 f"{s['hours']:.3f} h" for n, s in summary.get("splits", {}).items()]
        if summary.get("rejected"):
            why = ", ".join(f"{k} {v}" for k, v in summary.get("reasons", {}).items())
            lines.append(f"rejected: {summary['rejected']} turns ({why})")
        return lines

    def _dialogue(self, d: Dialogue, pub: Path, rejects: list[dict[str, Any]]
                  ) -> tuple[dict[str, Any], list[dict[str, Any]], float] | None:
        cfg = self.config
        sid = self.ctx.stage_id
        relative = cfg.paths == "relative"
        spans: list[tuple[str, float]] = []
        for t in d.turns:
            try:
                path = t.get("audio_path")
                if not path:
                    raise AudioError("no_audio", "the turn has no audio_path")
                if not is_url(str(path)) and not os.path.isfile(str(path)):
                    raise AudioError("unreadable", f"no such file: {path}")
                off, dur = check_span(t)
                if dur is None:
                    raise AudioError("no_duration", "duration is null")
                if off:
                    raise AudioError("bad_span", f"offset {off}: tts clips are whole files")
            except AudioError as e:
                for u in d.turns:
                    if u is t:
                        rejects.append(reject(u, sid, e.reason, e.detail))
                    else:
                        rejects.append(reject(u, sid, "dialogue_incomplete",
                                              f"dialogue {d.dialogue_id}: round {t['round']} "
                                              f"({t.get('role')}): {e.reason}"))
                return None
            spans.append((rel_or_abs(str(path), pub, relative), float(dur)))
        conv: list[dict[str, Any]] = []
        turn_lines: list[dict[str, Any]] = []
        secs = 0.0
        for t, (path, dur) in zip(d.turns, spans, strict=True):
            role = str(t.get("role"))
            kind = cfg.user if role == "user" else cfg.assistant
            if kind == "audio":
                conv.append({"from": ROLE_NAMES[role], "type": "audio", "value": path,
                             "duration": round(dur, 6)})
            else:
                conv.append({"from": ROLE_NAMES[role], "type": "text",
                             "value": t.get("text") or ""})
            secs += dur
            p = turn_provenance(t)
            turn_lines.append({
                "audio_filepath": path, "duration": round(dur, 6),
                "text": t.get("text") or "", "lang": t.get("language"),
                "speaker": p["voice_id"], "id": t["id"], "dialogue_id": d.dialogue_id,
                "round": t["round"], "role": role, "synthetic": p["synthetic"],
                "voice_source": p["voice_source"], "tts_backend": p["tts_backend"],
                "tts_version": p["tts_version"], "llm": p["llm"]})
        first = d.turns[0]
        custom = {"synthetic": True, "split": d.split, "n_rounds": d.n_rounds,
                  "truncated": d.truncated, "language": first.get("language"),
                  "system": first.get("system"), "topic": first.get("topic"),
                  "provenance": dialogue_provenance(d.turns)}
        return {"id": d.dialogue_id, "conversations": conv, "custom": custom}, \
            turn_lines, secs
