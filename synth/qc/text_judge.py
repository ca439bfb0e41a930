"""Optional LLM-as-judge content QC: coherence and naturalness of a dialogue, 1-5.

Off by default (stages take ``judge: null``). With a :class:`JudgeConfig`, each dialogue
that passed the rule-based QC (:mod:`speechmill.synth.qc.text_qc`) is shown to the model
with the versioned prompt below and a structured answer :class:`JudgeScores` is asked
for (JSON schema, validated by pydantic; the LLM client retries invalid answers). A
dialogue scoring under ``min_coherence`` or ``min_naturalness`` is rejected as
``qc_judge``; a dialogue the judge could not score is rejected with the client's reason
(``llm_error``, ``llm_invalid_output``, ``llm_refusal``). The scores, the model and the
prompt version are kept in the turn rows' ``judge`` column (JSON).

A judge that could not be reached (connection refused, timeouts, 429/5xx after the
client's retries: :attr:`ChatResult.transient <speechmill.synth.llm.conversation.ChatResult>`) says
nothing about the dialogue: :func:`judge_transient` is True and the stage rejects it as
a transient ``llm_error`` (retried by a rerun). ``qc_judge`` and the judge's invalid
answers or refusals are data rejects.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from speechmill.synth.llm.config import LLMConfig
from speechmill.synth.llm.conversation import ChatRequest, ChatResult

JUDGE_REVISION = "text_judge/1"

JUDGE_PROMPT = """\
You rate a dialogue between a user and a voice assistant that will be turned into \
speech for training a spoken assistant.
Give two integer scores from 1 (very poor) to 5 (excellent):
- coherence: the turns follow from each other, the assistant answers what was asked, \
nothing contradicts itself.
- naturalness: it sounds like real people talking: plausible requests, fluent replies, \
no machine artefacts.
Reply with JSON only: {"coherence": <1-5>, "naturalness": <1-5>, "reason": "<one short \
sentence>"}."""


class JudgeScores(BaseModel):
    coherence: int = Field(..., ge=1, le=5)
    naturalness: int = Field(..., ge=1, le=5)
    reason: str = ""


class JudgeConfig(BaseModel):
    """LLM-as-judge scoring of whole dialogues."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    llm: LLMConfig = Field(..., description="the judge model")
    min_coherence: int = Field(3, ge=1, le=5, description="lower scores are rejected")
    min_naturalness: int = Field(3, ge=1, le=5, description="lower scores are rejected")


def judge_prompt_version() -> str:
    blob = "\x1f".join((JUDGE_REVISION, JUDGE_PROMPT))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def judge_request(key: str, turns: Sequence[Mapping[str, Any]], system: str | None = None,
                  language: str | None = None) -> ChatRequest:
    lines = [f"{t['role'].upper()}: {t['text']}" for t in turns]
    head = []
    if system:
        head.append(f"(system prompt of the assistant: {system})")
    if language:
        head.append(f"(language: {language})")
    body = "\n".join([*head, *lines])
    return ChatRequest(key=key, messages=[
        {"role": "system", "content": JUDGE_PROMPT},
        {"role": "user", "content": f"Rate this dialogue:\n\n{body}"}],
        schema=JudgeScores, prompt_version=judge_prompt_version())


def judge_verdict(res: ChatResult, cfg: JudgeConfig
                  ) -> tuple[dict[str, Any] | None, str | None, str]:
    """(the ``judge`` record, reject reason or None, detail) of one judge answer."""
    if not res.ok or not isinstance(res.parsed, JudgeScores):
        return None, res.reason or "llm_error", res.detail or ""
    s = res.parsed
    record = {"coherence": s.coherence, "naturalness": s.naturalness, "reason": s.reason,
              "model": cfg.llm.model, "prompt_version": judge_prompt_version()}
    low = []
    if s.coherence < cfg.min_coherence:
        low.append(f"coherence {s.coherence} < {cfg.min_coherence}")
    if s.naturalness < cfg.min_naturalness:
        low.append(f"naturalness {s.naturalness} < {cfg.min_naturalness}")
    if low:
        return record, "qc_judge", "; ".join(low) + (f" ({s.reason})" if s.reason else "")
    return record, None, ""


def judge_transient(res: ChatResult) -> bool:
    """Whether a judge answer that is no verdict is a failure of the service (transient
    reject) rather than of the dialogue."""
    return not res.ok and bool(getattr(res, "transient", False))


def judge_column(record: dict[str, Any] | None) -> str | None:
    return None if record is None else json.dumps(record, sort_keys=True)
