"""Transcript signals: normalisation, speaking rate, text language and hallucination.

Pure functions over a transcript (the ``annotate`` stage and the synthesis text QC); none
of them touches files or pipeline state. lingua is imported lazily, and its detectors are
built once per process and shared by all threads.

* :func:`speaking_rate` -- characters and words per second.
* :func:`text_language` -- offline text language identification with lingua.
* :func:`hallucination_signals` -- repetition, compression ratio and well-known Whisper
  hallucination phrases.
* :func:`max_repeat_run` -- the longest run of one phrase repeated back to back.
"""

from __future__ import annotations

import math
import threading
import unicodedata
import zlib
from collections.abc import Sequence
from typing import Any

__all__ = [
    "KNOWN_HALLUCINATIONS",
    "hallucination_signals",
    "max_repeat_run",
    "normalize_text",
    "speaking_rate",
    "text_compression_ratio",
    "text_language",
]


# ======================================================================================
# Text: normalisation, speaking rate
# ======================================================================================

_APOSTROPHES = "'\u2019\u02bc`\u00b4"


def _is_cjk(ch: str) -> bool:
    """Han ideographs and kana: scripts written without spaces between words."""
    o = ord(ch)
    return (
        0x3040 <= o <= 0x30FF  # hiragana, katakana
        or 0x31F0 <= o <= 0x31FF  # katakana extensions
        or 0x3400 <= o <= 0x4DBF  # CJK extension A
        or 0x4E00 <= o <= 0x9FFF  # CJK unified ideographs
        or 0xF900 <= o <= 0xFAFF  # compatibility ideographs
        or 0xFF66 <= o <= 0xFF9F  # half-width katakana
        or 0x20000 <= o <= 0x3134F  # extensions B-G
    )


def _is_wordchar(ch: str) -> bool:
    """Letters (with their combining marks) and digits; not spaces, punctuation, symbols."""
    return unicodedata.category(ch)[0] in "LMN"


def normalize_text(text: str) -> str:
    """NFKC, case-folded, apostrophes removed, other punctuation/symbols -> space,
    whitespace collapsed. Used to compare transcripts with the known phrases."""
    text = unicodedata.normalize("NFKC", text).casefold()
    out = []
    for ch in text:
        if ch in _APOSTROPHES:
            continue
        out.append(ch if _is_wordchar(ch) else " ")
    return " ".join("".join(out).split())


def _tokens(text: str) -> list[str]:
    """Words of normalised text; CJK characters (written without spaces) are one each."""
    tokens: list[str] = []
    for word in normalize_text(text).split():
        if not any(_is_cjk(c) for c in word):
            tokens.append(word)
            continue
        buf = ""
        for c in word:
            if _is_cjk(c):
                if buf:
                    tokens.append(buf)
                    buf = ""
                tokens.append(c)
            else:
                buf += c
        if buf:
            tokens.append(buf)
    return tokens


def speaking_rate(text: str, duration: float) -> dict[str, float]:
    """``chars_per_s`` and ``words_per_s`` of a transcript spoken in ``duration`` seconds.

    Characters are letters, combining marks and digits (no spaces, punctuation or
    symbols). Words are whitespace-separated tokens, except that each CJK character
    (Han, hiragana, katakana -- scripts written without spaces) counts as one word.
    A non-positive or non-finite duration gives NaN rates.
    """
    if not (duration > 0 and math.isfinite(duration)):
        return {"chars_per_s": math.nan, "words_per_s": math.nan}
    norm = unicodedata.normalize("NFKC", text)
    chars = sum(1 for c in norm if _is_wordchar(c))
    words = len(_tokens(text))
    return {"chars_per_s": chars / duration, "words_per_s": words / duration}


# ======================================================================================
# Text: language identification
# ======================================================================================

_lingua_lock = threading.Lock()
_detectors: dict[tuple[tuple[str, ...] | None, bool], Any] = {}


def _detector(languages: tuple[str, ...] | None, low_accuracy: bool) -> Any:
    key = (tuple(sorted({c.lower() for c in languages})) if languages else None, low_accuracy)
    det = _detectors.get(key)
    if det is not None:
        return det
    with _lingua_lock:
        det = _detectors.get(key)
        if det is None:
            from lingua import IsoCode639_1, LanguageDetectorBuilder

            if key[0] is None:
                builder = LanguageDetectorBuilder.from_all_languages()
            else:
                if len(key[0]) < 2:
                    raise ValueError("text_language needs at least two candidate languages")
                try:
                    codes = [IsoCode639_1.from_str(c) for c in key[0]]
                except ValueError as exc:
                    raise ValueError(f"unknown ISO 639-1 code in {languages!r}") from exc
                builder = LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
            if low_accuracy:
                builder = builder.with_low_accuracy_mode()
            det = builder.build()
            _detectors[key] = det
        return det


def text_language(
    text: str,
    languages: tuple[str, ...] | None = None,
    *,
    min_chars: int = 3,
    low_accuracy: bool = False,
) -> tuple[str | None, float]:
    """Language of ``text`` as (ISO 639-1 code, confidence in [0, 1]), offline (lingua).

    ``languages`` restricts the candidates to those ISO 639-1 codes (at least two); by
    default all of lingua's 75 languages compete. A detector is built once per
    (languages, low_accuracy) and cached; its n-gram models load lazily on first use
    (all languages, high accuracy: ~6 s and ~0.9 GB once per process; a small subset or
    ``low_accuracy=True`` is much lighter, but low accuracy is poor on short text).
    Text with fewer than ``min_chars`` letters, or that lingua cannot score, gives
    ``(None, 0.0)``.
    """
    letters = sum(1 for c in text if unicodedata.category(c).startswith("L"))
    if letters < min_chars:
        return None, 0.0
    values = _detector(languages, low_accuracy).compute_language_confidence_values(text)
    if not values or values[0].value <= 0.0:
        return None, 0.0
    best = values[0]
    return best.language.iso_code_639_1.name.lower(), float(best.value)


# ======================================================================================
# Text: hallucination signals
# ======================================================================================

#: Well-known Whisper hallucinations (subtitle credits and video outros learnt from web
#: subtitles). "Anywhere" phrases are credits that do not occur in real speech and count
#: wherever they appear; "whole" phrases can be genuine speech, so they count only when
#: they make up most of the transcript (see :func:`hallucination_signals`).
KNOWN_HALLUCINATIONS: dict[str, tuple[str, ...]] = {
    "anywhere": (
        "amara.org",
        "subtitles by the amara.org community",
        "subtitles by",
        "subtitled by",
        "transcribed by",
        "transcription by castingwords",
        "captioning by",
        "captions by",
        "subtítulos realizados por la comunidad de amara.org",
        "subtítulos por la comunidad de amara.org",
        "sous-titres réalisés par la communauté d'amara.org",
        "sous-titrage société radio-canada",
        "sous-titrage st' 501",
        "untertitel der amara.org-community",
        "untertitel im auftrag des zdf",
        "untertitelung des zdf",
        "untertitelung aufgrund der amara.org-community",
        "sottotitoli creati dalla comunità amara.org",
        "sottotitoli a cura di qtss",
        "legendas pela comunidade amara.org",
        "napisy stworzone przez społeczność amara.org",
        "ondertiteling door de amara.org gemeenschap",
        "субтитры создавались сообществом amara.org",
        "субтитры сделал dimatorzok",
        "редактор субтитров",
        "字幕由amara.org社区提供",
        "字幕志愿者",
        "请不吝点赞 订阅 转发 打赏支持明镜与点点栏目",
    ),
    "whole": (
        "thanks for watching",
        "thank you for watching",
        "thank you so much for watching",
        "thank you very much for watching",
        "thanks for watching and see you next time",
        "please subscribe",
        "please subscribe to my channel",
        "like and subscribe",
        "dont forget to like and subscribe",
        "subscribe to my channel",
        "see you in the next video",
        "see you next time",
        "i'll see you in the next video",
        "gracias por ver",
        "gracias por ver el video",
        "merci d'avoir regardé",
        "merci d'avoir regardé cette vidéo",
        "danke fürs zuschauen",
        "vielen dank fürs zuschauen",
        "grazie per la visione",
        "obrigado por assistir",
        "продолжение следует",
        "спасибо за просмотр",
        "ご視聴ありがとうございました",
        "시청해주셔서 감사합니다",
        "谢谢观看",
        "感谢观看",
    ),
}

_COMPRESSION_LIMIT = 2.4  # Whisper's default compression_ratio_threshold
_NO_SPEECH_LIMIT = 0.6  # Whisper's default no_speech_threshold
_REPEAT_LIMIT = 0.5
_MIN_TRIGRAMS = 4
_WHOLE_COVERAGE = 0.6  # a "whole" phrase must cover this share of the transcript's chars

_phrase_cache: tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] | None = None


def _phrases() -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """(anywhere, whole) as (original, normalised) pairs, longest first."""
    global _phrase_cache
    if _phrase_cache is None:
        def prep(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
            pairs = {(p, normalize_text(p)) for p in items}
            return tuple(sorted(pairs, key=lambda pn: (-len(pn[1]), pn[1])))

        _phrase_cache = (prep(KNOWN_HALLUCINATIONS["anywhere"]), prep(KNOWN_HALLUCINATIONS["whole"]))
    return _phrase_cache


def _contains(haystack: str, needle: str) -> bool:
    """``needle`` occurs in ``haystack`` on word boundaries (both normalised).

    Phrases of space-less scripts (CJK) match as plain substrings.
    """
    if not needle:
        return False
    if any(_is_cjk(c) for c in needle):
        return needle.replace(" ", "") in haystack.replace(" ", "")
    return f" {needle} " in f" {haystack} "


def _known_phrase(norm: str) -> str | None:
    if not norm:
        return None
    anywhere, whole = _phrases()
    for original, phrase in anywhere:
        if _contains(norm, phrase):
            return original
    total = len(norm.replace(" ", ""))
    # outro phrases count when together they make up most of the transcript
    # ("thank you very much for watching and i'll see you in the next video")
    covered = [False] * len(norm)
    first: str | None = None
    for original, phrase in whole:
        if not _contains(norm, phrase):
            continue
        start = f" {norm} ".find(f" {phrase} ") if not any(_is_cjk(c) for c in phrase) else -1
        if start < 0:
            if len(phrase.replace(" ", "")) >= _WHOLE_COVERAGE * total:
                return original
            continue
        for i in range(start, min(start + len(phrase), len(norm))):
            covered[i] = True
        first = first or original
    n_cov = sum(1 for i, c in enumerate(covered) if c and norm[i] != " ")
    if first is not None and n_cov >= _WHOLE_COVERAGE * total:
        return first
    return None


def max_repeat_run(tokens: Sequence[str], max_phrase: int = 10) -> int:
    """Longest run of one word or phrase repeated back to back (1 if nothing repeats)."""
    if not tokens:
        return 0
    best = 1
    n_tok = len(tokens)
    for size in range(1, min(max_phrase, n_tok // 2) + 1):
        # tokens[i] == tokens[i + size] for a stretch of m positions means the phrase of
        # length ``size`` starting there repeats 1 + m // size times
        run = 0
        for i in range(n_tok - size):
            if tokens[i] == tokens[i + size]:
                run += 1
                best = max(best, 1 + run // size)
            else:
                run = 0
    return best


def text_compression_ratio(text: str) -> float:
    """Whisper's gzip compression ratio: UTF-8 bytes / zlib-compressed bytes."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


def hallucination_signals(
    text: str,
    compression_ratio: float | None = None,
    no_speech_prob: float | None = None,
) -> dict[str, Any]:
    """Signals that an ASR transcript (one segment) is a hallucination.

    * ``repeat_ngram_ratio``: share of word 3-grams that repeat an earlier 3-gram
      (0 with fewer than two 3-grams).
    * ``max_repeat_run``: the most back-to-back repetitions of one word or phrase of up
      to 10 words ("the the the" -> 3; 0 for empty text).
    * ``known_phrase``: the matching entry of :data:`KNOWN_HALLUCINATIONS` or None;
      matching is on normalised text (:func:`normalize_text`: case, punctuation and
      apostrophes ignored) and on word boundaries. "Whole" phrases must cover >= 60 %
      of the transcript's characters ("Thanks for watching!" counts, a long sentence
      ending with "thanks for watching" does not).
    * ``text_compression_ratio``: Whisper's zlib ratio computed on ``text``.
    * ``hallucination``: any of: a known phrase; compression ratio > 2.4 (the given
      ``compression_ratio`` if not None, as the decoder reported it, else the computed
      one); ``repeat_ngram_ratio`` > 0.5 over >= 4 trigrams; ``no_speech_prob`` > 0.6
      with non-empty text.
    * ``reasons``: which of those fired, in that order, as ``known_phrase``,
      ``compression_ratio``, ``repeated_ngrams``, ``no_speech`` (empty when none).
    """
    norm = normalize_text(text)
    tokens = _tokens(text)
    trigrams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    repeat_ratio = 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    phrase = _known_phrase(norm)
    computed = text_compression_ratio(text)
    ratio = computed if compression_ratio is None else float(compression_ratio)
    reasons: list[str] = []
    if phrase is not None:
        reasons.append("known_phrase")
    if ratio > _COMPRESSION_LIMIT:
        reasons.append("compression_ratio")
    if repeat_ratio > _REPEAT_LIMIT and len(trigrams) >= _MIN_TRIGRAMS:
        reasons.append("repeated_ngrams")
    if no_speech_prob is not None and no_speech_prob > _NO_SPEECH_LIMIT and norm:
        reasons.append("no_speech")
    return {
        "repeat_ngram_ratio": float(repeat_ratio),
        "max_repeat_run": int(max_repeat_run(tokens)),
        "known_phrase": phrase,
        "text_compression_ratio": float(computed),
        "hallucination": bool(reasons),
        "reasons": reasons,
    }

