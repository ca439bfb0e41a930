"""One safe name for a file or a tar member made from an id.

:func:`safe_name` turns any id (a row id, speaker, voice, dialogue id, split value) into a
single path component that every exporter, sink and media writer may create in a
directory or add to a tar:

- never a path: no ``/`` or ``\\``, never ``.`` or ``..`` and no ``..`` anywhere; it never
  starts with ``.`` (a hidden file) or ``-`` (read as an option by command-line tools) and
  never ends with ``.`` (Windows drops it);
- only letters, marks and digits of any script (``张三`` stays readable) plus ``_``, ``-``
  and ``.``: no whitespace, control characters, NUL, surrogates, invisible format
  characters, symbols or punctuation such as ``: * ? " < > |``; never a Windows device
  name (``CON``, ``NUL``, ``COM1``, ...);
- never empty, and at most ``max_bytes`` bytes of UTF-8 with ``suffix`` (an extension such
  as ``".wav"``) included;
- unique: an id that already is such a name is returned unchanged (ordinary ids keep their
  names), any other id becomes a readable part (each character outside the set above
  replaced by ``_``, cut on a character boundary to fit) followed by ``-h`` and
  :data:`HASH_HEX` hex digits of the SHA-256 of the id. An id that itself ends like that
  gets the hash too, so an unchanged name is never mistaken for a hashed one and distinct
  ids give distinct names (``Anna Smith`` -> ``Anna_Smith-h...``, ``Anna_Smith`` stays).

``strict=True`` keeps only ``[A-Za-z0-9_-]`` (ASCII, no dots) for readers that cut a name
at its first dot or cannot take Unicode.

:func:`readable_part` is the character mapping alone, without the uniqueness: for writers
that make names unique themselves (the ``nemo`` exporter's ``_<k>`` suffixes).
Case-insensitive or normalising file systems (macOS, Windows) may still fold two distinct
names (``Anna``/``anna``, NFC/NFD) into one file.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

#: hex digits of the id's SHA-256 appended to a changed or cut name (48 bits)
HASH_HEX = 12
#: what :func:`safe_name` appends to a changed id: ``-h`` + the hash
_HASHED = re.compile(rf"-h[0-9a-f]{{{HASH_HEX}}}$")
_HASH_LEN = 2 + HASH_HEX
_STRICT_OK = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_WIN_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$"}
    | {f"COM{i}" for i in range(10)} | {f"LPT{i}" for i in range(10)}
)


def _ok(c: str, strict: bool) -> bool:
    if strict:
        return c in _STRICT_OK
    return c in "_-." or unicodedata.category(c)[0] in "LMN"


def readable_part(text: str, *, strict: bool = False) -> str:
    """``text`` as a safe name, not made unique: every character outside the allowed set
    (letters, marks and digits of any script, ``_ - .``; with ``strict`` only
    ``[A-Za-z0-9_-]``) becomes ``_``, as does a ``.`` after a ``.``, a leading ``.`` or
    ``-`` and a trailing ``.``; a Windows device name gets a ``_`` prefix; empty text is
    ``_``. Not bounded in length."""
    out: list[str] = []
    for c in str(text):
        if not _ok(c, strict) or (c == "." and out and out[-1] == "."):
            c = "_"
        out.append(c)
    if not out:
        return "_"
    if out[0] in ".-":
        out[0] = "_"
    if out[-1] == ".":
        out[-1] = "_"
    name = "".join(out)
    if name.split(".", 1)[0].upper() in _WIN_RESERVED:
        name = "_" + name
    return name


def is_safe_name(name: str, *, max_bytes: int = 255, strict: bool = False) -> bool:
    """Whether ``name`` is safe as it is (what :func:`safe_name` returns, hashed or not):
    its own :func:`readable_part`, at most ``max_bytes`` bytes of UTF-8."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    return size <= max_bytes and readable_part(name, strict=strict) == name


def _utf8_prefix(s: str, max_bytes: int) -> str:
    return s.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def name_hash(text: str) -> str:
    """The ``-h<hex>`` tail :func:`safe_name` appends for ``text``."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"-h{digest[:HASH_HEX]}"


def safe_name(id: Any, *, max_bytes: int = 120, suffix: str = "",
              strict: bool = False) -> str:
    """A unique file / tar member name for ``id`` (a string; anything else is read as its
    ``str()``), ending in ``suffix``: ``id + suffix`` when ``id`` is already a safe name
    that fits, else ``<readable part>-h<hash of id> + suffix``; see the module docstring.

    ``suffix`` must itself be made of allowed characters (dots allowed, no ``..``), and
    ``max_bytes`` must leave room for it, the hash and one character."""
    text = id if isinstance(id, str) else str(id)
    sb = len(suffix.encode("utf-8"))
    if suffix and (".." in suffix or not all(_ok(c, False) for c in suffix)):
        raise ValueError(f"suffix {suffix!r} is not a safe file name ending")
    budget = max_bytes - sb - _HASH_LEN
    if budget < 1:
        raise ValueError(f"max_bytes {max_bytes} leaves no room for a name before the "
                         f"{_HASH_LEN}-byte hash and the suffix {suffix!r}")
    readable = readable_part(text, strict=strict)
    try:
        fits = len(text.encode("utf-8")) + sb <= max_bytes
    except UnicodeEncodeError:  # lone surrogates: never a name as they are
        fits = False
    if readable == text and fits and not _HASHED.search(text):
        return text + suffix
    part = _utf8_prefix(readable, budget) or "_"
    return part + name_hash(text) + suffix
