"""One redaction for every client that talks to a service: secrets out of any text before
it is truncated, logged, stored (reject details, run.json, metrics) or printed.

Clients register what they hold once (:func:`register_secret`, or :func:`register_secrets`
for a mapping such as ``storage_options``, request headers or an LLM's ``extra_body``:
the values under secret-looking keys, the token of an ``Authorization`` value, the
password of a URL with ``user:pass@``). :func:`redact_text` then removes from a text:

* every registered secret and every secret passed to it (4 characters or more: shorter
  ones would mangle ordinary text), also in their URL-encoded and JSON-escaped forms.
  A secret of 8 characters or more is removed wherever **any 8-character piece** of it
  appears, so a secret that a server echoed and then cut short (or that was split across
  a line) leaves nothing behind either;
* credentials embedded in URLs: ``scheme://user:pass@host`` -> ``scheme://***@host``;
* ``Authorization: Bearer xxx`` / ``Basic xxx`` values and ``api_key=xxx``-looking
  assignments (``api_key``, ``access_token``, ``client_secret``, ``password``, ... followed
  by ``=`` or ``:``, quoted or not) and signature/token query parameters.

Always redact the whole text first and truncate afterwards (``limit=``): a secret cut by a
truncation cannot be recognised any more. The registry is per process (each worker
registers what its clients hold); nothing in it is ever written anywhere.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlencode, urlsplit, urlunsplit

#: config keys whose values are secrets (redacted from dag.yaml, run.json and logs)
_SECRET_KEY_RE = re.compile(
    r"(api_?key|(^|_)token($|_)|secret|password|passwd|credential|(^|_)auth($|_|orization)|"
    r"private_?key|access_?key|account_?key|conn(ection)?_?str|^key$|_key$|-key$|cookie|"
    r"^storage_options$|^headers$|^client_kwargs$)",
    re.I,
)


def is_secret_key(key: str) -> bool:
    """Whether a config key names a secret (its value is redacted)."""
    return bool(key) and bool(_SECRET_KEY_RE.search(key))

__all__ = [
    "MASK",
    "MIN_SECRET_CHARS",
    "PIECE_CHARS",
    "redact_text",
    "redact_url",
    "register_secret",
    "register_secrets",
    "registered_secrets",
    "url_secrets",
]

#: what a secret becomes
MASK = "<redacted>"
#: shorter secrets are not replaced (they would mangle ordinary text)
MIN_SECRET_CHARS = 4
#: no piece of a secret this long may remain
PIECE_CHARS = 8

_lock = threading.Lock()
_registry: set[str] = set()
_version = 0
_compiled: tuple[int, frozenset[str], frozenset[str]] | None = None

_URL_CREDS = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^\s/?#@\"']+)@")
_AUTH_VALUE = re.compile(
    r"(?i)\b((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?\s*)"
    r"(?:(bearer|basic|token|digest)\s+)?([^\s\"',;}]+)")
_BEARER = re.compile(r"\b([Bb]earer|BEARER)(\s+)([A-Za-z0-9\-._~+/]{8,}=*)")
_ASSIGN = re.compile(
    r"(?i)\b((?:x[-_])?api[-_]?key|apikey|access[-_]?token|auth[-_]?token|refresh[-_]?token|"
    r"id[-_]?token|session[-_]?token|bearer[-_]?token|client[-_]?secret|"
    r"secret[-_]?access[-_]?key|access[-_]?key[-_]?id|account[-_]?key|private[-_]?key|"
    r"password|passwd|secret|token)"
    r"([\"']?\s*[=:]\s*[\"']?)([^\s\"'&,;)}\]<>]{4,})")
_QUERY = re.compile(
    r"(?i)([?&](?:x-amz-signature|x-amz-security-token|x-amz-credential|x-goog-signature|"
    r"x-goog-credential|signature|sig|token|key|api_key|apikey|access_token)=)"
    r"([^&\s#\"'<>]+)")


# -- the registry ------------------------------------------------------------------------------


def register_secret(value: Any) -> None:
    """Remember ``value`` (a string of 4+ characters; anything else is ignored) as a secret
    of this process: :func:`redact_text` removes it from every text from now on. The token
    of an ``Authorization``-style value (``Bearer xxx``) and the password of a URL with
    credentials are registered too."""
    global _version
    if not isinstance(value, str):
        return
    vals = {value.strip()}
    m = re.fullmatch(r"(?i)\s*(?:bearer|basic|token|digest)\s+(\S+)\s*", value)
    if m:
        vals.add(m.group(1))
    vals.update(url_secrets(value))
    vals = {v for v in vals if len(v) >= MIN_SECRET_CHARS}
    with _lock:
        if vals - _registry:
            _registry.update(vals)
            _version += 1


def register_secrets(obj: Any, key: str = "") -> None:
    """Register the secrets inside a config value: strings under secret-looking keys
    (:func:`is_secret_key`; a whole secret subtree such as a
    service-account mapping), and URL credentials anywhere. ``storage_options``,
    ``headers`` and ``client_kwargs`` are containers: only their secret-looking keys
    (``key``, ``secret``, ``token``, ``Authorization``, ...) count."""
    containers = {"storage_options", "headers", "client_kwargs"}
    secret = is_secret_key(key) and key.lower() not in containers

    def walk(o: Any, inside: bool) -> None:
        if isinstance(o, Mapping):
            for k, v in o.items():
                ks = str(k)
                walk(v, inside or (is_secret_key(ks) and ks.lower() not in containers))
        elif isinstance(o, list | tuple | set | frozenset):
            for v in o:
                walk(v, inside)
        elif isinstance(o, str):
            if inside:
                register_secret(o)
            else:
                for s in url_secrets(o):
                    register_secret(s)

    walk(obj, secret)


def registered_secrets() -> frozenset[str]:
    with _lock:
        return frozenset(_registry)


def _forget_all() -> None:
    """Empty the registry (tests only)."""
    global _version
    with _lock:
        _registry.clear()
        _version += 1


def url_secrets(text: str) -> list[str]:
    """The credentials (``user:pass`` and ``pass``) of the URLs in ``text``."""
    out = []
    for m in _URL_CREDS.finditer(text or ""):
        info = m.group(2)
        out.append(info)
        if ":" in info:
            out.append(info.split(":", 1)[1])
    return [s for s in out if len(s) >= MIN_SECRET_CHARS]


# -- redaction ---------------------------------------------------------------------------------


def _forms(secret: str) -> set[str]:
    """``secret`` and its URL-encoded and JSON-escaped forms."""
    out = {secret, quote(secret, safe=""), quote_plus(secret, safe=""),
           json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    return {s for s in out if len(s) >= MIN_SECRET_CHARS}


def _index(secrets: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """(8-character pieces of the long secrets, the short secrets whole)."""
    pieces: set[str] = set()
    short: set[str] = set()
    for s in secrets:
        if not isinstance(s, str) or len(s) < MIN_SECRET_CHARS:
            continue
        for f in _forms(s):
            if len(f) >= PIECE_CHARS:
                pieces.update(f[i:i + PIECE_CHARS] for i in range(len(f) - PIECE_CHARS + 1))
            else:
                short.add(f)
    return frozenset(pieces), frozenset(short)


def _registry_index() -> tuple[frozenset[str], frozenset[str]]:
    global _compiled
    with _lock:
        c = _compiled
        if c is not None and c[0] == _version:
            return c[1], c[2]
        version, secrets = _version, list(_registry)
    pieces, short = _index(secrets)
    with _lock:
        _compiled = (version, pieces, short)
    return pieces, short


def _mask_secrets(text: str, pieces: frozenset[str], short: frozenset[str]) -> str:
    if not text or (not pieces and not short):
        return text
    n = len(text)
    spans: list[tuple[int, int]] = []
    if pieces:
        k = PIECE_CHARS
        for i in range(n - k + 1):
            if text[i:i + k] in pieces:
                spans.append((i, i + k))
    for s in short:
        start = text.find(s)
        while start >= 0:
            spans.append((start, start + len(s)))
            start = text.find(s, start + 1)
    if not spans:
        return text
    spans.sort()
    out = []
    pos = 0
    cur_a, cur_b = spans[0]
    for a, b in spans[1:]:
        if a <= cur_b:
            cur_b = max(cur_b, b)
            continue
        out.append(text[pos:cur_a])
        out.append(MASK)
        pos = cur_b
        cur_a, cur_b = a, b
    out.append(text[pos:cur_a])
    out.append(MASK)
    out.append(text[cur_b:])
    return "".join(out)


def _auth_sub(m: re.Match[str]) -> str:
    scheme = f"{m.group(2)} " if m.group(2) else ""
    return f"{m.group(1)}{scheme}{MASK}"


def redact_text(text: Any, secrets: Iterable[str] = (), *, limit: int | None = None,
                patterns: bool = True, min_chars: int = MIN_SECRET_CHARS) -> str:
    """``text`` without secrets (see the module doc), then cut to ``limit`` characters.

    ``secrets``: more values to remove besides the registered ones (4+ characters).
    ``patterns=False`` leaves the look-alike patterns (``api_key=...``, ``Bearer ...``,
    signature query parameters) alone and removes only known secrets and URL
    credentials. ``min_chars``: secrets shorter than this are left alone (content such
    as an LLM's answer uses 8: a dummy key like ``none`` must not mangle the words)."""
    if text is None:
        return ""
    if not isinstance(text, str):
        text = str(text)
    extra = [s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_CHARS]
    pieces, short = _registry_index()
    if extra:
        p2, s2 = _index(extra)
        pieces, short = pieces | p2, short | s2
    if min_chars > MIN_SECRET_CHARS:
        short = frozenset(s for s in short if len(s) >= min_chars)
    out = _mask_secrets(text, pieces, short)
    if "://" in out and "@" in out:
        out = _URL_CREDS.sub(lambda m: f"{m.group(1)}***@", out)
    if patterns:
        out = _AUTH_VALUE.sub(_auth_sub, out)
        out = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", out)
        out = _ASSIGN.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}"
                          if m.group(3) != MASK else m.group(0), out)
        if "=" in out:
            out = _QUERY.sub(lambda m: f"{m.group(1)}{MASK}", out)
    if limit is not None and len(out) > limit:
        out = out[:max(0, limit)]
    return out


def redact_url(url: str) -> str:
    """A URL as stored in records: no ``user:password@``, no signature/token parameters
    (their values become ``REDACTED``)."""
    try:
        p = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = p.netloc.rsplit("@", 1)[-1]
    q = [(k, "REDACTED" if _SECRET_PARAM.search(k) else v)
         for k, v in parse_qsl(p.query, keep_blank_values=True)]
    return urlunsplit((p.scheme, netloc, p.path, urlencode(q) if q else p.query, p.fragment))


_SECRET_PARAM = re.compile(
    r"(signature|token|key|sig$|credential|auth|password|secret|session)", re.I)
