"""Content QC of dialogue text, before any audio is made.

:func:`qc_turn` checks one turn and :func:`qc_dialogue` a whole dialogue (role
alternation first, then every turn). Each failure is a reject reason:

* ``qc_alternation`` -- turns are not user/assistant alternating, starting with the user.
* ``qc_length`` -- a turn is shorter than ``min_chars`` or longer than ``max_chars``
  (characters of the stripped text).
* ``qc_blocklist`` -- a blocklisted word or phrase occurs (case, punctuation and
  apostrophes ignored, on word boundaries).
* ``qc_refusal`` -- an assistant turn matches a refusal pattern ("As an AI language
  model ...", "I'm sorry, but I can't ...", configurable); matched like the blocklist.
  Without a role (:func:`qc_turn` called without ``role``) every turn is checked.
* ``qc_repetition`` -- degenerate text: the share of word 3-grams that repeat an earlier
  one is above ``max_repeat_ratio`` (over at least ``min_repeat_trigrams`` 3-grams), a
  word or phrase is repeated back to back more than ``max_repeat_run`` times, or a
  sentence occurs more than ``max_sentence_repeats`` times.
* ``qc_pii`` -- an e-mail address, phone number or card-like number (13-19 digits that
  pass the Luhn check) with ``pii: reject``; with ``pii: mask`` (default) it is replaced
  by a speakable placeholder and the turn is kept; ``keep`` leaves it.
* ``qc_language`` -- offline text language ID (lingua, as the ``annotate`` stage uses):
  with ``languages`` set, a turn whose detected language is not allowed (the dialogue's
  declared language when given, else any of ``languages``) with confidence at least
  ``min_language_prob`` is rejected. Turns with fewer than ``lid_min_letters`` letters
  are not checked, and a low-confidence guess never rejects (lingua is unreliable on
  short text). Off when ``languages`` is None (no detector is loaded).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from speechmill.stages.text_signals import max_repeat_run
from speechmill.synth.text.turns import alternation_error

#: reject reasons, in the order the checks run
REASONS = (
    "qc_alternation",
    "qc_length",
    "qc_blocklist",
    "qc_refusal",
    "qc_repetition",
    "qc_pii",
    "qc_language",
)

DEFAULT_REFUSALS: tuple[str, ...] = (
    "as an ai language model",
    "as an ai model",
    "as a language model",
    "as an artificial intelligence",
    "i'm an ai and",
    "i'm sorry, but i can't",
    "i'm sorry, but i cannot",
    "i am sorry, but i cannot",
    "i'm sorry, i can't help",
    "i cannot fulfill",
    "i can't fulfill",
    "i can't assist with",
    "i cannot assist with",
    "i'm unable to help with",
    "i am unable to help with",
    "i'm not able to provide",
    "i am not able to provide",
    "i must decline",
)


class TextQCConfig(BaseModel):
    """Content QC of dialogue text (text only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    languages: list[str] | None = Field(
        None, description="allowed ISO 639-1 languages (None: no language check)")
    min_language_prob: float = Field(
        0.5, ge=0.0, le=1.0,
        description="a wrong language rejects only when lingua is at least this confident")
    lid_candidates: list[str] | None = Field(
        None, description="languages lingua chooses from (None: all; >= 2 codes)")
    lid_min_letters: int = Field(
        12, ge=0, description="turns with fewer letters skip the language check")
    min_chars: int = Field(2, ge=0, description="per turn")
    max_chars: int = Field(2000, ge=1, description="per turn")
    max_repeat_ratio: float = Field(
        0.35, ge=0.0, le=1.0, description="share of word 3-grams repeating an earlier one")
    min_repeat_trigrams: int = Field(8, ge=1)
    max_repeat_run: int = Field(
        4, ge=1, description="back-to-back repetitions of one word/phrase allowed")
    max_sentence_repeats: int = Field(
        2, ge=1, description="times one sentence (of 4+ words) may occur in a turn")
    refusal_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSALS))
    pii: Literal["reject", "mask", "keep"] = "mask"
    pii_masks: dict[str, str] = Field(
        default_factory=lambda: {"email": "an email address", "phone": "a phone number",
                                 "card": "a card number"},
        description="speakable replacement per PII kind (email, phone, card)")
    blocklist: list[str] = Field(default_factory=list)


# -- normalisation -----------------------------------------------------------------

_APOSTROPHES = "'\u2019\u02bc`\u00b4"


def _norm(text: str) -> str:
    """NFKC, case-folded, apostrophes dropped, other punctuation -> space, collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    out = []
    for ch in text:
        if ch in _APOSTROPHES:
            continue
        out.append(ch if unicodedata.category(ch)[0] in "LMN" else " ")
    return " ".join("".join(out).split())


def _find_phrase(norm_text: str, phrases: Sequence[str]) -> str | None:
    hay = f" {norm_text} "
    for p in phrases:
        n = _norm(p)
        if n and f" {n} " in hay:
            return p
    return None


# -- repetition --------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")


def repetition_problem(text: str, cfg: TextQCConfig) -> str | None:
    """Why ``text`` looks degenerate (None when it does not)."""
    tokens = _norm(text).split()
    trigrams = [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]
    if len(trigrams) >= cfg.min_repeat_trigrams:
        ratio = 1.0 - len(set(trigrams)) / len(trigrams)
        if ratio > cfg.max_repeat_ratio:
            return f"repeated 3-gram ratio {ratio:.2f} > {cfg.max_repeat_ratio}"
    run = max_repeat_run(tokens)
    if run > cfg.max_repeat_run:
        return f"a word or phrase repeated {run} times in a row (> {cfg.max_repeat_run})"
    sentences = [_norm(s) for s in _SENTENCE_END.split(text.strip())]
    counts = Counter(s for s in sentences if len(s.split()) >= 4)
    if counts:
        sent, k = counts.most_common(1)[0]
        if k > cfg.max_sentence_repeats:
            return f"sentence {sent[:60]!r} occurs {k} times (> {cfg.max_sentence_repeats})"
    return None


# -- personal data -----------------------------------------------------------------

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
#: 13-19 digits, optionally grouped by single spaces or dashes
_CARD = re.compile(r"(?<![\d.,])\d(?:[ -]?\d){12,18}(?![\d.,]\d)")
#: international (+CC ...) or grouped (555-123-4567, (030) 1234 5678) phone numbers
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d{2,5}(?:[ .-]\d{2,8}){1,4}(?![\w.]\w)"
    r"|(?<![\w+])\+\d{8,15}\b"
)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _is_phone(m: str) -> bool:
    digits = re.sub(r"\D", "", m)
    if m.lstrip().startswith("+"):
        return 8 <= len(digits) <= 15
    # grouped digits without a country code: 9-12 digits (years, dates, prices and
    # thousands separators have fewer or use other separators)
    return 9 <= len(digits) <= 12 and not re.fullmatch(r"\d{1,3}(?:[ ,.]\d{3})+", m)


def find_pii(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of the e-mail addresses, card-like numbers and phone numbers."""
    found: list[tuple[str, int, int]] = []
    taken = [False] * len(text)

    def add(kind: str, s: int, e: int) -> None:
        if any(taken[s:e]):
            return
        found.append((kind, s, e))
        for i in range(s, e):
            taken[i] = True

    for m in _EMAIL.finditer(text):
        add("email", m.start(), m.end())
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            add("card", m.start(), m.end())
    for m in _PHONE.finditer(text):
        if _is_phone(m.group()):
            add("phone", m.start(), m.end())
    return sorted(found, key=lambda f: f[1])


def mask_pii(text: str, found: Sequence[tuple[str, int, int]],
             masks: Mapping[str, str]) -> str:
    out, pos = [], 0
    for kind, s, e in found:
        out.append(text[pos:s])
        out.append(masks.get(kind, kind))
        pos = e
    out.append(text[pos:])
    return "".join(out)


# -- language ----------------------------------------------------------------------

def _letters(text: str) -> int:
    return sum(1 for c in text if unicodedata.category(c).startswith("L"))


def language_problem(text: str, cfg: TextQCConfig, allowed: Sequence[str]) -> str | None:
    if _letters(text) < cfg.lid_min_letters:
        return None
    from speechmill.stages.text_signals import text_language

    cands = tuple(cfg.lid_candidates) if cfg.lid_candidates else None
    lang, prob = text_language(text, cands)
    if lang is None or lang in allowed or prob < cfg.min_language_prob:
        return None
    return f"detected {lang} (p={prob:.2f}), expected {'/'.join(allowed)}"


# -- public API --------------------------------------------------------------------

def _allowed(cfg: TextQCConfig, language: str | None) -> list[str] | None:
    if not cfg.languages:
        return None
    return [language] if language else list(cfg.languages)


def qc_turn(text: str, cfg: TextQCConfig, language: str | None,
            role: str | None = None) -> tuple[str, str | None, str]:
    """Check one turn: (text, with PII masked when ``pii: mask``; reject reason or None;
    detail). ``language`` is the dialogue's declared language (None: any of
    ``cfg.languages``); ``role`` limits the refusal check to assistant turns."""
    stripped = text.strip()
    n = len(stripped)
    if n < cfg.min_chars:
        return text, "qc_length", f"{n} characters < min_chars {cfg.min_chars}"
    if n > cfg.max_chars:
        return text, "qc_length", f"{n} characters > max_chars {cfg.max_chars}"
    norm = _norm(stripped)
    hit = _find_phrase(norm, cfg.blocklist)
    if hit is not None:
        return text, "qc_blocklist", f"contains blocklisted {hit!r}"
    if role in (None, "assistant"):
        hit = _find_phrase(norm, cfg.refusal_patterns)
        if hit is not None:
            return text, "qc_refusal", f"matches refusal pattern {hit!r}"
    problem = repetition_problem(stripped, cfg)
    if problem is not None:
        return text, "qc_repetition", problem
    if cfg.pii != "keep":
        found = find_pii(text)
        if found:
            if cfg.pii == "reject":
                kinds = sorted({k for k, _, _ in found})
                return text, "qc_pii", f"contains {', '.join(kinds)}"
            text = mask_pii(text, found, cfg.pii_masks)
    allowed = _allowed(cfg, language)
    if allowed is not None:
        problem = language_problem(text, cfg, allowed)
        if problem is not None:
            return text, "qc_language", problem
    return text, None, ""


def qc_dialogue(turns: list[dict[str, Any]], cfg: TextQCConfig,
                language: str | None) -> tuple[list[dict[str, Any]], str | None, str]:
    """Check a dialogue (``{"role", "text", ...}`` turns in order): (turns, with PII
    masked; the first reject reason or None; detail naming the turn)."""
    err = alternation_error(turns)
    if err is not None:
        return turns, "qc_alternation", err
    if language and cfg.languages and language not in cfg.languages:
        return turns, "qc_language", (
            f"declared language {language!r} not in languages {cfg.languages}")
    out: list[dict[str, Any]] = []
    for i, t in enumerate(turns):
        text, reason, detail = qc_turn(str(t.get("text") or ""), cfg,
                                       t.get("language") or language, role=t.get("role"))
        if reason is not None:
            return turns, reason, f"turn {i} ({t.get('role')}): {detail}"
        out.append({**t, "text": text} if text != t.get("text") else dict(t))
    return out, None, ""
