"""Stage ``speech_rewrite``: make dialogue turns speakable before any audio is made.

Works on turn rows (:mod:`speechmill.synth.text.turns`), one row at a time; ``text`` becomes
what is spoken and ``text_original`` keeps the text before the first rewrite. Two modes:

* ``rules`` (default; deterministic, offline, no LLM): :func:`speechmill.synth.text.speakable.
  make_speakable` strips markdown, emoji and URLs and spells out numbers, ordinals,
  currencies, units, dates, times and common abbreviations (``num2words``; word lists
  for English, German and French).
* ``llm``: the versioned prompt below asks an OpenAI-compatible model (``llm``:
  :class:`speechmill.synth.llm.config.LLMConfig`) to rewrite each turn: user turns as natural
  spoken requests with light fillers, assistant turns concise, without lists,
  parentheses, markdown, code or URLs, numbers, units and dates in words. The answer is
  checked (:func:`speechmill.synth.text.speakable.has_unspoken`: no digits, markdown, URLs,
  symbols; within the length budget); a failing answer is asked again with the problem
  fed back, then rejected (``llm_invalid_output``; ``llm_error`` / ``llm_refusal`` from
  the client).

Either way, a turn that cannot sensibly be spoken is rejected before rewriting:
``unspeakable_code``, ``unspeakable_table``, ``unspeakable_math``; after rewriting,
``too_long_to_speak`` when ``est_seconds`` (characters / ``chars_per_second``) passes
``max_spoken_seconds``, then the per-turn content QC (``qc_*``, :mod:`~speechmill.synth.
text_qc`). Added columns: ``est_seconds``, ``sentences`` (the text split at sentence
boundaries, long sentences at clauses, for the TTS) and ``rewrite`` (JSON provenance:
mode, rules version or model, prompt version hash, temperature, seed).

In llm mode ``llm_error`` is a *transient* reject (``kind`` "transient": counted toward
the error budget, retried by a rerun) when the service failed after the client's retries
(connection refused, timeouts, 408/409/425/429/5xx), a data reject when the server
answered 4xx or something that is not a chat completion; every other reason is a data
reject. Details are redacted (:func:`speechmill.pipeline.redact.redact_text`) before
they are cut short.

In rules mode a turn whose language ``num2words`` does not know is rejected as
``unsupported_language``. A rejected turn leaves its dialogue incomplete; the stage
that assembles dialogues rejects the whole dialogue then (siblings are not touched
here).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field

from speechmill.pipeline.errors import is_fatal
from speechmill.pipeline.records import reject, rejects_table
from speechmill.pipeline.redact import redact_text
from speechmill.pipeline.stage import Resources, Stage, StageConfig, StageResult
from speechmill.synth.llm.config import LLMConfig
from speechmill.synth.llm.usage import (
    committed_usage,
    usage_columns,
    usage_line,
    usage_tail,
    usage_values,
)
from speechmill.synth.qc.text_qc import TextQCConfig, find_pii, mask_pii, qc_turn
from speechmill.synth.text import speakable

# -- the LLM prompt (bump PROMPT_REVISION with any change; its hash is recorded) ---------

PROMPT_REVISION = "speech_rewrite/1"

USER_PROMPT = """\
You rewrite one message that a person types to an AI assistant into what the same \
person would say out loud to a voice assistant.
Rules:
- Keep the meaning, the request and every detail that matters; do not answer it.
- Natural spoken phrasing in {language}; a light filler or hesitation ("um", "so", \
"you know") is fine now and then, never more than one.
- Write every number, unit, currency, date, time, percentage and symbol in words \
(for example "twenty-five kilometers", "March third").
- Nothing a speech synthesizer cannot say: no digits, markdown, lists, emoji, URLs, \
code, tables, formulas or parentheses. If the message contains code or a table, \
describe briefly what the person asks about it.
- Reply with the rewritten message only, no quotes, no preamble."""

ASSISTANT_PROMPT = """\
You rewrite one answer of an AI assistant into what a voice assistant would say out \
loud.
Rules:
- Keep the facts and the answer; concise, at most about {max_words} words.
- Plain spoken sentences in {language}: no lists or bullet points, no headings, no \
parentheses, no markdown, no emoji, no code, no URLs.
- Write every number, unit, currency, date, time, percentage and symbol in words \
(for example "twenty-five kilometers", "March third").
- Reply with the rewritten answer only, no quotes, no preamble."""

TEMPLATE = "Rewrite this {role} message:\n\n{text}"

LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish",
                  "it": "Italian", "pt": "Portuguese", "nl": "Dutch", "pl": "Polish",
                  "ru": "Russian", "zh": "Chinese", "ja": "Japanese", "ko": "Korean"}


def prompt_version() -> str:
    """12 hex digits naming the prompt text (recorded in ``rewrite``; in the cache key)."""
    blob = "\x1f".join((PROMPT_REVISION, USER_PROMPT, ASSISTANT_PROMPT, TEMPLATE))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def build_messages(text: str, role: str, language: str, max_words: int
                   ) -> list[dict[str, str]]:
    lang = LANGUAGE_NAMES.get(language, language)
    system = (ASSISTANT_PROMPT if role == "assistant" else USER_PROMPT).format(
        language=lang, max_words=max_words)
    return [{"role": "system", "content": system},
            {"role": "user", "content": TEMPLATE.format(role=role, text=text)}]


#: per-row LLM usage columns of llm mode (``rewrite_llm_requests``, ...)
USAGE_PREFIX = "rewrite_llm_"


@dataclass
class _Rewritten:
    text: str | None  # None: rejected with reason/detail
    prov: dict[str, Any]
    reason: str = ""
    detail: str = ""
    usage: dict[str, Any] | None = field(default=None)  # llm mode
    transient: bool = False  # the service failed, not the row (llm mode)


# -- config --------------------------------------------------------------------------------

class SpeechRewriteConfig(StageConfig):
    mode: Literal["rules", "llm"] = Field(
        "rules", description="rules: offline, deterministic; llm: the versioned prompt")
    language: str | None = Field(
        None, description="language of rows without one (ISO 639-1); default en")
    chars_per_second: float = Field(
        15.0, gt=0, description="speaking rate for est_seconds (about 150 words/min)")
    max_spoken_seconds: float | None = Field(
        60.0, gt=0, description="longer turns are rejected (too_long_to_speak)")
    max_sentence_chars: int = Field(
        250, ge=20, description="longer sentences are split at clauses in 'sentences'")
    qc: TextQCConfig | None = Field(
        default_factory=TextQCConfig, description="content QC after rewriting (null: none)")
    llm: LLMConfig | None = Field(None, description="the model (mode llm)")


class SpeechRewrite(Stage):
    #: its LLM cache lives under RUN_DIR by local path (URL run dirs: refused)
    local_run_dir_only: ClassVar[bool] = True
    name = "speech_rewrite"
    description = ("rewrite dialogue turns for speech: rules (numbers, dates, units, "
                   "markdown) or an LLM prompt")
    Config = SpeechRewriteConfig
    resources = Resources(cpus=1)
    default_batch_size = 64

    config: SpeechRewriteConfig

    @classmethod
    def validate_config(cls, config: StageConfig) -> None:
        c = config
        assert isinstance(c, SpeechRewriteConfig)
        if c.mode == "llm":
            if c.llm is None:
                raise ValueError("key 'llm': required when mode is 'llm' (model, base_url)")
            c.llm.check()
        if c.language is not None:
            from num2words import CONVERTER_CLASSES

            if c.mode == "rules" and c.language.split("-")[0] not in CONVERTER_CLASSES:
                raise ValueError(f"key 'language': num2words has no {c.language!r}; "
                                 "rules mode cannot spell its numbers")

    def setup(self) -> None:
        self.client = None
        if self.config.mode == "llm":
            from speechmill.synth.llm.client import LLMClient

            assert self.config.llm is not None
            cache = Path(self.ctx.run_dir) / "cache" / "llm" / self.ctx.stage_id
            self.client = LLMClient(self.config.llm, cache, self.ctx.stage_id)

    def teardown(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    # -- work ------------------------------------------------------------------------------
    def _language(self, row: dict[str, Any]) -> str:
        return row.get("language") or self.config.language or "en"

    def _max_chars(self) -> int | None:
        c = self.config
        return None if c.max_spoken_seconds is None else int(
            c.max_spoken_seconds * c.chars_per_second)

    def process(self, batch: pa.Table) -> StageResult:
        rows = batch.to_pylist()
        sid = self.ctx.stage_id
        outputs: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        todo: list[dict[str, Any]] = []
        for row in rows:
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                rejects.append(reject(row, sid, "qc_length", "no text"))
                continue
            bad = speakable.unspeakable(text)
            if bad is not None:
                rejects.append(reject(row, sid, *bad))
                continue
            qc = self.config.qc
            if qc is not None and qc.pii != "keep":
                # personal data is masked (or rejected) before rewriting: a rewrite would
                # spell it out past the QC, and an LLM endpoint should never see it
                found = find_pii(text)
                if found and qc.pii == "reject":
                    kinds = ", ".join(sorted({k for k, _, _ in found}))
                    rejects.append(reject(row, sid, "qc_pii", f"contains {kinds}"))
                    continue
                if found:
                    row = {**row, "text": mask_pii(text, found, qc.pii_masks),
                           "text_original": row.get("text_original") or text}
            todo.append(row)
        new: dict[str, _Rewritten] = {}
        if self.config.mode == "llm":
            new = self._rewrite_llm(todo)
        else:
            from num2words import CONVERTER_CLASSES

            prov = {"mode": "rules", "rules_version": speakable.RULES_VERSION}
            for row in todo:
                lang = self._language(row)
                if lang.replace("-", "_") not in CONVERTER_CLASSES and \
                        lang.split("-")[0].split("_")[0] not in CONVERTER_CLASSES:
                    new[row["id"]] = _Rewritten(None, prov, "unsupported_language", (
                        f"the rules cannot spell numbers in {lang!r} (num2words); "
                        "use mode llm"))
                    continue
                try:
                    out = speakable.make_speakable(row["text"], self._language(row))
                except Exception as e:  # one row's failure never kills the run...
                    if is_fatal(e):  # ...but a full disk or an engine error is no row's
                        raise
                    new[row["id"]] = _Rewritten(None, prov, "error", f"{type(e).__name__}: {e}")
                    continue
                new[row["id"]] = _Rewritten(out, prov)
        for row in todo:
            rw = new[row["id"]]
            # what the LLM cost stays on the row (an output column, or the reject detail)
            tail = usage_tail(rw.usage) if rw.usage is not None else ""
            if rw.text is None:
                rejects.append(reject(row, sid, rw.reason,
                                      redact_text(rw.detail, limit=1700) + tail,
                                      transient=rw.transient))
                continue
            got = self._finish(row, rw.text, rw.prov)
            if isinstance(got, tuple):
                rejects.append(reject(row, sid, got[0], got[1][:1700] + tail))
                continue
            if rw.usage is not None:
                got.update(usage_values(rw.usage, USAGE_PREFIX))
            outputs.append(got)
        return StageResult(self.outputs_table(outputs), rejects_table(rejects))

    def _finish(self, row: dict[str, Any], text: str, prov: dict[str, Any]
                ) -> dict[str, Any] | tuple[str, str]:
        c = self.config
        text = text.strip()
        if not text:
            return "qc_length", "nothing speakable is left after rewriting"
        if c.qc is not None:
            text, reason, detail = qc_turn(text, c.qc, self._language(row),
                                           role=row.get("role"))
            if reason is not None:
                return reason, detail
        est = len(text) / c.chars_per_second
        if c.max_spoken_seconds is not None and est > c.max_spoken_seconds:
            return "too_long_to_speak", (f"about {est:.0f} s spoken (> max_spoken_seconds "
                                         f"{c.max_spoken_seconds:g}; {len(text)} characters)")
        old = row.get("text")
        original = row.get("text_original")
        if original is None and text != old:
            original = old
        return {**row, "parent_id": row["id"], "text": text, "text_original": original,
                "est_seconds": round(est, 2),
                "sentences": speakable.sentences(text, c.max_sentence_chars),
                "rewrite": json.dumps(prov, sort_keys=True)}

    def _rewrite_llm(self, rows: list[dict[str, Any]]) -> dict[str, _Rewritten]:
        from speechmill.synth.llm.conversation import ChatRequest

        c = self.config
        assert c.llm is not None and self.client is not None
        version = prompt_version()
        max_chars = self._max_chars()
        max_words = max(20, int(max_chars / 6)) if max_chars else 120
        reqs = []
        for row in rows:
            role = row.get("role") or "user"
            reqs.append(ChatRequest(
                key=row["id"],
                messages=build_messages(row["text"], role, self._language(row), max_words),
                validate=_validator(max_chars),
                prompt_version=version,
                overrides=_seed(c.llm.seed, row["id"]),
            ))
        out: dict[str, _Rewritten] = {}
        for row, req, res in zip(rows, reqs, self.client.run(reqs), strict=True):
            prov = {"mode": "llm", "model": c.llm.model, "prompt_version": version,
                    "prompt_revision": PROMPT_REVISION, "temperature": c.llm.temperature,
                    **req.overrides}
            usage = dict(res.usage)
            if not res.ok:
                out[row["id"]] = _Rewritten(None, prov, res.reason or "llm_error",
                                            res.detail or "", usage,
                                            transient=res.transient)
                continue
            text = res.parsed if isinstance(res.parsed, str) else (res.text or "")
            out[row["id"]] = _Rewritten(text, prov, usage=usage)
        return out

    summary_columns = ("est_seconds", *usage_columns(USAGE_PREFIX))

    @classmethod
    def summarize(cls, outputs: pa.Table, rejects: pa.Table) -> dict[str, Any] | None:
        import pyarrow.compute as pc

        total = 0.0
        if "est_seconds" in outputs.column_names and outputs.num_rows:
            total = float(pc.sum(outputs.column("est_seconds")).as_py() or 0.0)
        out: dict[str, Any] = {"turns": outputs.num_rows, "est_hours": round(total / 3600.0, 4)}
        if (set(usage_columns(USAGE_PREFIX)) & set(outputs.column_names)) or any(
                "[llm requests=" in (d or "") for d in (
                    rejects.column("detail").to_pylist() if rejects.num_rows else [])):
            out["llm"] = committed_usage(outputs, rejects, USAGE_PREFIX)
        return out

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        lines = [f"{summary['turns']} turns, about {summary['est_hours']:.2f} h to speak"]
        if summary.get("llm"):
            lines.append(usage_line(summary["llm"]))
        return lines


def _seed(seed: int | None, key: str) -> dict[str, Any]:
    if seed is None:
        return {}
    return {"seed": (seed + int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)) % 2**31}


def _validator(max_chars: int | None):  # type: ignore[no-untyped-def]
    def check(value: Any) -> str:
        text = str(value or "").strip().strip('"').strip()
        if not text:
            raise ValueError("the answer is empty; reply with the rewritten text")
        problem = speakable.has_unspoken(text)
        if problem is not None:
            raise ValueError(problem)
        if max_chars is not None and len(text) > max_chars:
            raise ValueError(f"it is {len(text)} characters long; keep it under "
                             f"{max_chars} characters")
        return text
    return check
