"""How tokenized shards lay codes out for a target model. Pure functions, numpy only.

* :func:`plain` -- codes as the tokenizer gave them: ``[n_codebooks, frames]`` int64, or a
  list of 1-D int64 arrays for multi-rate codecs (SNAC).
* :func:`speechgpt_units` -- SpeechGPT's unit string ``"<sosp><12><7><eosp>"``.
  SpeechGPT's ``speech2unit`` merges consecutive repeats of its mHuBERT units by
  default: set ``dedup: true`` on the k-means tokenizer (or pass ``dedup=True``) to get
  that; :func:`parse_speechgpt_units` reads a string back.
* :func:`mini_omni_flatten` / :func:`mini_omni_unflatten` -- Mini-Omni's 7 parallel audio
  streams built from SNAC 24 kHz's 3 codebooks, with its per-stream delay and vocabulary
  shift (``layershift``); the constants of Mini-Omni's code are in :data:`MINI_OMNI` and
  go into shard metadata.

Mini-Omni layout (from gpt-omni/mini-omni ``inference.py`` and ``utils/snac_utils.py``:
``layershift``, ``reconscruct_snac``, ``reconstruct_tensors``):

SNAC 24 kHz gives codebooks ``c0 [T]`` (~12 Hz), ``c1 [2T]`` (~23 Hz), ``c2 [4T]``
(~47 Hz). Each ~12 Hz frame ``t`` holds 7 values, one per stream, in SNAC's
depth-first order::

    stream: 0       1        2        3          4          5          6
    value:  c0[t]   c1[2t]   c2[4t]   c2[4t+1]   c1[2t+1]   c2[4t+2]   c2[4t+3]

Stream ``i`` is delayed by ``i + 1`` steps (Mini-Omni's ``reconscruct_snac`` drops the
first ``i + 1`` tokens of stream ``i``); the delay is filled with ``pad_a`` (4097), and
each stream ends with ``eoa`` (4096) right after its last code, then ``pad_a`` up to the
common length. Every token ``v`` of stream ``i`` (codes and specials) is then shifted to
``v + shift + i * 4160`` (``layershift``; ``shift`` defaults to Mini-Omni's padded text
vocabulary, 152000, so audio ids follow the text ids; pass ``shift=0`` for audio-only
ids). With ``bos`` (e.g. ``MINI_OMNI["answer_a"]``) each stream starts with it. So the
result is ``[7, bos + T + 7 + eos]``; without ``bos``, before the shift::

    column:    0    1      ...  i    i+1        ...  i+T        i+T+1  i+T+2 ... T+7
    stream i:  pad  pad    ...  pad  code[0]    ...  code[T-1]  eoa    pad   ... pad

(``code`` is stream ``i``'s row of the table above; stream 6's ``eoa`` is column T+7.)
The delay fill and end token follow Mini-Omni's inference code (what it feeds back and
strips); its training-data scripts are not public.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from speechmill.manifests.tokenizers.kmeans import dedup_consecutive

__all__ = [
    "LAYOUTS",
    "MINI_OMNI",
    "SPEECHGPT",
    "mini_omni_flatten",
    "mini_omni_unflatten",
    "parse_speechgpt_units",
    "plain",
    "speechgpt_units",
]

# -- plain -----------------------------------------------------------------------------


def plain(codes: np.ndarray | Sequence[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """Codes as given, normalised: an array becomes ``[n_codebooks, frames]`` int64 (a 1-D
    array is one codebook ``[1, frames]``); a list of per-codebook arrays (multi-rate
    codecs) becomes a list of 1-D int64 arrays (``[1, n]`` rows are flattened)."""
    if isinstance(codes, np.ndarray):
        a = np.atleast_2d(codes)
        if a.ndim != 2:
            raise ValueError(f"codes must be [n_codebooks, frames], got shape {codes.shape}")
        _check_int(a)
        return np.ascontiguousarray(a, dtype=np.int64)
    out = []
    for i, c in enumerate(codes):
        a = np.asarray(c)
        if a.ndim == 2 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 1:
            raise ValueError(f"codebook {i}: expected a 1-D array, got shape {a.shape}")
        _check_int(a)
        out.append(np.ascontiguousarray(a, dtype=np.int64))
    return out


def _check_int(a: np.ndarray) -> None:
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"codes must be integers, got {a.dtype}")


# -- SpeechGPT ---------------------------------------------------------------------------

#: SpeechGPT's unit markup (0nutation/SpeechGPT ``speech2unit``: ``"<sosp>" +
#: "".join(f"<{u}>") + "<eosp>"``; mHuBERT layer 11, 1000 k-means units, consecutive
#: repeats merged by default)
SPEECHGPT: dict[str, Any] = {"sosp": "<sosp>", "eosp": "<eosp>", "unit": "<{}>",
                             "dedup": True}

_SPEECHGPT_RE = re.compile(r"^<sosp>((?:<\d+>)*)<eosp>$")


def speechgpt_units(units: np.ndarray | Sequence[int], dedup: bool = False) -> str:
    """``units`` (1-D, or ``[1, T]``) as SpeechGPT's string ``"<sosp><u1><u2>...<eosp>"``.

    ``dedup`` merges consecutive repeats first (SpeechGPT's ``merged`` units). It is off
    by default because deduplication belongs to the tokenizer (``dedup: true``, recorded in
    the codec identity); it is idempotent, so turning it on here too is harmless."""
    a = np.asarray(units)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 1:
        raise ValueError(f"speechgpt_units takes one codebook, got shape {a.shape}")
    _check_int(a)
    if a.size and int(a.min()) < 0:
        raise ValueError("units must be >= 0")
    if dedup:
        a = dedup_consecutive(a)
    return "<sosp>" + "".join(f"<{int(u)}>" for u in a) + "<eosp>"


def parse_speechgpt_units(s: str) -> np.ndarray:
    """The inverse of :func:`speechgpt_units`: ``"<sosp><3><1><eosp>" -> [3, 1]`` int64."""
    m = _SPEECHGPT_RE.match(s.strip())
    if m is None:
        raise ValueError(f"not a SpeechGPT unit string: {s[:60]!r}")
    return np.array([int(u) for u in re.findall(r"<(\d+)>", m.group(1))], np.int64)


# -- Mini-Omni ---------------------------------------------------------------------------

_TEXT_VOCAB = 151936
_AUDIO_VOCAB = 4096
_SPECIALS = 64

#: Mini-Omni's constants (gpt-omni/mini-omni ``inference.py``, ``utils/snac_utils.py``)
MINI_OMNI: dict[str, Any] = {
    "model": "gpt-omni/mini-omni",
    "codec": "hubertsiuzdak/snac_24khz",
    "n_streams": 7,
    "text_vocab_size": _TEXT_VOCAB,
    "text_special_tokens": _SPECIALS,
    "padded_text_vocab_size": _TEXT_VOCAB + _SPECIALS,  # 152000 = layershift's shift
    "audio_vocab_size": _AUDIO_VOCAB,
    "audio_special_tokens": _SPECIALS,
    "padded_audio_vocab_size": _AUDIO_VOCAB + _SPECIALS,  # 4160 = layershift's stride
    # audio specials (per stream, before layershift)
    "eoa": _AUDIO_VOCAB,  # 4096 end of audio
    "pad_a": _AUDIO_VOCAB + 1,  # 4097
    "input_a": _AUDIO_VOCAB + 2,  # 4098 (bos of input audio)
    "answer_a": _AUDIO_VOCAB + 3,  # 4099 (bos of the answer)
    "split": _AUDIO_VOCAB + 4,  # 4100
    # text specials (text stream, unshifted)
    "eot": _TEXT_VOCAB,  # 151936
    "pad_t": _TEXT_VOCAB + 1,
    "input_t": _TEXT_VOCAB + 2,
    "answer_t": _TEXT_VOCAB + 3,
    "asr": _TEXT_VOCAB + 4,
    # layout
    "delays": [1, 2, 3, 4, 5, 6, 7],  # stream i starts i + 1 steps late
    # (codebook, position within the ~12 Hz frame) of each stream
    "streams": [[0, 0], [1, 0], [2, 0], [2, 1], [1, 1], [2, 2], [2, 3]],
    "frame_rate": 24000 / 2048,  # 11.71875 Hz: SNAC 24 kHz hop 512, codebook 0 stride 4
}

_STREAMS = [tuple(s) for s in MINI_OMNI["streams"]]
_N = MINI_OMNI["n_streams"]


def _snac_arrays(snac_codes: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int]:
    if len(snac_codes) != 3:
        raise ValueError(f"Mini-Omni needs SNAC's 3 codebooks, got {len(snac_codes)}")
    cs = plain(list(snac_codes))
    assert isinstance(cs, list)
    t = cs[0].size
    for j, c in enumerate(cs):
        if c.size != t * 2**j:
            raise ValueError(f"SNAC codebook {j} has {c.size} codes; with {t} in codebook 0 "
                             f"it must have {t * 2**j} (rates 1:2:4)")
        if c.size and (int(c.min()) < 0 or int(c.max()) >= _AUDIO_VOCAB):
            raise ValueError(f"SNAC codebook {j}: codes must be in [0, {_AUDIO_VOCAB})")
    return cs, t


def mini_omni_flatten(snac_codes: Sequence[np.ndarray], *,
                      shift: int = MINI_OMNI["padded_text_vocab_size"],
                      bos: int | None = None, eos: bool = True) -> np.ndarray:
    """SNAC codes ``[c0 [T], c1 [2T], c2 [4T]]`` -> Mini-Omni streams
    ``[7, (bos is not None) + T + 7 + eos]`` int64 (see the module docstring).

    ``shift``: added to every stream (``layershift``'s 152000 by default; 0 gives ids in
    ``[i * 4160, (i + 1) * 4160)`` for stream ``i``). ``bos``: an audio special to open
    every stream with (``MINI_OMNI["answer_a"]`` or ``["input_a"]``), none by default.
    ``eos``: end each stream with ``eoa`` after its last code (default)."""
    cs, t = _snac_arrays(snac_codes)
    b = 0 if bos is None else 1
    e = 1 if eos else 0
    width = b + t + _N + e
    out = np.full((_N, width), MINI_OMNI["pad_a"], np.int64)
    if bos is not None:
        out[:, 0] = int(bos)
    for i, (cb, pos) in enumerate(_STREAMS):
        per = 2**cb  # codes of codebook cb per ~12 Hz frame
        start = b + i + 1
        out[i, start : start + t] = cs[cb][pos::per]
        if eos:
            out[i, start + t] = MINI_OMNI["eoa"]
    out += int(shift) + np.arange(_N, dtype=np.int64)[:, None] * MINI_OMNI[
        "padded_audio_vocab_size"]
    return out


def mini_omni_unflatten(streams: np.ndarray, *,
                        shift: int = MINI_OMNI["padded_text_vocab_size"],
                        bos: int | None = None, eos: bool = True,
                        strict: bool = True) -> list[np.ndarray]:
    """The inverse of :func:`mini_omni_flatten` (same ``shift``/``bos``/``eos``):
    ``[7, L] -> [c0 [T], c1 [2T], c2 [4T]]`` int64 with ``T = L - 7 - bos - eos``.
    ``strict`` checks that the delay, padding and end tokens are where they belong."""
    a = np.asarray(streams)
    if a.ndim != 2 or a.shape[0] != _N:
        raise ValueError(f"Mini-Omni streams must be [7, L], got shape {a.shape}")
    _check_int(a)
    b = 0 if bos is None else 1
    e = 1 if eos else 0
    t = a.shape[1] - b - _N - e
    if t < 0:
        raise ValueError(f"Mini-Omni streams of length {a.shape[1]} are shorter than the "
                         f"{b + _N + e} delay/special columns")
    local = a.astype(np.int64) - int(shift) - np.arange(_N, dtype=np.int64)[:, None] * \
        MINI_OMNI["padded_audio_vocab_size"]
    cs = [np.empty(t * 2**j, np.int64) for j in range(3)]
    for i, (cb, pos) in enumerate(_STREAMS):
        start = b + i + 1
        row = local[i]
        codes = row[start : start + t]
        if strict:
            pad = MINI_OMNI["pad_a"]
            width = MINI_OMNI["padded_audio_vocab_size"]
            if row.size and (row.min() < 0 or row.max() >= width):
                lo = int(shift) + i * width
                raise ValueError(f"stream {i}: ids outside its range [{lo}, {lo + width}) "
                                 f"(wrong shift?)")
            if bos is not None and row[0] != bos:
                raise ValueError(f"stream {i}: expected bos {bos} at column 0, got {row[0]}")
            if np.any(row[b:start] != pad):
                raise ValueError(f"stream {i}: delay columns are not pad_a ({pad})")
            tail = row[start + t :]
            want = ([MINI_OMNI["eoa"]] if eos else []) + [pad] * (_N - 1 - i)
            if tail.tolist() != want:
                raise ValueError(f"stream {i}: expected {want} after the codes, got "
                                 f"{tail.tolist()}")
            if codes.size and codes.max() >= _AUDIO_VOCAB:
                raise ValueError(f"stream {i}: a special token among the codes (codes "
                                 f"must be in [0, {_AUDIO_VOCAB}))")
        cs[cb][pos :: 2**cb] = codes
    return cs


#: layout name -> function (what the tokenize stage's ``layout`` key may name)
LAYOUTS = {
    "plain": plain,
    "speechgpt": speechgpt_units,
    "mini-omni": mini_omni_flatten,
}
