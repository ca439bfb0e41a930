"""Rules that make text speakable: deterministic, offline, no LLM.

:func:`unspeakable` tells text a TTS cannot sensibly say (code, tables, math) and
:func:`make_speakable` rewrites the rest, in this order: markdown (headings, emphasis,
lists, links, images, quotes, rules, HTML tags) and URLs are stripped, emoji removed,
then dates, times, currencies, percentages, units with their numbers, ordinals, ranges,
common abbreviations, years and the remaining numbers are spelt out in the language's
words (``num2words`` for every number; the word lists of
:mod:`speechmill.synth.text.speakable_lang` for units, abbreviations and months: English,
German and French; other ``num2words`` languages get their numbers spelt out only),
symbols become words, parentheses become commas. :func:`sentences` splits the result at
sentence boundaries (and long sentences at clause boundaries) for the TTS.

Conventions: English dates written with slashes are month/day/year, German and French
ones day/month/year; a four-digit number from 1100 to 2099 is read as a year inside a
date or after a word such as "in", "since" ("im", "seit"; "en", "depuis"); English times
read "ten thirty", "ten oh five", "ten o'clock", German "zehn Uhr dreißig", French "dix
heures trente".
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation

from speechmill.synth.text.speakable_lang import LangData, lang_data

#: bumped whenever a rule changes what text comes out (recorded as provenance)
RULES_VERSION = "1"

# -- what cannot be spoken -------------------------------------------------------------

_FENCE = re.compile(r"^\s*(```|~~~)", re.M)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_CODE_CHARS = re.compile(r"[(){};=\[\]<>]|->|::|\w\.\w+\(")
_CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import |#include|function |var |let |const |"
    r"public |private |return |for \(|if \(|while \(|SELECT |INSERT |<\?php|<html|</)"
    r"|[;{}]\s*$", re.M)
_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)+\|?\s*$", re.M)
_TABLE_ROW = re.compile(r"^\s*\|.*\|.*\|\s*$", re.M)
_LATEX = re.compile(r"\$\$|\\\(|\\\[|\\(frac|sum|int|sqrt|begin|end|cdot|times|alpha|beta|"
                    r"pi|theta|lambda|sigma|infty|partial|mathbb|mathrm|left|right)\b"
                    r"|\$[^$\n]*[\\^_][^$\n]*\$")
_MATH_SYMBOLS = re.compile(r"[∑∫∂∇√∏∞∀∃∈∉⊂⊆∪∩]|\w\^\(?[\w-]")
_SUPERSCRIPT = re.compile(r"([^\W\d]+)[²³⁴⁵⁶⁷⁸⁹]")
_SQUARE_UNITS = {"m", "km", "cm", "mm", "ft", "mi", "in", "yd"}


def unspeakable(text: str) -> tuple[str, str] | None:
    """``(reason, detail)`` when ``text`` holds what a TTS cannot sensibly say:
    ``unspeakable_code`` (a fenced block, code-like inline code or two code lines),
    ``unspeakable_table`` (a markdown table) or ``unspeakable_math`` (LaTeX, exponents,
    calculus symbols); None otherwise."""
    if _FENCE.search(text):
        return "unspeakable_code", "a fenced code block"
    for m in _INLINE_CODE.finditer(text):
        if _CODE_CHARS.search(m.group(1)):
            return "unspeakable_code", f"inline code {m.group(0)[:60]!r}"
    code_lines = _CODE_LINE.findall(text)
    if len(code_lines) >= 2:
        return "unspeakable_code", f"{len(code_lines)} lines of code"
    if _TABLE_SEP.search(text) or len(_TABLE_ROW.findall(text)) >= 2:
        return "unspeakable_table", "a markdown table"
    m = _LATEX.search(text) or _MATH_SYMBOLS.search(text)
    if m:
        return "unspeakable_math", f"math notation {m.group(0)[:40]!r}"
    for m in _SUPERSCRIPT.finditer(text):
        if m.group(1) not in _SQUARE_UNITS:
            return "unspeakable_math", f"an exponent {m.group(0)[:40]!r}"
    return None


# -- markdown, URLs, emoji ---------------------------------------------------------------

_URL = re.compile(r"(?:https?://|ftp://|www\.)[^\s<>()\[\]]*[^\s<>()\[\].,;:!?'\"]", re.I)
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_REF_LINK = re.compile(r"\[([^\]]+)\]\[[^\]]*\]")
_HTML = re.compile(r"</?[a-zA-Z][^>\n]*>")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
_BULLET = re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)])\s+", re.M)
_QUOTE = re.compile(r"^\s*>\s?", re.M)
_RULE = re.compile(r"^\s*([-*_])(\s*\1){2,}\s*$", re.M)
_EMPH = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1|(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?!\w)"
                   r"|(?<![\w_])_(?=\S)([^_\n]+?)(?<=\S)_(?!\w)|~~(.+?)~~")
_EMOJI = re.compile(
    "[\U0001F000-\U0001FAFF\U00002600-\U000027BF\U00002B00-\U00002BFF\U0001F900-\U0001F9FF"
    "\U0000FE0E\U0000FE0F\U0000200D\U000020E3\U0001F1E6-\U0001F1FF\U000E0020-\U000E007F"
    "\U00002190-\U000021FF\U00002300-\U000023FF]")


def strip_markdown(text: str) -> str:
    """Markdown and HTML to plain sentences: list items and headings become sentences,
    links keep their text, images their alt text, emphasis its content."""
    text = text.replace("\r\n", "\n")
    text = _HTML.sub(" ", text)
    text = _IMAGE.sub(lambda m: m.group(1), text)
    text = _LINK.sub(lambda m: m.group(1), text)
    text = _REF_LINK.sub(lambda m: m.group(1), text)
    text = _RULE.sub("", text)
    text = _HEADING.sub(lambda m: _end_sentence(m.group(1)), text)
    text = _QUOTE.sub("", text)
    lines = text.split("\n")
    out = []
    for line in lines:
        if _BULLET.match(line):
            line = _end_sentence(_BULLET.sub("", line, count=1))
        out.append(line)
    text = "\n".join(out)
    for _ in range(2):  # nested emphasis
        text = _EMPH.sub(lambda m: next(g for g in m.groups()[1:] if g is not None), text)
    text = _INLINE_CODE.sub(lambda m: m.group(1), text)
    # paragraphs and lines: one flow of sentences
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return " ".join(_end_sentence(p) for p in paras if p)


def _end_sentence(s: str) -> str:
    s = s.strip()
    if s and s[-1] not in ".!?:;,…":
        s += "."
    return s


def strip_urls(text: str) -> str:
    return _URL.sub("", text)


_EMAIL = re.compile(r"(?<![\w.+-])([\w.+-]+)@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})\b")


def speak_emails(text: str, lang: LangData) -> str:
    """"ann.lee@example.com" -> "ann dot lee at example dot com"."""
    at, dot = {"de": ("at", "Punkt"), "fr": ("arobase", "point")}.get(lang.code, ("at", "dot"))

    def say(m: re.Match[str]) -> str:
        local = m.group(1).replace(".", f" {dot} ")
        return f"{local} {at} {m.group(2).replace('.', f' {dot} ')}"

    return _EMAIL.sub(say, text)


def strip_emoji(text: str) -> str:
    return _EMOJI.sub("", text)


# -- numbers -------------------------------------------------------------------------------

def _n2w(value: int | Decimal, lang: str, to: str = "cardinal") -> str:
    from num2words import num2words

    try:
        words = num2words(value, lang=lang, to=to)
    except NotImplementedError:
        words = num2words(value, lang=lang)
    return words.replace(",", "")  # "one thousand, two hundred" pauses where no one does


def cardinal(value: int | Decimal, lang: LangData, gender: str = "m") -> str:
    """``value`` in words; 1 agrees with a following noun in German and French."""
    w = _n2w(value, lang.code)
    if lang.code == "de":
        if w == "eins":
            return "eine" if gender == "f" else "ein"
        if w.endswith("eins") and isinstance(value, int):  # "hunderteins" stays
            return w
    if lang.code == "fr" and gender == "f" and (w == "un" or w.endswith(" et un")):
        return w[:-2] + "une"
    return w


def _parse_number(s: str, lang: LangData) -> Decimal | None:
    """A written number ("1,234.5" en; "1.234,5" de; "1 234,5" fr) as a Decimal."""
    s = s.replace("\u202f", " ").replace("\u00a0", " ").strip()
    if lang.decimal == ",":
        if re.fullmatch(r"\d{1,3}([. ]\d{3})+(,\d+)?", s):
            s = s.replace(".", "").replace(" ", "")
        elif re.fullmatch(r"\d+\.\d{1,2}", s) or re.fullmatch(r"\d+\.\d{4,}", s):
            pass  # an English-style decimal in German/French text
        s = s.replace(",", ".")
    else:
        s = s.replace(",", "").replace(" ", "")
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def number_words(s: str, lang: LangData, gender: str = "m") -> str:
    v = _parse_number(s, lang)
    if v is None:
        return s
    if v == v.to_integral_value() and "." not in s.replace(",", "." if lang.decimal == "," else ""):
        return cardinal(int(v), lang, gender)
    return _n2w(v, lang.code)


def _plural(v: Decimal | None, lang: LangData) -> bool:
    if v is None:
        return True
    if lang.code == "fr":
        return abs(v) >= 2
    return v != 1


# number as written: thousands groups (",", ".", space) and a decimal part
_NUM = r"\d{1,3}(?:[,.\u202f\u00a0 ]\d{3})+(?:[.,]\d+)?|\d+(?:[.,]\d+)?"


# -- the rewriting passes ------------------------------------------------------------------

def _sub(pattern: str, repl, text: str, flags: int = 0) -> str:  # type: ignore[no-untyped-def]
    return re.sub(pattern, repl, text, flags=flags)


def _year(y: int, lang: LangData) -> str:
    if 1100 <= y <= 2099 and lang.code in ("en",):
        return _n2w(y, lang.code, "year")
    return _n2w(y, lang.code, "year") if lang.code in ("de", "fr") else cardinal(y, lang)


def _day(d: int, lang: LangData, before: str = "") -> str:
    if lang.code == "en":
        return _n2w(d, "en", "ordinal")
    if lang.code == "de":
        w = _n2w(d, "de", "ordinal")
        # dative after "am", "vom", "zum", "bis zum", "seit dem"
        return w + "n" if before.lower() in ("am", "vom", "zum", "dem", "ab dem") else w
    if lang.code == "fr":
        return "premier" if d == 1 else cardinal(d, lang)
    return cardinal(d, lang)


def _date(d: int, m: int, y: int | None, lang: LangData, before: str = "") -> str | None:
    if not (1 <= m <= 12 and 1 <= d <= 31) or not lang.months:
        return None
    month = lang.months[m - 1]
    year = f" {_year(y, lang)}" if y is not None else ""
    if lang.code == "en":
        return f"{month} {_day(d, lang)}{',' if year else ''}{year}"
    return f"{_day(d, lang, before)} {month}{year}"


def _dates(text: str, lang: LangData) -> str:
    def prev_word(m: re.Match[str]) -> str:
        head = text[: m.start()].split()
        return head[-1] if head else ""

    def iso(m: re.Match[str]) -> str:
        got = _date(int(m.group(3)), int(m.group(2)), int(m.group(1)), lang, prev_word(m))
        return got or m.group(0)

    text = _sub(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b", iso, text)
    if not lang.months:
        return text
    if lang.code == "en":
        def mdy(m: re.Match[str]) -> str:
            y = m.group(3)
            if len(y) == 2:
                y = "20" + y
            return _date(int(m.group(2)), int(m.group(1)), int(y), lang) or m.group(0)

        text = _sub(r"\b(\d{1,2})/(\d{1,2})/(\d{4}|\d{2})\b", mdy, text)
    else:
        def dmy(m: re.Match[str]) -> str:
            y = m.group(3)
            got = _date(int(m.group(1)), int(m.group(2)), int(y) if y else None, lang,
                        prev_word(m))
            return got or m.group(0)

        sep = r"[./]" if lang.code == "fr" else r"\."
        text = _sub(rf"\b(\d{{1,2}}){sep}(\d{{1,2}}){sep}(\d{{4}})\b", dmy, text)
        if lang.code == "de":
            text = _sub(r"\b(\d{1,2})\.(\d{1,2})\.(?!\d)()", dmy, text)
    names = "|".join(sorted({*lang.months, *lang.month_abbr}, key=len, reverse=True))

    def month_of(name: str) -> int:
        low = name.lower().rstrip(".")
        for i, (full, ab) in enumerate(zip(lang.months, lang.month_abbr, strict=True)):
            if low in (full.lower(), ab.lower()):
                return i + 1
        return 0

    if lang.code == "en":  # "March 15, 2024", "Mar. 15th", "15 March 2024", "the 15th of March"
        def month_day(m: re.Match[str]) -> str:
            y = int(m.group(3)) if m.group(3) else None
            return _date(int(m.group(2)), month_of(m.group(1)), y, lang) or m.group(0)

        text = _sub(rf"\b({names})\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+(\d{{4}})\b)?",
                    month_day, text)

        def day_of_month(m: re.Match[str]) -> str:
            y = f", {_year(int(m.group(4)), lang)}" if m.group(4) else ""
            mo = month_of(m.group(2))
            if not mo:
                return m.group(0)
            the = "" if text[: m.start()].rstrip().lower().endswith("the") else "the "
            dot = "." if m.group(3) and m.group(2) in lang.months and not y else ""
            return f"{the}{_day(int(m.group(1)), lang)} of {lang.months[mo - 1]}{y}{dot}"

        text = _sub(rf"\b(\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?({names})\b(\.)?"
                    rf"(?:,?\s+(\d{{4}})\b)?", day_of_month, text)
    else:  # "15. März 2024", "1er mars", "15 mars 2024"
        def day_month(m: re.Match[str]) -> str:
            y = int(m.group(3)) if m.group(3) else None
            return _date(int(m.group(1)), month_of(m.group(2)), y, lang, prev_word(m)) \
                or m.group(0)

        dot = r"\.?" if lang.code == "de" else r"(?:er|re)?"
        text = _sub(rf"\b(\d{{1,2}}){dot}\s+({names})\b\.?(?:\s+(\d{{4}})\b)?", day_month, text,
                    re.I if lang.code == "fr" else 0)
    return text


def _hm(h: int, mi: int, lang: LangData) -> str:
    if lang.code == "en":  # 24-hour times are said the 12-hour way: "14:30" -> "two thirty p m"
        suffix = " p m" if 13 <= h <= 23 else (" a m" if h in (0, 24) else "")
        h12 = h - 12 if 13 <= h <= 23 else (12 if h in (0, 24) else h)
        hw = cardinal(h12, lang)
        if mi == 0:
            return f"{hw}{suffix}" if suffix else f"{hw} o'clock"
        mw = f"oh {cardinal(mi, lang)}" if mi < 10 else cardinal(mi, lang)
        return f"{hw} {mw}{suffix}"
    if lang.code == "de":
        hw = "ein" if h == 1 else cardinal(h, lang)
        return f"{hw} Uhr" + (f" {cardinal(mi, lang)}" if mi else "")
    if lang.code == "fr":
        hw = "une heure" if h == 1 else f"{cardinal(h, lang, 'f')} heures"
        return hw + (f" {cardinal(mi, lang)}" if mi else "")
    return f"{cardinal(h, lang)} {cardinal(mi, lang)}" if mi else cardinal(h, lang)


def _times(text: str, lang: LangData) -> str:
    ampm = r"\s*([ap])\.?\s?m\.?(?![a-z])"

    def en12(m: re.Match[str]) -> str:
        h, mi = int(m.group(1)), int(m.group(2) or 0)
        if not (1 <= h <= 12 and mi < 60):
            return m.group(0)
        hw = cardinal(h, lang)
        if mi:
            hw += f" oh {cardinal(mi, lang)}" if mi < 10 else f" {cardinal(mi, lang)}"
        # "at 7 a.m. With ..." : the abbreviation's period also ended the sentence
        end = "." if m.group(0).endswith(".") and re.match(r"\s+[A-Z]|\s*$",
                                                          m.string[m.end():]) else ""
        return f"{hw} {m.group(3).lower()} m{end}"

    def hm(m: re.Match[str]) -> str:
        h, mi = int(m.group(1)), int((m.groups() + (None,))[1] or 0)
        if not (0 <= h <= 24 and 0 <= mi < 60):
            return m.group(0)
        return _hm(h, mi, lang)

    if lang.code == "en":
        text = _sub(rf"\b(\d{{1,2}})(?::(\d{{2}}))?{ampm}", en12, text, re.I)
        text = _sub(r"\b(\d{1,2}):(\d{2})\b(?!:)", hm, text)
    elif lang.code == "de":
        text = _sub(r"\b(\d{1,2})[:.](\d{2})\s*Uhr\b", hm, text)
        text = _sub(r"\b(\d{1,2})\s*Uhr\b", hm, text)
        text = _sub(r"\b(\d{1,2}):(\d{2})\b(?!:)", hm, text)
    elif lang.code == "fr":
        text = _sub(r"\b(\d{1,2})\s?h\s?(\d{2})?\b", hm, text)
        text = _sub(r"\b(\d{1,2}):(\d{2})\b(?!:)", hm, text)
    return text


_CUR_SYMBOLS = {"$": "USD", "€": "EUR", "£": "GBP", "¥": "JPY", "₹": "INR"}
_CUR_CODES = ("USD", "EUR", "GBP", "JPY", "CHF", "INR", "CAD", "AUD")


def _currency_forms(code: str, lang: LangData) -> tuple[tuple[str, str], tuple[str, str] | None]:
    if code in lang.currencies:
        return lang.currencies[code]
    from num2words import CONVERTER_CLASSES

    conv = CONVERTER_CLASSES.get(lang.code)
    forms = getattr(conv, "CURRENCY_FORMS", {}).get(code) if conv else None
    if forms:
        return forms[0], forms[1]
    if code in ("CAD", "AUD") and "USD" in lang.currencies:
        return lang.currencies["USD"]
    return (code, code), None


def money(amount: str, code: str, lang: LangData, scale: str | None = None) -> str:
    unit, sub = _currency_forms(code, lang)
    v = _parse_number(amount, lang)
    if v is None:
        return f"{amount} {unit[1]}"
    if scale:
        scale = dict(lang.abbreviations).get(scale, scale)
        return f"{number_words(amount, lang)} {scale} {unit[1]}"
    whole = int(v)
    cents = int(((v - whole) * 100).to_integral_value())
    gender = "f" if (lang.code == "fr" and unit[0] in ("livre",)) else "m"
    words = f"{cardinal(whole, lang, gender)} {unit[0] if not _plural(Decimal(whole), lang) else unit[1]}"
    if cents and sub is not None:
        words += f" {lang.and_word} {cardinal(cents, lang)} " + (
            sub[0] if not _plural(Decimal(cents), lang) else sub[1])
    elif cents:
        words = f"{_n2w(v, lang.code)} {unit[1]}"
    return words


def _currencies(text: str, lang: LangData) -> str:
    scales = "|".join(re.escape(s) for s in sorted(lang.scales, key=len, reverse=True)) or "(?!x)x"
    syms = "".join(re.escape(s) for s in _CUR_SYMBOLS)
    codes = "|".join(_CUR_CODES)

    def before(m: re.Match[str]) -> str:
        code = _CUR_SYMBOLS.get(m.group(1)) or m.group(1)
        sign = "minus " if m.group(0).startswith("-") else ""
        return sign + money(m.group(2), code, lang, m.group(3))

    def after(m: re.Match[str]) -> str:
        code = _CUR_SYMBOLS.get(m.group(3)) or m.group(3)
        return money(m.group(1), code, lang, m.group(2))

    text = _sub(rf"-?([{syms}]|\b(?:{codes})\b)\s?({_NUM})(?:\s+({scales})(?!\w))?", before, text)
    text = _sub(rf"({_NUM})(?:\s+({scales})(?!\w))?\s?([{syms}]|\b(?:{codes})\b)", after, text)
    return text


def _percent(text: str, lang: LangData) -> str:
    return _sub(rf"(-?)({_NUM})\s?%",
                lambda m: ("minus " if m.group(1) else "") + f"{number_words(m.group(2), lang)} "
                f"{lang.percent}", text)


def _units(text: str, lang: LangData) -> str:
    if not lang.units:
        return text
    names = sorted(lang.units, key=len, reverse=True)
    alt = "|".join(re.escape(u) for u in names)

    def unit(m: re.Match[str]) -> str:
        sing, plur, gender = lang.units[m.group(2)]
        v = _parse_number(m.group(1), lang)
        before = m.string[: m.start()].rstrip().rsplit(" ", 1)[-1].lower()
        # "a 40 min drive" -> "a forty minute drive"
        plural = _plural(v, lang) and not (lang.code == "en" and before in ("a", "an"))
        return f"{number_words(m.group(1), lang, gender)} {plur if plural else sing}"

    # a degree sign alone: "25°" -> "twenty-five degrees"
    text = _sub(rf"({_NUM})\s?({alt})(?![\w/²³])", unit, text)
    return _sub(rf"({_NUM})\s?°(?![CF])",
                lambda m: f"{number_words(m.group(1), lang)} "
                f"{lang.degrees[1] if _plural(_parse_number(m.group(1), lang), lang) else lang.degrees[0]}",
                text)


def _ordinals(text: str, lang: LangData) -> str:
    if lang.code == "en":
        return _sub(r"\b(\d+)(?:st|nd|rd|th)\b", lambda m: _n2w(int(m.group(1)), "en",
                                                               "ordinal"), text)
    if lang.code == "fr":
        return _sub(r"\b(\d+)(?:er|re|ère|e|ème|eme)\b",
                    lambda m: "premier" if m.group(1) == "1" else _n2w(int(m.group(1)), "fr",
                                                                      "ordinal"), text)
    return text


def _ranges(text: str, lang: LangData) -> str:
    """"10-20" -> "10 to 20": the numbers stay digits for the passes after (units,
    currencies, times read them)."""
    if not lang.range_word or lang.range_word == "-":
        return text
    text = _sub(r"\b(\d{1,2}(?::\d{2})?(?:\s?[ap]\.?m\.?)?)\s?[-–]\s?(\d{1,2}:\d{2})",
                lambda m: f"{m.group(1)} {lang.range_word} {m.group(2)}", text, re.I)
    return _sub(rf"(?<![\w.,:/-])({_NUM})\s?[-–—]\s?([$€£]?)({_NUM})(?![\w.,:/-]\d)",
                lambda m: f"{m.group(1)} {lang.range_word} {m.group(2)}{m.group(3)}", text)


_LIST_ENDS = ("etc.", "usw.", "u.s.w.")


def _abbreviations(text: str, lang: LangData) -> str:
    for ab in lang.number_abbr:
        text = _sub(rf"(?<!\w){re.escape(ab)}\s*(?=\d)", f"{lang.number_word} ", text)
    titles = set(lang.titles)
    for ab, full in sorted(lang.abbreviations, key=lambda a: -len(a[0])):
        lead = r"(?<![\w.])"
        if ab in titles:
            text = _sub(lead + re.escape(ab) + r"(?=\s+[A-ZÀ-Ý])", full, text)
            continue
        if ab.endswith("."):  # at the end of the text it also ends the sentence
            text = _sub(lead + re.escape(ab) + r"\s*$", full + ".", text)
            if ab in _LIST_ENDS:  # "herbs etc. Pick pots ..."
                text = _sub(lead + re.escape(ab) + r"(?=\s+[A-ZÀ-ÝÄÖÜ])", full + ".", text)
        tail = r"(?!\w)" if ab[-1] in "./" else r"\b"
        text = _sub(lead + re.escape(ab) + tail, full, text)
    return text


def _years(text: str, lang: LangData) -> str:
    if not lang.year_context:
        return text
    ctx = "|".join(re.escape(w) for w in lang.year_context)
    return _sub(rf"\b({ctx})\s+(1[1-9]\d\d|20\d\d)\b(?![.,]\d)",
                lambda m: f"{m.group(1)} {_year(int(m.group(2)), lang)}", text, re.I)


_DE_FEMININE = re.compile(r"[A-ZÄÖÜ]\w*(e|ung|heit|keit|schaft|ion|tät|ik|ur|enz|anz)\b")


def _numbers(text: str, lang: LangData) -> str:
    # digits glued to letters ("MP3", "4K"): spaced so they are read as words
    text = _sub(r"(?<=[^\W\d])(?=\d)|(?<=\d)(?=[^\W\d])", " ", text)
    minus = _n2w(-1, lang.code).split()[0]
    text = _sub(rf"(?<![\w.,])-({_NUM})\b",
                lambda m: f"{minus} {number_words(m.group(1), lang)}", text)

    def one(m: re.Match[str]) -> str:
        words = number_words(m.group(0), lang)
        if lang.code == "de" and words == "ein":  # "eins" alone, "ein"/"eine" before a noun
            nxt = text[m.end():].lstrip()
            if not nxt[:1].isupper():
                return "eins"
            return "eine" if _DE_FEMININE.match(nxt) else "ein"
        return words

    return _sub(rf"(?<![\d]){_NUM}", one, text)


def _symbols(text: str, lang: LangData) -> str:
    for sym, word in lang.symbols:
        if sym == "+" or sym == "=":
            text = _sub(rf"\s*{re.escape(sym)}\s*", word, text)
        else:
            text = text.replace(sym, word)
    # what is left that no TTS says: brackets become commas, markup characters go
    text = _sub(r"\s*[(\[{]\s*", ", ", text)
    text = _sub(r"\s*[)\]}]\s*(?=[.,;:!?])", "", text)
    text = _sub(r"\s*[)\]}]\s*", ", ", text)
    text = _sub(r"[*_#|`^\\<>{}\[\]]", " ", text)
    text = text.replace("/", " ")
    return text


def _tidy(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = _sub(r"[ \t\u00a0\u202f]+", " ", text)
    text = _sub(r"\s+([.,;:!?…])", r"\1", text)
    text = _sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)  # ", ," -> ","
    text = _sub(r"[,;:]\s*([.!?])", r"\1", text)  # ", ." -> "."
    text = _sub(r"^\s*[,;:.]\s*", "", text)
    text = _sub(r"([.!?])(?:\s*\.)+", r"\1", text)
    text = _sub(r"([.,;:!?])(?=[^\s\d.,;:!?'\")])", r"\1 ", text)
    text = " ".join(text.split())
    # a sentence that now starts with a spelt-out number starts with a capital
    return _sub(r"(^|[.!?]\s+)([^\W\d_])", lambda m: m.group(1) + m.group(2).upper(), text)


def make_speakable(text: str, language: str = "en") -> str:
    """``text`` rewritten with words only: see the module docstring for the rules."""
    lang = lang_data(language)
    text = strip_markdown(text)
    text = speak_emails(text, lang)
    text = strip_urls(text)
    text = strip_emoji(text)
    text = _dates(text, lang)
    text = _ranges(text, lang)
    text = _times(text, lang)
    text = _currencies(text, lang)
    text = _percent(text, lang)
    text = _units(text, lang)
    text = _ordinals(text, lang)
    text = _abbreviations(text, lang)
    text = _years(text, lang)
    text = _numbers(text, lang)
    text = _symbols(text, lang)
    return _tidy(text)


# -- sentences ---------------------------------------------------------------------------

_SENT = re.compile(r"(?<=[.!?…])\s+(?=\S)")
_CLAUSE = re.compile(r"(?<=[,;:])\s+")


def sentences(text: str, max_chars: int = 250) -> list[str]:
    """``text`` split at sentence ends; a sentence longer than ``max_chars`` is split at
    clause boundaries (``, ; :``), and a clause still too long at spaces."""
    out: list[str] = []
    for s in _SENT.split(text.strip()):
        if not s:
            continue
        if len(s) <= max_chars:
            out.append(s)
            continue
        buf = ""
        for part in _CLAUSE.split(s):
            if buf and len(buf) + 1 + len(part) > max_chars:
                out.append(buf)
                buf = ""
            buf = f"{buf} {part}".strip()
            while len(buf) > max_chars:
                cut = buf.rfind(" ", 0, max_chars)
                cut = cut if cut > 0 else max_chars
                out.append(buf[:cut].strip())
                buf = buf[cut:].strip()
        if buf:
            out.append(buf)
    return out


def has_unspoken(text: str) -> str | None:
    """What in ``text`` is still not plain speech (digits, markdown, URLs, emoji, code
    or math characters), or None. The ``llm`` mode's output check."""
    if re.search(r"\d", text):
        return "it still has digits; write numbers in words"
    if _URL.search(text) or re.search(r"\b[\w-]+\.(?:com|org|net|io)\b", text):
        return "it has a URL or a web address"
    if re.search(r"[*#_`|\[\]{}<>\\^]", text) or re.search(r"^\s*[-•]\s", text, re.M):
        return "it has markdown or list formatting; write plain sentences"
    if "(" in text or ")" in text:
        return "it has parentheses"
    if _EMOJI.search(text):
        return "it has emoji"
    if re.search(r"[$€£¥%=+/@&°]", text):
        return "it has symbols (currency, %, =, +, /, @, &, °); write them as words"
    return None
