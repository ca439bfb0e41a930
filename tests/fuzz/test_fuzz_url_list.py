"""Fuzz target: ``download``'s URL lists (txt/csv/tsv/jsonl) never crash or hang the plan.

Inputs, written to a list file and planned as a run does (``Download.plan`` with
``url_lists``; ``read_url_list`` in ``stages/download_urls.py``), then processed with
every host denied and the network refused (nothing is fetched): random lines (NUL,
control characters, bidi and zero-width characters, lone CR, very long lines, URL-ish
text such as ``http://[``), bytes that are not UTF-8, CSV/TSV headers and quoting, JSON
Lines with wrong types, escaped lone surrogates, deep nesting and huge numbers.

Invariant: a list is the user's configuration, so a bad line fails the plan with a
``ValueError`` (the runner's ConfigError for the stage) naming the key, the file and the
line; otherwise every planned row ends as exactly one reject with a reason or an output,
never an ``error``; nothing is written outside the run directory; each example finishes
within :data:`DEADLINE_S`.

Budget: the ``ci`` profile's examples (200) shared by the two targets below.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from speechmill.pipeline.records import first_copies
from speechmill.pipeline.stage import StageContext
from speechmill.stages.download import Download, DownloadConfig
from tests.fuzz.harness import budget, refuse_network, time_limit

DEADLINE_S = 10.0
N_TARGETS = 2
BUDGET = budget(N_TARGETS)

#: reasons a denied-host run may give a planned URL-list row
REASONS = {"blocked_host", "bad_url", "duplicate_url", "not_found", "unreadable",
           "empty_file", "not_audio", "too_large"}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_network(monkeypatch)


_N = itertools.count()


def plan_list(tmp_path: Path, data: bytes, ext: str) -> tuple[list[dict], list[dict]] | str:
    """Plan (and process) a URL list; the plan's ValueError message, or (plan, rejects)."""
    case = tmp_path / f"case{next(_N)}"
    (case / "in").mkdir(parents=True)
    lst = case / "in" / f"urls{ext}"
    lst.write_bytes(data)
    run_dir = case / "run"
    before = set(case.rglob("*"))
    cwd = os.getcwd()
    os.chdir(case)
    try:
        with time_limit(DEADLINE_S):
            stage = Download(DownloadConfig(url_lists=[str(lst)], deny_hosts=["*"],
                                            max_retries=0),
                             StageContext("dl", str(run_dir)))
            try:
                plan = stage.plan()
            except ValueError as e:  # the runner's "stage 'dl': cannot plan inputs: ..."
                msg = str(e)
                assert msg.startswith(f"key 'with.url_lists': {lst}: "), msg
                assert "line " in msg or "unknown URL list kind" in msg, msg
                assert len(msg) < 1000
                shutil.rmtree(case, ignore_errors=True)
                return msg
            plan = plan.filter(first_copies(plan.column("id")))  # as the runner does
            stage.setup()
            res = stage.process(plan)
    finally:
        os.chdir(cwd)
    new = {p for p in set(case.rglob("*")) - before if run_dir not in p.parents
           and p != run_dir}
    assert not new, f"files written outside the run dir: {sorted(new)}"
    rows, rej = plan.to_pylist(), res.rejects.to_pylist()
    done = {r["id"] for r in rej} | set(res.outputs.column("parent_id").to_pylist())
    assert done == {r["id"] for r in rows}
    assert len(rej) == len({r["id"] for r in rej})
    for r in rej:
        assert r["reason"] in REASONS, r
    shutil.rmtree(case, ignore_errors=True)  # (a long run makes thousands)
    return rows, rej


_ODD = ["", " ", "#", "# comment", "\x00", "http://\x00/a.mp3", "\t\r\x0b\x0c", "\u202e",
        "\u200b", "\ufeff", "http://[", "http://[::1", "https://h.example:99999/a.mp3",
        "https://h.example/a.mp3", "HTTPS://H.EXAMPLE/A.MP3?utm_source=x", "//h.example/a",
        "file:///etc/passwd", "../../../etc/passwd", "relative/a.wav", "/", ".", "..",
        "javascript:alert(1)", "data:audio/wav;base64,AAAA", "s3x://b/k.wav", "a::b",
        "simplecache::https://h.example/a", "x" * 200_000, "https://h.example/" + "a" * 70_000,
        "url", "link", "audio_url", '"', '"a,b"', "a\rb"]
LINES = st.lists(st.one_of(st.text(max_size=30), st.sampled_from(_ODD)), max_size=8)


JSONL_LINES = st.lists(st.one_of(
    st.sampled_from(['{"url": "https://h.example/a.mp3", "speaker": "\\ud800"}',
                     '{"url": "https://h.example/\\udfff.mp3"}',
                     '{"url": "https://h.example/a.mp3", "n": ' + "9" * 5000 + "}",
                     '{"url": "https://h.example/a.mp3", "m": ' + "[" * 5000 + "]" * 5000
                     + "}", "[" * 100_000, '{"url": ["x"]}', '{"url": 5}', '{"url": null}',
                     '{"link": " https://h.example/b.mp3 "}', '{"URL": "http://["}',
                     "null", "[]", '"https://h.example/a.mp3"', '{"url": "a", "url": 1}',
                     '{"url": "https://h.example/a.mp3", "x": NaN}']),
    st.builds(lambda u, m: json.dumps({"url": u, "meta": m}),
              st.one_of(st.text(max_size=20), st.sampled_from(_ODD)),
              st.recursive(st.none() | st.text(max_size=5) | st.floats(),
                           lambda c: st.lists(c, max_size=3), max_leaves=6)),
), max_size=8)


@BUDGET
@given(kind=st.sampled_from(["txt", "csv", "tsv", "jsonl", "json", "lst", ""]),
       header=st.sampled_from(["url", "URL,speaker", "link\tlang", "audio_url,x,y",
                               "speaker", "", '"url"', "url,url"]),
       lines=LINES, jlines=JSONL_LINES,
       bad_bytes=st.sampled_from([b"", b"\xff", b"\xe9t\xe9", b"\xed\xa0\x80", b"\x00\x00"]),
       bom=st.booleans(), newline=st.sampled_from(["\n", "\r\n", "\r"]))
@example(kind="txt", header="", lines=["https://h.example/a.mp3"] * 3, jlines=[],
         bad_bytes=b"\xff", bom=True, newline="\n")
# found: a .jsonl line of 100k nested '[' raised RecursionError (not a config error) out
# of the plan
@example(kind="jsonl", header="", lines=[], jlines=["[" * 100_000], bad_bytes=b"", bom=False,
         newline="\n")
# found: a 5000-digit number: int()'s ValueError, not naming the line
@example(kind="jsonl", header="", lines=[], bad_bytes=b"", bom=False, newline="\n",
         jlines=['{"url": "https://h.example/a.mp3", "n": ' + "9" * 5000 + "}"])
# found: an escaped lone surrogate in a URL: UnicodeEncodeError out of the plan
@example(kind="jsonl", header="", lines=[], bad_bytes=b"", bom=False, newline="\n",
         jlines=['{"url": "https://h.example/\\udfff.mp3"}'])
# found: 'http://[' failed the plan with "Invalid IPv6 URL", naming no file or line
@example(kind="txt", header="", lines=["https://h.example/a.mp3", "http://["], jlines=[],
         bad_bytes=b"", bom=False, newline="\n")
@example(kind="csv", header="url,speaker", lines=["http://[::1,x"], jlines=[],
         bad_bytes=b"", bom=False, newline="\r\n")
# found: a local list with a byte that is not UTF-8: a bare UnicodeDecodeError
@example(kind="tsv", header="url\tx", lines=["https://h.example/a.mp3\ty"] * 4, jlines=[],
         bad_bytes=b"\xff", bom=False, newline="\n")
def test_url_lists(tmp_path: Path, kind: str, header: str, lines: list[str],
                   jlines: list[str], bad_bytes: bytes, bom: bool, newline: str) -> None:
    if kind == "jsonl":
        lines = jlines
    elif kind in ("csv", "tsv"):
        lines = [header, *lines]
    body = newline.join(lines).encode("utf-8", "surrogatepass")
    if bad_bytes and lines:
        at = len(body) // 2
        body = body[:at] + bad_bytes + body[at:]
    out = plan_list(tmp_path, (b"\xef\xbb\xbf" if bom else b"") + body,
                    f".{kind}" if kind else "")
    if bad_bytes not in (b"", b"\x00\x00") and lines:  # decoded first, whatever the lines
        assert isinstance(out, str) and "not UTF-8 text" in out, out
    if "http://[" in lines and kind in ("txt", "json", "lst", "") and not bad_bytes:
        assert isinstance(out, str) and "is not a URL" in out, out


@BUDGET
@given(urls=st.lists(st.sampled_from(["https://h.example/a.mp3", "http://H.example:80/a.mp3",
                                      "https://h.example/a.mp3#x", "relative/a.wav",
                                      "https://h.example/b.mp3?utm_source=y"]),
                     min_size=1, max_size=6))
def test_good_lists_plan_every_url(tmp_path: Path, urls: list[str]) -> None:
    """A clean list plans one row per line (copies as ``duplicate_url`` rejects)."""
    out = plan_list(tmp_path, "\n".join(urls).encode(), ".txt")
    assert not isinstance(out, str), out
    rows, rej = out
    assert len({r["source_url"] for r in rows}) == len(set(urls))
    assert all(r["reason"] in ("blocked_host", "duplicate_url", "unreadable") for r in rej)
