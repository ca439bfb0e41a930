"""URLs for the ``download`` stage: :func:`normalize_url` gives a canonical form of a URL
for de-duplication; :func:`read_url_list` reads txt/csv/tsv/jsonl lists of URLs with per-URL
metadata."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["normalize_url", "read_url_list"]


# -- URL normalisation ---------------------------------------------------------------------
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SUB_DELIMS = "!$&'()*+,;="
_PATH_SAFE = frozenset(_UNRESERVED | set(_SUB_DELIMS) | set(":@/"))
_QUERY_SAFE = frozenset(_PATH_SAFE | set("?"))
_USERINFO_SAFE = frozenset(_UNRESERVED | set(_SUB_DELIMS) | set(":"))
_HEX = frozenset("0123456789abcdefABCDEF")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_TRACKING_PARAMS = frozenset({"fbclid", "gclid"})


def _norm_pct(s: str, safe: frozenset[str]) -> str:
    """Uppercase ``%xx``, decode escaped unreserved characters, escape unsafe ones (UTF-8)."""
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "%" and i + 2 < n and s[i + 1] in _HEX and s[i + 2] in _HEX:
            ch = chr(int(s[i + 1:i + 3], 16))
            out.append(ch if ch in _UNRESERVED else "%" + s[i + 1:i + 3].upper())
            i += 3
            continue
        if c in safe:
            out.append(c)
        else:  # includes a lone '%' (-> %25, which keeps this idempotent)
            out.extend(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 for an absolute path."""
    segs = path.split("/")
    out: list[str] = []
    for seg in segs[1:]:
        if seg == ".":
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    if segs[-1] in (".", ".."):
        out.append("")
    return "/" + "/".join(out)


def _norm_host(host: str) -> str:
    if host.startswith("["):  # IPv6 literal
        return host.lower()
    host = host.lower().rstrip(".")
    if not host.isascii():
        with contextlib.suppress(UnicodeError):  # not a valid IDN: keep the lowercased text
            host = host.encode("idna").decode("ascii")
    return host


def normalize_url(url: str) -> str:
    """Canonical form of ``url`` for de-duplication (idempotent).

    Lowercases scheme and host, IDNA-encodes non-ASCII hosts, drops default ports (http
    80, https 443), the fragment, ``utm_*``/``fbclid``/``gclid`` query parameters and
    empty query parameters, sorts the remaining parameters, makes an empty path ``/``,
    resolves ``.``/``..`` path segments and normalises percent-encoding (uppercase hex,
    escaped unreserved characters decoded, spaces and non-ASCII characters escaped as
    UTF-8). Raises ``ValueError`` for a URL that cannot be split (e.g. a broken IPv6
    literal).
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    netloc = parts.netloc
    if netloc:
        userinfo, at, hostport = netloc.rpartition("@")
        if hostport.startswith("[") and "]" in hostport:
            end = hostport.index("]") + 1
            host, port = hostport[:end], hostport[end:].removeprefix(":")
        elif ":" in hostport:
            host, _, port = hostport.rpartition(":")
        else:
            host, port = hostport, ""
        host = _norm_host(host)
        if port.isdigit() and port.isascii():
            port = "" if int(port) == _DEFAULT_PORTS.get(scheme) else str(int(port))
        netloc = (_norm_pct(userinfo, _USERINFO_SAFE) + at if at else "") + host + (
            ":" + port if port else "")
    path = _norm_pct(parts.path, _PATH_SAFE)
    if path.startswith("/"):
        path = _remove_dot_segments(path)
    if not path and netloc:
        path = "/"
    params: list[tuple[str, str]] = []
    for pair in parts.query.split("&"):
        if not pair:
            continue
        key, eq, value = pair.partition("=")
        key = _norm_pct(key, _QUERY_SAFE)
        k = key.lower()
        if k.startswith("utm_") or k in _TRACKING_PARAMS:
            continue
        params.append((key, eq + _norm_pct(value, _QUERY_SAFE)))
    params.sort()
    query = "&".join(k + v for k, v in params)
    return urlunsplit((scheme, netloc, path, query, ""))


# -- URL lists -----------------------------------------------------------------------------
URL_KEYS = ("url", "link", "source_url", "audio_url")
_LIST_KINDS = ("txt", "csv", "tsv", "jsonl")


def _pick_url(rec: dict[str, Any], where: str) -> dict[str, Any]:
    lower = {str(k).strip().lower(): k for k in rec if k is not None}
    for want in URL_KEYS:
        key = lower.get(want)
        if key is None:
            continue
        v = rec[key]
        if isinstance(v, str) and v.strip():
            meta = {k: val for k, val in rec.items()
                    if k != key and k is not None and str(k).strip().lower() != "url"}
            return {"url": v.strip(), **meta}
        if v not in (None, ""):
            raise ValueError(f"{where}: {key!r} is not a string: {_short(v)}")
    raise ValueError(f"{where} has no URL (expected a non-empty {'/'.join(URL_KEYS)} value)")


_LIST_MAX_DEPTH = 32
_SURROGATES = re.compile("[\ud800-\udfff]")


def _short(v: Any, n: int = 80) -> str:
    try:
        r = repr(v[: n + 1] if isinstance(v, str) else v)
    except RecursionError:
        return f"<a deeply nested {type(v).__name__}>"
    return r if len(r) <= n else r[:n] + "..."


def _check_entry(rec: dict[str, Any], where: str) -> dict[str, Any]:
    """``rec`` if its URL can be split and its values stored (no lone surrogate from a
    JSON ``"\\ud800"`` escape, no nesting deeper than 32 levels); else ``ValueError``."""
    try:
        urlsplit(rec["url"])
    except ValueError as e:
        raise ValueError(f"{where}: {_short(rec['url'])} is not a URL ({e})") from None
    stack: list[tuple[Any, int]] = [(rec, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and _SURROGATES.search(v):
                raise ValueError(f"{where}: {_short(v)} is not valid Unicode (a lone "
                                 "surrogate)")
        elif isinstance(v, dict | list):
            if depth >= _LIST_MAX_DEPTH:
                raise ValueError(f"{where}: nested deeper than {_LIST_MAX_DEPTH} levels")
            for k, x in (v.items() if isinstance(v, dict) else enumerate(v)):
                stack.append((k, depth + 1))
                stack.append((x, depth + 1))
    return rec


def read_url_list(text: str | bytes, kind: str, source: str | None = None
                  ) -> list[dict[str, Any]]:
    """Read a list of URLs with optional metadata.

    ``kind`` is ``"txt"`` (one URL per line; blank lines and ``#`` comment lines skipped),
    ``"csv"``/``"tsv"`` (header row with a ``url``, ``link``, ``source_url`` or
    ``audio_url`` column, matched case-insensitively, first non-empty one wins) or
    ``"jsonl"`` (one JSON object per line with one of those keys). Returns one dict per
    entry with the key ``url`` plus the entry's other columns/keys as metadata. A leading
    UTF-8 BOM is ignored. Raises ``ValueError`` naming the line of an entry without a URL,
    of a URL that cannot be split (``http://[``), of invalid JSON (or JSON nested too
    deeply, or holding a lone surrogate), of bytes that are not UTF-8 (``text`` given as
    bytes), or for an unknown ``kind``; ``source`` (e.g. the config key and file) starts
    each message.
    """
    try:
        return _read_url_list(text, kind)
    except ValueError as e:
        if source:
            raise ValueError(f"{source}: {e}") from None
        raise


def _read_url_list(text: str | bytes, kind: str) -> list[dict[str, Any]]:
    k = kind.strip().lower().lstrip(".")
    if k not in _LIST_KINDS:
        raise ValueError(f"unknown URL list kind {kind!r} (expected one of {', '.join(_LIST_KINDS)})")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")  # (a BOM decodes to U+FEFF: removed below)
        except UnicodeDecodeError as e:
            line = text.count(b"\n", 0, e.start) + 1
            col = e.start - (text.rfind(b"\n", 0, e.start) + 1) + 1
            raise ValueError(f"line {line}: not UTF-8 text (byte 0x{text[e.start]:02x} at "
                             f"column {col})") from None
    text = text.removeprefix("\ufeff")
    out: list[dict[str, Any]] = []
    if k == "txt":
        for lineno, line in enumerate(text.splitlines(), start=1):
            s = line.strip()
            if s and not s.startswith("#"):
                out.append(_check_entry({"url": s}, f"line {lineno}"))
        return out
    if k == "jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError) as e:  # too deep, a 5000-digit number...
                msg = e.msg if isinstance(e, json.JSONDecodeError) else (
                    "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200])
                raise ValueError(f"line {lineno}: invalid JSON ({msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"line {lineno}: expected a JSON object, got "
                                 f"{type(rec).__name__}")
            out.append(_check_entry(_pick_url(rec, f"line {lineno}"), f"line {lineno}"))
        return out
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if k == "tsv" else ",")
    try:
        header = reader.fieldnames
        if not header:
            return out
        reader.fieldnames = [h.strip() if h else h for h in header]
        if not any(h and h.lower() in URL_KEYS for h in reader.fieldnames):
            raise ValueError(f"line 1: header has no URL column (expected one of "
                             f"{', '.join(URL_KEYS)}; got {', '.join(map(str, header))})")
        for rec in reader:
            where = f"line {reader.line_num}"
            out.append(_check_entry(_pick_url(rec, where), where))
    except csv.Error as e:
        raise ValueError(f"line {reader.line_num}: {e}") from None
    return out
