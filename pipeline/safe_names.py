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

:func:`safe_filename` is for names that come from outside (a URL's last path segment, a
``Content-Disposition`` name) and keep their extension: NFKC, controls and path characters
removed, cut to ``max_bytes`` of UTF-8 with the extension kept, never a reserved name.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any
from urllib.parse import unquote, urlsplit

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


# -- safe file names -----------------------------------------------------------------------
_WIN_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$"}
    | {f"COM{i}" for i in range(10)} | {f"LPT{i}" for i in range(10)}
)
_FORBIDDEN_CHARS = re.compile(r'[/\\:*?"<>|]')
_URL_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _strip_controls(s: str) -> str:
    # Cc: C0/C1 controls; Cf: format chars (bidi overrides, zero-width); Cs: lone surrogates
    return "".join(c for c in s if unicodedata.category(c) not in ("Cc", "Cf", "Cs"))


def _utf8_prefix(s: str, max_bytes: int) -> str:
    return s.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def _split_ext(name: str) -> tuple[str, str]:
    """``("stem", ".ext")`` when the extension is 1-8 ASCII letters/digits, else (name, "")."""
    dot = name.rfind(".")
    if dot > 0:
        ext = name[dot:]
        if 2 <= len(ext) <= 9 and ext[1:].isascii() and ext[1:].isalnum():
            return name[:dot], ext
    return name, ""


def _truncate(name: str, max_bytes: int) -> str:
    """At most ``max_bytes`` of UTF-8, cut on a character boundary, keeping the extension."""
    if len(name.encode("utf-8")) <= max_bytes:
        return name
    stem, ext = _split_ext(name)
    if ext and max_bytes > len(ext):
        stem = _utf8_prefix(stem, max_bytes - len(ext)).rstrip(". ")
        if stem:
            return stem + ext
    return _utf8_prefix(name, max_bytes).rstrip(". ")


def _is_reserved(name: str) -> bool:
    return name.split(".", 1)[0].rstrip(" ").upper() in _WIN_RESERVED


def _sanitize(name: str, max_bytes: int) -> str:
    if _URL_LIKE.match(name):  # a URL: its path, without query and fragment
        name = urlsplit(name).path
    name = unicodedata.normalize("NFKC", unquote(name))
    name = re.sub(r"\s+", " ", name)  # newlines, tabs... are whitespace, not removed
    name = _strip_controls(name)
    comps = [c for c in re.split(r"[/\\]", name) if c.strip()]
    name = comps[-1].strip() if comps else ""
    name = _FORBIDDEN_CHARS.sub("_", name)
    name = re.sub(r"\s+", "_", name)
    name = name.lstrip(".-").rstrip(". ")
    if name in ("", ".", ".."):
        return ""
    name = _truncate(name, max_bytes)
    if name and _is_reserved(name):
        name = _truncate("_" + name, max_bytes)
    return name if name not in (".", "..") else ""


def safe_filename(name: str, max_bytes: int = 100, default: str = "file") -> str:
    """A single file name, safe to create inside a directory, derived from ``name``.

    ``name`` may be a path, a URL (its path is used; query and fragment are dropped) or
    URL-encoded text. Only the last path component is kept (``/`` and ``\\`` both count),
    NFKC-normalised, with control and invisible format characters removed, ``/ \\ : * ?
    " < > |`` replaced by ``_``, whitespace runs replaced by ``_``, leading dots/dashes and
    trailing dots removed. The result is at most ``max_bytes`` bytes of UTF-8, cut on a
    character boundary and keeping a short (<= 8 ASCII alphanumerics) extension; Windows
    device names (``CON``, ``NUL``, ``COM1``...) get a ``_`` prefix. When nothing usable is
    left (empty, ``.``, ``..``), the sanitised ``default`` is returned (``"file"`` if that
    is unusable too).
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    return _sanitize(name, max_bytes) or _sanitize(default, max_bytes) or "file"[:max_bytes]
