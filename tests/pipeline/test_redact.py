"""``speechmill.pipeline.redact``: one redaction of secrets for every client, before any
truncation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speechmill.pipeline import redact
from speechmill.pipeline.redact import (
    MASK,
    redact_text,
    redact_url,
    register_secret,
    register_secrets,
    registered_secrets,
)

KEY = "sk-live-9Fh2Kd7Lp3Qx8Vb4Nc6Mz1Rt5Yw0Ja2Se7Ug4Io"  # 46 characters


def pieces(secret: str, n: int = 8) -> list[str]:
    return [secret[i:i + n] for i in range(len(secret) - n + 1)]


@pytest.fixture
def clean_registry() -> Iterator[None]:
    saved = registered_secrets()
    redact._forget_all()
    yield
    redact._forget_all()
    for s in saved:
        register_secret(s)


def test_given_and_registered_secrets_are_removed(clean_registry: None) -> None:
    text = f"error: bad key {KEY} (sent as {KEY})"
    assert redact_text(text, [KEY]) == f"error: bad key {MASK} (sent as {MASK})"
    assert KEY in redact_text(text)  # not registered, not given
    register_secret(KEY)
    assert KEY in registered_secrets()
    assert redact_text(text) == f"error: bad key {MASK} (sent as {MASK})"


def test_short_secrets_are_left_alone_and_short_ones_whole(clean_registry: None) -> None:
    assert redact_text("a b c abc", ["abc"]) == "a b c abc"  # < 4 characters: ignored
    assert redact_text("pin 12345 and 1234", ["12345"]) == f"pin {MASK} and 1234"
    register_secret("xyz")
    assert registered_secrets() == frozenset()


def test_min_chars_spares_content_from_short_dummy_keys(clean_registry: None) -> None:
    register_secret("none")  # a local server's dummy key
    assert redact_text("none of it") == f"{MASK} of it"  # an error text: removed
    assert redact_text("none of it", min_chars=8) == "none of it"  # content: left alone
    register_secret(KEY)
    assert redact_text(f"none {KEY}", min_chars=8) == f"none {MASK}"


def test_pieces_of_a_secret_are_removed(clean_registry: None) -> None:
    """A server that cut the key short (or split it) leaves no 8-character piece."""
    register_secret(KEY)
    for cut in (KEY[:20], KEY[10:30], KEY[-9:]):
        out = redact_text(f"key={cut}... truncated")
        assert not any(p in out for p in pieces(KEY)), out
    assert redact_text(f"x {KEY[:7]} y") == f"x {KEY[:7]} y"  # 7 characters: too short


def test_encoded_forms(clean_registry: None) -> None:
    secret = 'pa ss/wo"rd+&=1234'
    register_secret(secret)
    for form in (quote(secret, safe=""), json.dumps(secret)[1:-1], secret):
        out = redact_text(f"before {form} after")
        assert out == f"before {MASK} after", (form, out)


def test_overlapping_secrets_leave_nothing(clean_registry: None) -> None:
    a, b = "zzzzzzzzzzABCD", "ABCDqqqqqqqqqqqq"
    out = redact_text("<" + a[:-4] + b + ">", [a, b])
    assert out == f"<{MASK}>"


def test_patterns_without_registration(clean_registry: None) -> None:
    text = ("GET https://bob:hunter22@host.example/a?X-Amz-Signature=abc123&ep=3 "
            "Authorization: Bearer tok_abcdefghijkl, headers={'Authorization': 'Basic "
            "dXNlcjpwYXNz'} api_key=sk-abc123 {\"client_secret\": \"s3cr3tvalue\"} "
            "password: 'opensesame' max_tokens: 1024 token_env=HF_TOKEN bearer of news")
    out = redact_text(text)
    for gone in ("hunter22", "bob:", "abc123", "tok_abcdefghijkl", "dXNlcjpwYXNz",
                 "sk-abc123", "s3cr3tvalue", "opensesame"):
        assert gone not in out, (gone, out)
    assert "https://***@host.example/a?X-Amz-Signature=<redacted>&ep=3" in out
    for kept in ("max_tokens: 1024", "token_env=HF_TOKEN", "bearer of news"):
        assert kept in out
    # patterns=False: known secrets and URL credentials only (config values, dag.yaml)
    assert redact_text("api_key=sk-abc123", patterns=False) == "api_key=sk-abc123"
    assert redact_text("s3://k:s@b/x", patterns=False) == "s3://***@b/x"


def test_limit_truncates_after_redaction(clean_registry: None) -> None:
    register_secret(KEY)
    text = "x" * 290 + KEY + "y" * 2000
    out = redact_text(text, limit=300)
    assert len(out) == 300 and out.startswith("x" * 290) and out.endswith(MASK[:10])
    naive = text[:300]
    assert any(p in naive for p in pieces(KEY))  # what truncating first would leak


def test_register_secrets_walks_configs(clean_registry: None) -> None:
    register_secrets({"key": "AKIAEXAMPLEKEY", "secret": "wJalrXUtnFEMI", "region":
                      "us-east-1", "client_kwargs": {"endpoint_url": "http://u:pw12345@h:9"},
                      "headers": {"Authorization": "Bearer abcdefgh12345",
                                  "Content-Type": "application/json"}}, "storage_options")
    register_secrets({"api_key": "sk-extra-12345678", "top_k": 40,
                      "credentials": {"private_key": "-----BEGIN-----", "email": "svc@x.iam"}},
                     "extra_body")
    got = registered_secrets()
    for s in ("AKIAEXAMPLEKEY", "wJalrXUtnFEMI", "u:pw12345", "pw12345", "Bearer abcdefgh12345",
              "abcdefgh12345", "sk-extra-12345678", "-----BEGIN-----", "svc@x.iam"):
        assert s in got, s
    for s in ("us-east-1", "application/json"):
        assert s not in got, s


def test_redact_url_for_records() -> None:
    u = redact_url("https://user:pw@cdn.example.org/a.mp3?X-Amz-Signature=abc&ep=3&token=t")
    assert u == "https://cdn.example.org/a.mp3?X-Amz-Signature=REDACTED&ep=3&token=REDACTED"


def test_dag_redact_uses_it(clean_registry: None) -> None:
    from speechmill.pipeline.dag import REDACTED, redact

    register_secret(KEY)
    cfg = {"api_key": KEY, "base_url": "http://me:pass1234@llm:8000/v1",
           "note": f"prefix {KEY}", "n": 3}
    assert redact(cfg) == {"api_key": REDACTED, "base_url": "http://***@llm:8000/v1",
                           "note": f"prefix {MASK}", "n": 3}


SECRET_CHARS = st.characters(codec="ascii", categories=("L", "N"), include_characters="-_.")
TEXT_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(secret=st.text(SECRET_CHARS, min_size=8, max_size=64),
       chunks=st.lists(st.text(TEXT_CHARS, max_size=80), min_size=1, max_size=6),
       cut=st.integers(min_value=0, max_value=800),
       registered=st.booleans())
def test_property_no_piece_survives_redaction_then_truncation(
        secret: str, chunks: list[str], cut: int, registered: bool) -> None:
    """Random secrets (8+ characters) at random places of random text: after
    ``redact_text`` and a cut at any length, no 8-character piece of the secret is left
    (whatever the text around it, and whether it is registered or given)."""
    text = secret.join(chunks) if len(chunks) > 1 else chunks[0] + secret
    if registered:
        saved = registered_secrets()
        redact._forget_all()
        try:
            register_secret(secret)
            out = redact_text(text, limit=cut)
        finally:
            redact._forget_all()
            for s in saved:
                register_secret(s)
    else:
        out = redact_text(text, [secret], limit=cut)
    assert len(out) <= cut
    left = [p for p in pieces(secret) if p in out]
    assert not left, (secret, text, out)
