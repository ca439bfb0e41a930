"""``speech_rewrite``: the rules mode on turn rows (rewrites, provenance, rejects, QC after
rewriting) and the llm mode against the fake OpenAI-compatible server (the versioned
prompt, invalid answers retried with the problem fed back, rejects, the cache)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from speechmill.pipeline.stage import StageContext
from speechmill.synth.llm.config import LLMConfig
from speechmill.synth.text.speech_rewrite import (
    ASSISTANT_PROMPT,
    USER_PROMPT,
    SpeechRewrite,
    SpeechRewriteConfig,
    prompt_version,
)
from speechmill.synth.text.turns import dialogue_id, turn_rows
from testkit.fake_llm import FakeLLM
from testkit.http_faults import find_pieces, leaked_files


def _rows(*texts: str, language: str | None = "en", key: str = "d") -> list[dict[str, Any]]:
    did = dialogue_id("test", key)
    return turn_rows(did, [{"role": "user" if i % 2 == 0 else "assistant", "text": t}
                           for i, t in enumerate(texts)], parent_id=did, language=language)


def _process(tmp_path: Path, rows: list[dict[str, Any]], **cfg: Any
             ) -> tuple[dict[str, dict], dict[str, dict]]:
    config = SpeechRewriteConfig(**cfg)
    SpeechRewrite.validate_config(config)
    stage = SpeechRewrite(config, StageContext("rewrite", str(tmp_path)))
    stage.setup()
    try:
        res = stage.process(pa.Table.from_pylist(rows))
    finally:
        stage.teardown()
    return ({r["id"]: r for r in res.outputs.to_pylist()},
            {r["id"]: r for r in res.rejects.to_pylist()})


def test_rules_mode_rewrites_turns_and_records_provenance(tmp_path: Path) -> None:
    rows = _rows("Can I pay $45 on 2024-03-15?",
                 "## Sure\n- Pay **$45** by 10:30 a.m.\n- See https://example.com/pay",
                 "Thanks, that's all.", "You're welcome!")
    out, rej = _process(tmp_path, rows)
    assert rej == {}
    u, a, u2, a2 = (out[r["id"]] for r in rows)
    assert u["text"] == "Can I pay forty-five dollars on March fifteenth, twenty twenty-four?"
    assert u["text_original"] == rows[0]["text"]
    assert a["text"] == "Sure. Pay forty-five dollars by ten thirty a m. See."
    assert a["sentences"] == ["Sure.", "Pay forty-five dollars by ten thirty a m.", "See."]
    assert u2["text"] == "Thanks, that's all." and u2["text_original"] is None  # unchanged
    assert a2["est_seconds"] == pytest.approx(len("You're welcome!") / 15.0, abs=0.01)
    assert json.loads(a["rewrite"]) == {"mode": "rules", "rules_version": "1"}
    for r in rows:  # one output per input, same id, parent is the input
        assert out[r["id"]]["parent_id"] == r["id"]
        assert out[r["id"]]["dialogue_id"] == r["dialogue_id"]


def test_rules_mode_language_per_row(tmp_path: Path) -> None:
    rows = _rows("Was kostet das?", "Das kostet 29,90 € und dauert 2 Stunden.", language="de")
    out, _ = _process(tmp_path, rows)
    assert out[rows[1]["id"]]["text"] == (
        "Das kostet neunundzwanzig Euro und neunzig Cent und dauert zwei Stunden.")
    rows = _rows("How much?", "Es kostet 3 €.", language=None, key="x")
    out, _ = _process(tmp_path, rows, language="de")  # rows without a language
    assert out[rows[1]["id"]]["text"] == "Es kostet drei Euro."
    rows = _rows("Klingon?", "Yes, 3.", language="tlh", key="y")
    out, rej = _process(tmp_path, rows)
    assert {r["reason"] for r in rej.values()} == {"unsupported_language"}


def test_unspeakable_and_too_long_turns_are_rejected(tmp_path: Path) -> None:
    long_answer = (
        "The old harbour is the best place to start. Walk along the pier early, before the "
        "ferries arrive. Then climb the hill to the cathedral and look at its painted "
        "ceiling. After lunch, the covered market sells cheese, olives and warm bread. "
        "Most museums close on Mondays, so plan the art gallery for another day. In the "
        "evening, the terraces near the river fill with families and street musicians. "
        "Trams stop running around midnight. Taxis wait outside the main station. "
        "Carry some cash for the small bakeries. Finally, keep a jacket handy because "
        "the wind from the sea gets cold.")
    rows = _rows("Show me code.", "```python\nprint('hi')\n```",
                 "A table?", "| a | b |\n|---|---|\n| 1 | 2 |",
                 "Math?", "It is $\\frac{1}{2}$.",
                 "Tell me more.", long_answer, "   ", "ok")
    out, rej = _process(tmp_path, rows, max_spoken_seconds=30)
    got = {rows.index(next(r for r in rows if r["id"] == i)): v["reason"]
           for i, v in rej.items()}
    assert got == {1: "unspeakable_code", 3: "unspeakable_table", 5: "unspeakable_math",
                   7: "too_long_to_speak", 8: "qc_length"}
    assert "max_spoken_seconds 30" in rej[rows[7]["id"]]["detail"]
    assert set(out) == {rows[i]["id"] for i in (0, 2, 4, 6, 9)}
    # without a limit the long answer is kept, split into sentences for the TTS
    out, rej = _process(tmp_path, rows[6:8], max_spoken_seconds=None, max_sentence_chars=60)
    sents = out[rows[7]["id"]]["sentences"]
    assert rej == {} and len(sents) > 10 and max(len(x) for x in sents) <= 60
    assert " ".join(sents) == out[rows[7]["id"]]["text"]
    assert sents[0] == "The old harbour is the best place to start."


def test_qc_runs_after_rewriting(tmp_path: Path) -> None:
    rows = _rows("Mail ann@example.com about the 3 tickets.",
                 "As an AI language model, I cannot send e-mails.")
    out, rej = _process(tmp_path, rows)
    assert out[rows[0]["id"]]["text"] == "Mail an email address about the three tickets."
    assert out[rows[0]["id"]]["text_original"] == rows[0]["text"]
    assert rej[rows[1]["id"]]["reason"] == "qc_refusal"
    out, rej = _process(tmp_path, rows, qc={"pii": "reject"})
    assert rej[rows[0]["id"]]["reason"] == "qc_pii"
    out, rej = _process(tmp_path, rows, qc=None)
    assert len(out) == 2 and rej == {}
    assert out[rows[0]["id"]]["text"] == (
        "Mail ann at example dot com about the three tickets.")


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="key 'llm'"):
        SpeechRewrite.validate_config(SpeechRewriteConfig(mode="llm"))
    with pytest.raises(ValueError, match="key 'language'"):
        SpeechRewrite.validate_config(SpeechRewriteConfig(language="xx"))


# -- llm mode ------------------------------------------------------------------------------

SECRET = "sk-test-7f3a9c1e5b2d8046Qw9Er4Ty7Ui2Op5As8Df1Gh3"  # 48 characters


def _answer(body: dict[str, Any], fault: str | None) -> tuple[str, str]:
    msgs = body["messages"]
    turn = msgs[1]["content"].split("\n\n", 1)[1]
    if fault == "refusal":
        return "I'm sorry, but I can't help with that request.", "stop"
    if "RETRY" in turn:  # digits first; fixed once the problem is fed back
        return ("It costs five dollars." if len(msgs) > 2 else "It costs 5 dollars."), "stop"
    if "ALWAYS_BAD" in turn:
        return "See **this** at https://example.com", "stop"
    role = "assistant" if "voice assistant would say" in msgs[0]["content"] else "user"
    return f"Um, so this is the spoken {role} turn.", "stop"


def _llm(srv: FakeLLM, **kw: Any) -> dict[str, Any]:
    cfg = {"base_url": srv.base_url, "model": "fake-model", "api_key_env": "SM_TEST_KEY",
           "max_attempts": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
           "max_fix_attempts": 2, **kw}
    return {"mode": "llm", "llm": LLMConfig(**cfg)}


def test_llm_mode_prompt_validation_retries_rejects_and_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SM_TEST_KEY", SECRET)
    rows = _rows("What's the weather like on the 3rd?", "It'll be sunny, about 25 °C.",
                 "How much is it? RETRY", "ALWAYS_BAD answer",
                 "[[fault:refusal]] Please answer.", "```\ncode\n```",
                 "[[fault:500x1]] Still there?", "Yes.")
    with FakeLLM(_answer, api_key=SECRET) as srv:
        out, rej = _process(tmp_path, rows, **_llm(srv))
        hits = list(srv.chat)
        # the request carries the versioned prompt for the turn's role, the text last
        by_turn: dict[str, list] = {}
        for h in hits:
            by_turn.setdefault(h.body["messages"][1]["content"], []).append(h)
        first = by_turn["Rewrite this user message:\n\nWhat's the weather like on the 3rd?"]
        assert first[0].body["messages"][0]["content"] == USER_PROMPT.format(
            language="English", max_words=150)
        a = by_turn["Rewrite this assistant message:\n\nIt'll be sunny, about 25 °C."]
        assert a[0].body["messages"][0]["content"] == ASSISTANT_PROMPT.format(
            language="English", max_words=150)
        assert a[0].body["model"] == "fake-model"
        ok0 = out[rows[0]["id"]]
        assert ok0["text"] == "Um, so this is the spoken user turn."
        assert ok0["text_original"] == rows[0]["text"]
        prov = json.loads(ok0["rewrite"])
        assert prov["mode"] == "llm" and prov["model"] == "fake-model"
        assert prov["prompt_version"] == prompt_version() and len(prov["prompt_version"]) == 12
        assert prov["seed"] == a[0].body["seed"] or prov["seed"] == first[0].body["seed"]
        assert out[rows[1]["id"]]["text"] == "Um, so this is the spoken assistant turn."
        # invalid output (digits) asked again with the problem fed back, then accepted
        retry = by_turn["Rewrite this user message:\n\nHow much is it? RETRY"]
        assert len(retry) == 2
        fed_back = retry[1].body["messages"]
        assert fed_back[2] == {"role": "assistant", "content": "It costs 5 dollars."}
        assert "digits" in fed_back[3]["content"]
        assert out[rows[2]["id"]]["text"] == "It costs five dollars."
        # never valid: rejected after max_fix_attempts follow-ups
        bad = by_turn["Rewrite this assistant message:\n\nALWAYS_BAD answer"]
        assert len(bad) == 3
        assert rej[rows[3]["id"]]["reason"] == "llm_invalid_output"
        assert rej[rows[4]["id"]]["reason"] == "llm_refusal"
        # unspeakable input: rejected before any request
        assert rej[rows[5]["id"]]["reason"] == "unspeakable_code"
        assert not any("code" in k for k in by_turn)
        # a transient 500 is retried and answered
        assert [h.status for h in by_turn[
            "Rewrite this user message:\n\n[[fault:500x1]] Still there?"]] == [500, 200]
        assert set(out) == {rows[i]["id"] for i in (0, 1, 2, 6, 7)}
        # the usage is committed with the rows (outputs' columns, rejects' details)
        assert out[rows[2]["id"]]["rewrite_llm_requests"] == 2
        assert "[llm requests=3 " in rej[rows[3]["id"]]["detail"]
        summary = SpeechRewrite.summarize(pa.Table.from_pylist(list(out.values())),
                                          pa.Table.from_pylist(list(rej.values())))
        assert summary["llm"]["requests"] == len(hits)  # every HTTP request, the 500 too
        # a rerun (fresh stage, same run dir) is answered from the cache: no request
        srv.reset()
        out2, rej2 = _process(tmp_path, rows, **_llm(srv))
        assert srv.chat_requests() == 0
        assert {k: v["text"] for k, v in out2.items()} == {k: v["text"] for k, v in out.items()}
        assert set(rej2) == set(rej)
    # no piece of the key reaches the run directory
    assert not leaked_files(tmp_path, SECRET)
    assert os.environ["SM_TEST_KEY"] == SECRET


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_llm_mode_service_failures_are_transient_and_echoed_keys_never_leak(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture) -> None:
    """503 forever and a refused connection are transient rejects (a rerun retries
    them); a 400 and an answer that never validates are data rejects. The server echoes
    the key in long (> 2000 characters) error bodies and in an answer: no 8-character
    piece of it is in the rejects, any file, the output or the logs."""
    import logging

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("SM_TEST_KEY", SECRET)
    rows = _rows("[[fault:503]] Is it down?", "It is.", "[[fault:400]] Bad request?",
                 "[[fault:echo]] Say it again.")
    with FakeLLM(_answer, api_key=SECRET, echo_auth=True, retry_after="0") as srv:
        out, rej = _process(tmp_path, rows, **_llm(srv, max_attempts=2, max_fix_attempts=1))
    assert set(out) == {rows[1]["id"]}
    got = {rows.index(next(r for r in rows if r["id"] == k)): (v["reason"], v["kind"])
           for k, v in rej.items()}
    assert got == {0: ("llm_error", "transient"), 2: ("llm_error", "data"),
                   3: ("llm_invalid_output", "data")}
    assert "HTTP 503" in rej[rows[0]["id"]]["detail"]
    assert "HTTP 400" in rej[rows[2]["id"]]["detail"]
    # nothing listens on the port: every request is refused
    refused = {"mode": "llm", "llm": LLMConfig(
        base_url=f"http://127.0.0.1:{_free_port()}/v1", model="m", api_key_env="SM_TEST_KEY",
        max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.02, timeout_s=5)}
    out2, rej2 = _process(tmp_path / "refused", _rows("Hello?", key="r"), **refused)
    assert not out2 and [(r["reason"], r["kind"]) for r in rej2.values()] == [
        ("llm_error", "transient")]
    assert "connection error" in next(iter(rej2.values()))["detail"]
    cap = capfd.readouterr()
    assert not leaked_files(tmp_path, SECRET)
    texts = [json.dumps(list(rej.values()) + list(rej2.values())), cap.out, cap.err,
             caplog.text]
    assert not find_pieces(SECRET, *texts)
