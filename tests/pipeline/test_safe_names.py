"""``safe_name``: any id -> one safe, bounded, unique file / tar member name."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from speechmill.pipeline.safe_names import HASH_HEX, is_safe_name, readable_part, safe_name

#: text that hits the edge cases often: separators, dots, dashes, controls, Unicode
EDGY = st.text(alphabet=st.sampled_from(list("/\\.-_ aZ0\x00\n\t\u200b张é\u0301"))
               | st.characters(), max_size=60)
TEXT = st.text() | EDGY | st.text(min_size=100, max_size=400)
SUFFIX = st.sampled_from(["", ".wav", ".flac", "_x", ".tar.gz"])
LIMIT = st.integers(min_value=30, max_value=260)


def check_safe(name: str, max_bytes: int, suffix: str) -> None:
    assert name and name.endswith(suffix)
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert name not in (".", "..") and ".." not in name
    assert not name.startswith(("-", "."))
    assert not any(ord(c) < 32 or ord(c) == 127 for c in name)
    assert len(name.encode("utf-8")) <= max_bytes


@settings(max_examples=400, deadline=None)
@given(TEXT, LIMIT, SUFFIX, st.booleans())
def test_any_text_gives_a_safe_name(text: str, max_bytes: int, suffix: str,
                                    strict: bool) -> None:
    name = safe_name(text, max_bytes=max_bytes, suffix=suffix, strict=strict)
    check_safe(name, max_bytes, suffix)
    assert is_safe_name(name, max_bytes=max_bytes)
    if strict:
        stem = name[: len(name) - len(suffix)]
        assert all(c.isascii() and (c.isalnum() or c in "_-") for c in stem)
    assert safe_name(text, max_bytes=max_bytes, suffix=suffix, strict=strict) == name


@settings(max_examples=400, deadline=None)
@given(TEXT, TEXT, LIMIT, SUFFIX, st.booleans())
def test_distinct_ids_give_distinct_names(a: str, b: str, max_bytes: int, suffix: str,
                                          strict: bool) -> None:
    kw = {"max_bytes": max_bytes, "suffix": suffix, "strict": strict}
    if a != b:
        assert safe_name(a, **kw) != safe_name(b, **kw)


@settings(max_examples=400, deadline=None)
@given(TEXT, LIMIT, SUFFIX, st.booleans())
def test_look_alike_ids_give_distinct_names(a: str, max_bytes: int, suffix: str,
                                            strict: bool) -> None:
    """The pairs most likely to collide: an id and its readable part, its own name taken
    as an id, the id cut or extended, with ``_`` for a space."""
    kw = {"max_bytes": max_bytes, "suffix": suffix, "strict": strict}
    name = safe_name(a, **kw)
    stem = name[: len(name) - len(suffix)] if suffix else name
    for b in (readable_part(a, strict=strict), stem, name, a.replace(" ", "_"), a + "_",
              a[:-1], a + "x" * 300, readable_part(a) + "-h" + "0" * HASH_HEX):
        if b != a:
            assert safe_name(b, **kw) != name, (a, b)


def test_pairs_that_used_to_collide() -> None:
    pairs = [("Anna Smith", "Anna_Smith"), ("张三", "李四"), ("a/b", "a_b"), ("a.b", "a_b"),
             ("", "_"), ("-rf", "_rf"), ("..", "__"), ("x" * 400, "x" * 401),
             ("x" * 400, "x" * 200 + "y" * 200)]
    for a, b in pairs:
        assert safe_name(a) != safe_name(b), (a, b)
        assert safe_name(a, strict=True) != safe_name(b, strict=True), (a, b)
    # ordinary ids stay as they are; Unicode letters stay readable
    for ok in ("utt-0001", "spk_1.seg-2", "张三", "Zoë", "a" * 120):
        assert safe_name(ok) == ok
    assert safe_name("张三", strict=True).startswith("__-h")
    assert safe_name("Anna Smith").startswith("Anna_Smith-h")
    # an id that looks hashed is hashed again, so no unchanged id equals a hashed name
    # (hence not idempotent on hashed names: that would make two ids share one name)
    hashed = safe_name("Anna Smith")
    assert safe_name(hashed) != hashed
    assert safe_name("Anna_Smith-h" + "0" * HASH_HEX) != "Anna_Smith-h" + "0" * HASH_HEX
    # bounded: long ids are cut (keeping a readable start) and hashed
    long = safe_name("é" * 400, max_bytes=64, suffix=".wav")
    assert long.startswith("é") and len(long.encode()) <= 64 and long.endswith(".wav")


def test_hostile_ids() -> None:
    for bad in ("../../escape", "/etc/passwd", "", "-rf", "a/b", ".", "..", ".hidden",
                "a\x00b", "CON", "nul.txt", "trailing.", "new\nline", "\ud800"):
        name = safe_name(bad)
        check_safe(name, 120, "")
        assert name != bad and not is_safe_name(bad)
    assert readable_part("../../escape") == "___.__escape"
    assert readable_part("-a b", strict=True) == "_a_b" and readable_part("") == "_"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="suffix"):
        safe_name("a", suffix="/x")
    with pytest.raises(ValueError, match="suffix"):
        safe_name("a", suffix="..wav")
    with pytest.raises(ValueError, match="no room"):
        safe_name("a", max_bytes=10, suffix=".wav")
    assert safe_name(12) == "12"
