"""Podcast and media feeds for the ``download`` stage.

* :func:`parse_feed` reads RSS 2.0 (iTunes, Media RSS, Dublin Core, Creative Commons and
  Atom extensions) and Atom 1.0 feeds into feed metadata plus one :class:`FeedItem` per
  audio/video enclosure. The XML is parsed with ``defusedxml``: a feed that declares
  entities (billion laughs, XXE) or references external resources raises ``ValueError``
  instead of being expanded or fetched.
URL normalisation and URL lists are in :mod:`speechmill.stages.download_urls`, safe
file names in :mod:`speechmill.pipeline.safe_names`.
"""

from __future__ import annotations

import dataclasses
import email.utils
import html
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urljoin, urlsplit
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as DET
from defusedxml import DefusedXmlException

from speechmill.pipeline.audio import MEDIA_EXTENSIONS

__all__ = ["FeedItem", "parse_feed"]

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
