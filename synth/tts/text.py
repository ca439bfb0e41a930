"""Splitting long text at sentence boundaries and joining the audio with natural pauses.

Every backend has a per-call character budget (``max_chars``: a TTS model speaks a long
input badly — drops or repeats words, runs away — or a server rejects it). Text longer
than the budget is split at sentence ends first, then at clause punctuation, then at
word boundaries, and chunks are packed greedily up to the budget. The audio of the
chunks is joined with a pause: ``pause_ms`` after a sentence end, a shorter one after a
clause or word split, with short fades so no chunk edge clicks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# sentence end: . ! ? … (optionally followed by closing quotes/brackets) then whitespace;
# CJK full stops need no whitespace after them
_SENT_END = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+|(?<=[。！？])")
_CLAUSE = re.compile(r"(?<=[,;:，；：—])\s*")
# "Dr. Smith" and "e.g. this" do not end a sentence
_ABBREV = {"mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "vs", "e.g", "i.e", "fig",
           "approx", "mt", "u.s"}


@dataclass(frozen=True)
class Chunk:
    text: str
    ends_sentence: bool  # False: split inside a sentence (shorter pause)


def sentences(text: str) -> list[str]:
    """``text`` split into sentences (whitespace-normalised, abbreviations kept whole)."""
    text = " ".join(text.split())
    if not text:
        return []
    out: list[str] = []
    pos = 0
    for m in _SENT_END.finditer(text):
        piece = text[pos : m.end()].strip()
        last = piece.rstrip("\"'”’)]").rstrip(".").split(" ")[-1].lower()
        if piece.endswith(".") and last in _ABBREV:
            continue  # abbreviation: keep going
        if piece:
            out.append(piece)
        pos = m.end()
    tail = text[pos:].strip()
    if tail:
        out.append(tail)
    return out


def _split_long(sentence: str, max_chars: int) -> list[str]:
    """A sentence over the budget: clause punctuation first, then words, then hard cuts."""
    parts = [p.strip() for p in _CLAUSE.split(sentence) if p.strip()]
    out: list[str] = []
    for p in parts:
        if len(p) <= max_chars:
            out.append(p)
            continue
        cur = ""
        for w in p.split(" "):
            while len(w) > max_chars:  # a single huge "word" (URL, no spaces): hard cut
                if cur:
                    out.append(cur)
                    cur = ""
                out.append(w[:max_chars])
                w = w[max_chars:]
            if cur and len(cur) + 1 + len(w) > max_chars:
                out.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}" if cur else w
        if cur:
            out.append(cur)
    return _pack(out, max_chars)


def _pack(pieces: list[str], max_chars: int) -> list[str]:
    out: list[str] = []
    for p in pieces:
        if out and len(out[-1]) + 1 + len(p) <= max_chars:
            out[-1] = f"{out[-1]} {p}"
        else:
            out.append(p)
    return out


def split_text(text: str, max_chars: int) -> list[Chunk]:
    """Chunks of at most ``max_chars`` characters, split at sentence boundaries where
    possible; whole sentences are packed together up to the budget."""
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    chunks: list[Chunk] = []
    cur = ""
    for s in sentences(text):
        if len(s) > max_chars:
            if cur:
                chunks.append(Chunk(cur, True))
                cur = ""
            pieces = _split_long(s, max_chars)
            chunks += [Chunk(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
        elif cur and len(cur) + 1 + len(s) > max_chars:
            chunks.append(Chunk(cur, True))
            cur = s
        else:
            cur = f"{cur} {s}" if cur else s
    if cur:
        chunks.append(Chunk(cur, True))
    return chunks


def join_with_pauses(parts: list[np.ndarray], sample_rate: int, ends_sentence: list[bool],
                     pause_ms: int = 300, clause_pause_ms: int | None = None,
                     fade_ms: float = 5.0) -> np.ndarray:
    """Concatenate chunk audio with silence between chunks: ``pause_ms`` after a sentence
    end, ``clause_pause_ms`` (default a third of it) after a split inside a sentence.
    Each chunk gets ``fade_ms`` fades at both ends."""
    if not parts:
        return np.zeros(0, np.float32)
    if clause_pause_ms is None:
        clause_pause_ms = pause_ms // 3
    nf = int(sample_rate * fade_ms / 1000)
    out: list[np.ndarray] = []
    for i, p in enumerate(parts):
        x = np.asarray(p, np.float32).reshape(-1).copy()
        if len(parts) > 1 and nf and x.shape[0] > 2 * nf:
            ramp = np.linspace(0.0, 1.0, nf, dtype=np.float32)
            x[:nf] *= ramp
            x[-nf:] *= ramp[::-1]
        out.append(x)
        if i < len(parts) - 1:
            ms = pause_ms if ends_sentence[i] else clause_pause_ms
            out.append(np.zeros(int(sample_rate * ms / 1000), np.float32))
    return np.concatenate(out)
