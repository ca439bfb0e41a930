"""Podcast/media feeds, URL normalisation, safe file names and URL lists.

Helpers for turning web sources into download jobs:

* :func:`parse_feed` reads RSS 2.0 (iTunes, Media RSS, Dublin Core, Creative Commons and
  Atom extensions) and Atom 1.0 feeds into feed metadata plus one :class:`FeedItem` per
  audio/video enclosure. The XML is parsed with ``defusedxml``: a feed that declares
  entities (billion laughs, XXE) or references external resources raises ``ValueError``
  instead of being expanded or fetched.
* :func:`normalize_url` gives a canonical form of a URL for de-duplication.
* :func:`safe_filename` turns an untrusted name (or URL) into one file name that is safe to
  create inside a directory.
* :func:`read_url_list` reads txt/csv/tsv/jsonl lists of URLs with per-URL metadata.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import email.utils
import html
import io
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as DET
from defusedxml import DefusedXmlException

from speechmill.pipeline.audio import MEDIA_EXTENSIONS

__all__ = ["FeedItem", "normalize_url", "parse_feed", "read_url_list", "safe_filename"]

# -- namespaces ----------------------------------------------------------------------------
NS_ATOM = "http://www.w3.org/2005/Atom"
NS_ITUNES = "http://www.itunes.com/dtds/podcast-1.0.dtd"
NS_MEDIA = "http://search.yahoo.com/mrss/"
NS_DC = "http://purl.org/dc/elements/1.1/"
NS_CONTENT = "http://purl.org/rss/1.0/modules/content/"
NS_CREATIVE_COMMONS = "http://backend.userland.com/creativeCommonsRssModule"
NS_CC = ("http://web.resource.org/cc/", "http://creativecommons.org/ns#")
NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
NS_XML = "http://www.w3.org/XML/1998/namespace"


def _q(ns: str, local: str) -> str:
    return f"{{{ns}}}{local}"


# MIME types that say nothing about the content: the URL's extension decides.
_GENERIC_TYPES = frozenset({
    "", "application/octet-stream", "binary/octet-stream", "application/binary",
    "application/download", "application/x-download", "application/force-download",
    "application/unknown", "application/x-unknown", "unknown/unknown", "application/mp4",
})
# Non-``audio/*`` types that are audio containers.
_MEDIA_APP_TYPES = frozenset({"application/ogg", "application/x-ogg"})

_DESCRIPTION_MAX = 1000


@dataclass
class FeedItem:
    """One audio/video enclosure of a feed item (an item with two enclosures gives two)."""

    url: str
    title: str | None = None
    published: str | None = None  # ISO-8601 UTC, e.g. "2024-01-15T10:00:00Z"
    author: str | None = None  # item author, else the feed's
    rights: str | None = None  # item license/rights, else the feed's
    duration_s: float | None = None
    mime_type: str | None = None
    length_bytes: int | None = None
    guid: str | None = None
    link: str | None = None
    description: str | None = None  # plain text, at most 1000 characters
    episode: int | None = None
    season: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- feed parsing --------------------------------------------------------------------------
def parse_feed(
    data: bytes | str, base_url: str
) -> tuple[dict[str, str | None], list[FeedItem]]:
    """Parse an RSS 2.0 or Atom 1.0 feed.

    Returns ``(meta, items)``: ``meta`` has the keys ``feed_title``, ``feed_author``,
    ``feed_rights``, ``feed_link`` and ``feed_language``; ``items`` has one
    :class:`FeedItem` per audio/video enclosure, in feed order. Relative URLs are resolved
    against ``base_url`` (the feed's own URL). Items without an audio/video enclosure are
    skipped.

    Raises ``ValueError`` for malformed XML, for feeds that declare entities or reference
    external resources (entity expansion / XXE), and for documents that are neither RSS
    nor Atom.
    """
    root = _parse_xml(data)
    if root.tag == "rss":
        return _parse_rss(root, base_url)
    if root.tag == _q(NS_ATOM, "feed"):
        return _parse_atom(root, base_url)
    raise ValueError(f"not an RSS 2.0 or Atom 1.0 feed (root element <{_local(root.tag)}>)")


def _parse_xml(data: bytes | str) -> Element:
    if isinstance(data, str):
        data = data.lstrip("\ufeff \t\r\n")
    else:
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        data = data.lstrip(b" \t\r\n")
    if not data:
        raise ValueError("empty feed")
    try:
        return DET.fromstring(data, forbid_dtd=False, forbid_entities=True,
                              forbid_external=True)
    except DefusedXmlException as e:
        raise ValueError(
            f"unsafe feed XML refused ({type(e).__name__}): entity declarations and "
            "external references are not allowed"
        ) from None
    except (ParseError, LookupError, UnicodeError) as e:  # LookupError: encoding='bogus'
        raise ValueError(f"malformed feed XML: {str(e)[:300]}") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _text(el: Element | None) -> str | None:
    if el is None:
        return None
    t = "".join(el.itertext()).strip()
    return t or None


def _first_text(el: Element, *tags: str) -> str | None:
    for tag in tags:
        for child in el.findall(tag):
            t = _text(child)
            if t:
                return t
    return None


def _all_text(el: Element, tag: str) -> str | None:
    vals = [t for t in (_text(c) for c in el.findall(tag)) if t]
    return ", ".join(dict.fromkeys(vals)) or None


def _resolve(base: str, url: str | None) -> str | None:
    """``url`` resolved against ``base``; None for no URL or one that cannot be split
    (``http://[::1``): that enclosure or link is skipped, not the whole feed."""
    if not url or not url.strip():
        return None
    url = url.strip()
    try:
        out = urljoin(base, url) if base else url
        urlsplit(out)
    except ValueError:
        return None
    return out


def _email_name(value: str | None) -> str | None:
    """``"jo@example.com (Jo Smith)"`` -> ``"Jo Smith"``; other values unchanged.
    (No regex: ``\\S+@\\S+`` backtracks quadratically on a long run of ``@``.)"""
    if not value:
        return None
    v = value.strip()
    i = v.find("(")
    if i > 0 and v.endswith(")"):
        addr, name = v[:i].strip(), v[i + 1:-1].strip()
        if "@" in addr[1:-1] and not any(c.isspace() for c in addr) and name:
            return name
    return v


def _rights(el: Element) -> str | None:
    """License/rights of a channel, item, feed or entry; license URLs first."""
    for tag in (_q(NS_CREATIVE_COMMONS, "license"), *(_q(ns, "license") for ns in NS_CC),
                _q(NS_MEDIA, "license")):
        for child in el.findall(tag):
            v = (child.get(_q(NS_RDF, "resource")) or child.get("href") or _text(child))
            if v and v.strip():
                return v.strip()
    for link in el.findall(_q(NS_ATOM, "link")):
        if link.get("rel") == "license" and link.get("href", "").strip():
            return link.get("href", "").strip()
    return _first_text(el, _q(NS_DC, "rights"), _q(NS_MEDIA, "copyright"),
                       _q(NS_ATOM, "rights"), "copyright")


def _parse_date(value: str | None) -> str | None:
    """RFC-822 (RSS) or RFC-3339/ISO-8601 (Atom, dc:date) -> ``YYYY-MM-DDTHH:MM:SSZ``."""
    if not value or not value.strip():
        return None
    s = " ".join(value.split())
    dt: datetime | None = None
    iso_first = bool(re.match(r"\d{4}-\d{2}-\d{2}", s))
    for attempt in ("iso", "rfc822") if iso_first else ("rfc822", "iso"):
        try:
            if attempt == "iso":
                dt = datetime.fromisoformat(s.upper())
            else:
                dt = email.utils.parsedate_to_datetime(s)
            break
        except (TypeError, ValueError, IndexError, OverflowError):
            continue
    if dt is None:  # RFC-822 date without a time: "Mon, 15 Jan 2024"
        m = re.fullmatch(r"(?:[A-Za-z]+,?\s*)?(\d{1,2}) ([A-Za-z]{3})[A-Za-z]* (\d{4})", s)
        if not m:
            return None
        try:
            dt = datetime.strptime(" ".join(m.groups()), "%d %b %Y")
        except ValueError:
            return None
    try:
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        dt = dt.astimezone(UTC)
    except (OverflowError, ValueError):
        return None
    return dt.replace(microsecond=0, tzinfo=None).isoformat() + "Z"


def _parse_duration(value: str | None) -> float | None:
    """``"HH:MM:SS"``, ``"MM:SS"`` or seconds (``"3600"``, ``"12.5"``) -> seconds."""
    if not value:
        return None
    parts = value.strip().split(":")
    if not 1 <= len(parts) <= 3:
        return None
    if not all(re.fullmatch(r"\d{1,12}", p) for p in parts[:-1]):
        return None  # (more digits: int() refuses thousands of them; no real duration)
    if not re.fullmatch(r"\d{1,12}(?:\.\d{1,12})?", parts[-1]):
        return None
    total = float(parts[-1])
    for i, p in enumerate(reversed(parts[:-1]), start=1):
        total += int(p) * 60**i
    return total if math.isfinite(total) and total > 0 else None


def _parse_int(value: str | None, *, positive: bool = False) -> int | None:
    # at most 18 digits: int() refuses thousands of them, and no length or episode is larger
    if not value or not re.fullmatch(r"\s*\d{1,18}\s*", value):
        return None
    n = int(value)
    return None if positive and n <= 0 else n


def _mime(value: str | None) -> str | None:
    if not value:
        return None
    return value.split(";", 1)[0].strip().lower() or None


def _is_media(url: str, mime: str | None, medium: str | None = None) -> bool:
    m = mime or ""
    if m.startswith(("audio/", "video/")) or m in ("audio", "video") or m in _MEDIA_APP_TYPES:
        return True
    if m not in _GENERIC_TYPES:
        return False
    if medium in ("audio", "video"):
        return True
    try:
        path = urlsplit(url).path.lower()
    except ValueError:
        return False
    dot = path.rfind(".")
    return dot > path.rfind("/") and path[dot:] in MEDIA_EXTENSIONS


_BLOCK_TAGS = frozenset({"p", "br", "div", "li", "ul", "ol", "tr", "td", "th", "h1", "h2",
                         "h3", "h4", "h5", "h6", "blockquote", "pre", "hr", "section"})
_SKIP_TAGS = frozenset({"script", "style", "head", "title"})
_TAG_NAME = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9:-]*)")


def _html_text(value: str) -> str:
    """The text of an HTML fragment: tags dropped (block tags become a space), script/
    style/head/title content dropped, comments and declarations dropped, character
    references decoded.

    Linear in the input: each search only moves forward (``html.parser`` rescans an
    unterminated tag to the end for every ``<``, quadratic on ``"<a " * 20000``)."""
    out: list[str] = []
    skip = 0
    i, n = 0, len(value)
    gt = -2  # position of the next '>' at or after the last search (-1: none left)
    while i < n:
        j = value.find("<", i)
        if j < 0:
            j = n
        if not skip:
            out.append(value[i:j])
        if j >= n:
            break
        if value.startswith("<!--", j):
            k = value.find("-->", j + 4)
            if k < 0:
                break  # an unterminated comment runs to the end
            i = k + 3
            continue
        if gt != -1 and gt < j:
            gt = value.find(">", j)
        m = _TAG_NAME.match(value, j, gt if gt >= 0 else j)
        if gt >= 0 and m is None and value[j + 1:j + 2] in ("!", "?"):
            i = gt + 1  # <!DOCTYPE ...>, <![CDATA[...]]>, <?...?>
            continue
        if gt < 0 or m is None:
            if not skip:  # a '<' that starts no tag is text
                out.append("<")
            i = j + 1
            continue
        close, name = m.group(1), m.group(2).lower()
        if name in _SKIP_TAGS and value[gt - 1:gt] != "/":
            skip = max(0, skip - 1) if close else skip + 1
        elif name in _BLOCK_TAGS and not skip:
            out.append(" ")
        i = gt + 1
    return html.unescape("".join(out))


def _clip(text: str | None, limit: int | None = None) -> str | None:
    """Whitespace-collapsed ``text``, at most ``limit`` characters (ending in an ellipsis)."""
    text = " ".join(text.split()) if text else ""
    if limit is not None and len(text) > limit:
        text = text[: limit - 1].rstrip() + "\u2026"
    return text or None


def _plain_text(value: str | None, limit: int | None = None) -> str | None:
    """HTML (or plain text) -> whitespace-collapsed plain text, at most ``limit`` chars."""
    if not value:
        return None
    return _clip(_html_text(value), limit)


def _atom_text(el: Element | None) -> str | None:
    """Text of an Atom text construct (type text/html/xhtml) as plain text."""
    if el is None:
        return None
    t = _text(el)
    if t and el.get("type", "text").lower() in ("html", "text/html"):
        return _plain_text(t)
    return _clip(t)


@dataclass
class _Enclosure:
    url: str
    mime: str | None
    length: int | None
    duration: float | None


def _media_enclosures(el: Element, base: str) -> list[_Enclosure]:
    """``media:content`` of an item/entry, also inside ``media:group``."""
    out = []
    contents = [*el.findall(_q(NS_MEDIA, "content")),
                *el.findall(f"{_q(NS_MEDIA, 'group')}/{_q(NS_MEDIA, 'content')}")]
    for c in contents:
        url = _resolve(base, c.get("url"))
        mime = _mime(c.get("type"))
        if url and _is_media(url, mime, (c.get("medium") or "").strip().lower()):
            out.append(_Enclosure(url, mime, _parse_int(c.get("fileSize"), positive=True),
                                  _parse_duration(c.get("duration"))))
    return out


def _merge_enclosures(encs: list[_Enclosure]) -> list[_Enclosure]:
    """One enclosure per URL; missing attributes filled from later duplicates."""
    by_url: dict[str, _Enclosure] = {}
    for e in encs:
        seen = by_url.get(e.url)
        if seen is None:
            by_url[e.url] = dataclasses.replace(e)
        else:
            seen.mime = seen.mime or e.mime
            seen.length = seen.length or e.length
            seen.duration = seen.duration or e.duration
    return list(by_url.values())


def _items_for(encs: list[_Enclosure], fallback_duration: float | None,
               **fields: Any) -> list[FeedItem]:
    return [FeedItem(url=e.url, mime_type=e.mime, length_bytes=e.length,
                     duration_s=e.duration if e.duration is not None else fallback_duration,
                     **fields)
            for e in _merge_enclosures(encs)]


def _parse_rss(root: Element, base_url: str) -> tuple[dict[str, str | None], list[FeedItem]]:
    channel = root.find("channel")
    if channel is None:
        raise ValueError("RSS feed has no <channel>")
    feed_author = (_first_text(channel, _q(NS_ITUNES, "author"))
                   or _all_text(channel, _q(NS_DC, "creator"))
                   or _email_name(_first_text(channel, "managingEditor"))
                   or _first_text(channel, f"{_q(NS_ITUNES, 'owner')}/{_q(NS_ITUNES, 'name')}"))
    feed_link = _resolve(base_url, _first_text(channel, "link"))
    if feed_link is None:
        for link in channel.findall(_q(NS_ATOM, "link")):
            if link.get("rel", "alternate") == "alternate":
                feed_link = _resolve(base_url, link.get("href"))
                if feed_link:
                    break
    meta: dict[str, str | None] = {
        "feed_title": _first_text(channel, "title"),
        "feed_author": feed_author,
        "feed_rights": _rights(channel),
        "feed_link": feed_link,
        "feed_language": _first_text(channel, "language", _q(NS_DC, "language")),
    }
    items: list[FeedItem] = []
    for item in channel.findall("item"):
        encs: list[_Enclosure] = []
        for enc in item.findall("enclosure"):
            url = _resolve(base_url, enc.get("url"))
            mime = _mime(enc.get("type"))
            if url and _is_media(url, mime):
                encs.append(_Enclosure(url, mime, _parse_int(enc.get("length"), positive=True),
                                       None))
        encs += _media_enclosures(item, base_url)
        if not encs:
            continue
        author = (_first_text(item, _q(NS_ITUNES, "author"))
                  or _all_text(item, _q(NS_DC, "creator"))
                  or _email_name(_first_text(item, "author"))
                  or feed_author)
        description = _plain_text(
            _first_text(item, "description", _q(NS_CONTENT, "encoded"),
                        _q(NS_ITUNES, "summary"), _q(NS_ITUNES, "subtitle"),
                        f"{_q(NS_MEDIA, 'group')}/{_q(NS_MEDIA, 'description')}",
                        _q(NS_MEDIA, "description")),
            _DESCRIPTION_MAX)
        items += _items_for(
            encs, _parse_duration(_first_text(item, _q(NS_ITUNES, "duration"))),
            title=_clip(_first_text(item, "title", _q(NS_ITUNES, "title"))),
            published=_parse_date(_first_text(item, "pubDate", _q(NS_DC, "date"))),
            author=author,
            rights=_rights(item) or meta["feed_rights"],
            guid=_first_text(item, "guid"),
            link=_resolve(base_url, _first_text(item, "link")),
            description=description,
            episode=_parse_int(_first_text(item, _q(NS_ITUNES, "episode"))),
            season=_parse_int(_first_text(item, _q(NS_ITUNES, "season"))),
        )
    return meta, items


def _atom_authors(el: Element) -> str | None:
    names = [n for n in (_first_text(a, _q(NS_ATOM, "name"))
                         for a in el.findall(_q(NS_ATOM, "author"))) if n]
    return ", ".join(dict.fromkeys(names)) or None


def _atom_link(el: Element, base: str, rel: str) -> str | None:
    for link in el.findall(_q(NS_ATOM, "link")):
        if link.get("rel", "alternate") == rel:
            href = _resolve(base, link.get("href"))
            if href:
                return href
    return None


def _xml_base(el: Element, base: str) -> str:
    xb = el.get(_q(NS_XML, "base"))
    return (_resolve(base, xb) or base) if xb and xb.strip() else base


def _parse_atom(root: Element, base_url: str) -> tuple[dict[str, str | None], list[FeedItem]]:
    feed_base = _xml_base(root, base_url)
    feed_author = _atom_authors(root)
    meta: dict[str, str | None] = {
        "feed_title": _atom_text(root.find(_q(NS_ATOM, "title"))),
        "feed_author": feed_author,
        "feed_rights": _rights(root),
        "feed_link": _atom_link(root, feed_base, "alternate"),
        "feed_language": (root.get(_q(NS_XML, "lang")) or "").strip() or None,
    }
    items: list[FeedItem] = []
    for entry in root.findall(_q(NS_ATOM, "entry")):
        base = _xml_base(entry, feed_base)
        encs: list[_Enclosure] = []
        for link in entry.findall(_q(NS_ATOM, "link")):
            if link.get("rel") != "enclosure":
                continue
            url = _resolve(_xml_base(link, base), link.get("href"))
            mime = _mime(link.get("type"))
            if url and _is_media(url, mime):
                encs.append(_Enclosure(url, mime, _parse_int(link.get("length"), positive=True),
                                       None))
        encs += _media_enclosures(entry, base)
        if not encs:
            continue
        source = entry.find(_q(NS_ATOM, "source"))
        author = (_atom_authors(entry)
                  or (_atom_authors(source) if source is not None else None)
                  or _first_text(entry, _q(NS_ITUNES, "author"))
                  or feed_author)
        summary = entry.find(_q(NS_ATOM, "summary"))
        if summary is None or not _text(summary):
            summary = entry.find(_q(NS_ATOM, "content"))
        description = None
        if summary is not None:
            kind = summary.get("type", "text").lower()
            description = (_plain_text(_text(summary), _DESCRIPTION_MAX)
                           if kind in ("html", "text/html")
                           else _clip(_text(summary), _DESCRIPTION_MAX))
        items += _items_for(
            encs, _parse_duration(_first_text(entry, _q(NS_ITUNES, "duration"))),
            title=_atom_text(entry.find(_q(NS_ATOM, "title"))),
            published=_parse_date(_first_text(entry, _q(NS_ATOM, "published"),
                                              _q(NS_ATOM, "updated"))),
            author=author,
            rights=_rights(entry) or meta["feed_rights"],
            guid=_first_text(entry, _q(NS_ATOM, "id")),
            link=_atom_link(entry, base, "alternate"),
            description=description,
            episode=_parse_int(_first_text(entry, _q(NS_ITUNES, "episode"))),
            season=_parse_int(_first_text(entry, _q(NS_ITUNES, "season"))),
        )
    return meta, items


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
