"""Failures of a service are not data rejects: at the stage level, against real servers on
127.0.0.1 (a port where nothing listens, a server answering 503 forever, 400s, malformed
answers), the LLM stages (``dialogue_generate`` with its judge) and the ``tts`` stage
(HTTP cloning server in preset mode, OpenAI's speech API) reject with ``kind``
"transient" when the service failed after its retries and "data" otherwise."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from speechmill.pipeline.stage import StageContext
from speechmill.synth.text.dialogue_generate import DialogueGenerate, DialogueGenerateConfig
from speechmill.synth.text.turns import dialogue_id, turn_rows
from speechmill.synth.tts.stage import TTS, TTSStageConfig
from testkit.fake_llm import FakeLLM
from testkit.http_faults import FaultServer, echo_auth_route, find_pieces, leaked_files
from tests.synth.fake_tts_servers import tone, wav

KEY_ENV = "SM_TRANSIENT_TEST_KEY"
KEY = "sk-svc-Pq8Wm3Zx7Lc2Vn5Bt9Hy4Gr6Fd1Sa0Ke3Ju8Io2Tw"  # 48 characters


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kinds(rejects: pa.Table, key: str = "topic") -> dict[str, tuple[str, str]]:
    return {r[key]: (r["reason"], r["kind"]) for r in rejects.to_pylist()}


# -- LLM --------------------------------------------------------------------------------------


def generate(tmp_path: Path, base_url: str, topics: list[str], **llm: Any) -> pa.Table:
    """``dialogue_generate``'s plan -> setup -> process, as a worker runs it; the rejects
    with their topics."""
    cfg = {"base_url": base_url, "model": "fake-model", "api_key_env": KEY_ENV,
           "max_attempts": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.02,
           "max_fix_attempts": 1, "timeout_s": 5, **llm}
    judge = cfg.pop("judge", None)
    config = DialogueGenerateConfig(topics=topics, count=len(topics), min_turns=1,
                                    max_turns=1, llm=cfg, dedup_threshold=None,
                                    judge=judge)
    DialogueGenerate.validate_config(config)
    stage = DialogueGenerate(config, StageContext("gen", str(tmp_path)))
    plan = stage.plan()
    stage.setup()
    try:
        res = stage.process(plan)
    finally:
        stage.teardown()
    topic = dict(zip(plan.column("id").to_pylist(), plan.column("topic").to_pylist(),
                     strict=True))
    return pa.Table.from_pylist([{**r, "topic": topic[r["id"]]}
                                 for r in res.rejects.to_pylist()])


def test_llm_rejects_transient_for_the_service_data_for_the_answer(tmp_path: Path) -> None:
    topics = ["down [[fault:503]]", "rate limited [[fault:429]]", "bad [[fault:400]]",
              "prose [[fault:invalid]]", "sorry [[fault:refusal]]", "fine"]
    with FakeLLM(retry_after="0", api_key=KEY, echo_auth=True) as srv:
        rej = generate(tmp_path / "a", srv.base_url, topics)
        assert srv.stats()["statuses"][503] == 2  # max_attempts, then given up
    assert kinds(rej) == {
        "down [[fault:503]]": ("llm_error", "transient"),
        "rate limited [[fault:429]]": ("llm_error", "transient"),
        "bad [[fault:400]]": ("llm_error", "data"),
        "prose [[fault:invalid]]": ("llm_invalid_output", "data"),
        "sorry [[fault:refusal]]": ("llm_refusal", "data"),
    }
    # nothing listens: every request refused
    rej = generate(tmp_path / "b", f"http://127.0.0.1:{free_port()}/v1", ["a", "b"])
    assert kinds(rej) == {"a": ("llm_error", "transient"), "b": ("llm_error", "transient")}
    assert all("connection error" in d for d in rej.column("detail").to_pylist())
    assert not leaked_files(tmp_path, KEY)


def test_an_unreachable_judge_is_transient(tmp_path: Path) -> None:
    judge = {"llm": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "judge",
                     "api_key_env": KEY_ENV, "max_attempts": 1, "timeout_s": 5}}
    with FakeLLM(api_key=KEY) as srv:
        rej = generate(tmp_path, srv.base_url, ["tea", "dull [[fault:dull]]"], judge=judge)
    assert kinds(rej) == {"tea": ("llm_error", "transient"),
                          "dull [[fault:dull]]": ("llm_error", "transient")}
    assert all(d.startswith("judge: connection error")
               for d in rej.column("detail").to_pylist())


# -- TTS --------------------------------------------------------------------------------------


def turns(*texts: str) -> pa.Table:
    rows = []
    for i, t in enumerate(texts):
        did = dialogue_id("transient", str(i))
        rows += turn_rows(did, [{"role": "user", "text": t}], parent_id=did, language="en")
    return pa.Table.from_pylist(rows)


def synthesize(tmp_path: Path, backend: dict[str, Any], table: pa.Table) -> tuple[pa.Table,
                                                                                   pa.Table]:
    config = TTSStageConfig(backend=backend, qc={"enabled": False}, max_attempts=2,
                            audio_format="wav")
    TTS.validate_config(config)
    stage = TTS(config, StageContext("tts", str(tmp_path), offline=True))
    stage.setup()
    res = stage.process(table)
    return res.outputs, res.rejects


def http_backend(base: str, path: str) -> dict[str, Any]:
    return {"backend": "openai_compat", "base_url": base, "url_path": path, "voice": "alloy",
            "api_key_env": KEY_ENV, "max_retries": 1, "backoff_s": 0, "timeout_s": 5}


def test_tts_rejects_transient_for_the_server_data_for_the_request(tmp_path: Path) -> None:
    good = wav(tone(40, 16000), 16000)
    routes = {
        "/ok": lambda req: req.send(200, good, content_type="audio/wav"),
        "/down": echo_auth_route(503, headers={"Retry-After": "0"}),
        "/limited": echo_auth_route(429, headers={"Retry-After": "0"}),
        "/bad": echo_auth_route(400),
        "/garbage": lambda req: req.send(200, b"<html>not audio</html>" * 10,
                                         content_type="audio/wav"),
        "/v1/audio/speech": echo_auth_route(503),
    }
    got: dict[str, tuple[str, str]] = {}
    with FaultServer(routes) as srv:
        for path in ("/ok", "/down", "/limited", "/bad", "/garbage"):
            out, rej = synthesize(tmp_path / path.strip("/"), http_backend(srv.base, path),
                                  turns("Hello there, how are you today?"))
            assert out.num_rows + rej.num_rows == 1
            if rej.num_rows:
                r = rej.to_pylist()[0]
                got[path] = (r["reason"], r["kind"])
        assert srv.hits("/down") == 4  # 2 attempts x (1 + max_retries)
        assert srv.hits("/bad") == 2  # a 4xx is not retried (each attempt asks once)
        openai = {"backend": "openai", "base_url": srv.base + "/v1", "api_key_env": KEY_ENV,
                  "max_retries": 0, "timeout_s": 5}
        _, rej = synthesize(tmp_path / "openai", openai, turns("A preset voice."))
        got["openai 503"] = tuple(rej.to_pylist()[0][k] for k in ("reason", "kind"))
    assert "/ok" not in got
    assert got == {"/down": ("tts_error", "transient"), "/limited": ("tts_error", "transient"),
                   "/bad": ("tts_error", "data"), "/garbage": ("tts_error", "data"),
                   "openai 503": ("tts_error", "transient")}
    # nothing listens: connections refused (the HTTP client and the openai package)
    port = free_port()
    _, rej = synthesize(tmp_path / "refused", http_backend(f"http://127.0.0.1:{port}", "/x"),
                        turns("Anyone there?"))
    assert [(r["reason"], r["kind"]) for r in rej.to_pylist()] == [("tts_error", "transient")]
    openai = {"backend": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
              "api_key_env": KEY_ENV, "max_retries": 0, "timeout_s": 5}
    _, rej = synthesize(tmp_path / "refused-openai", openai, turns("Anyone?"))
    assert [(r["reason"], r["kind"]) for r in rej.to_pylist()] == [("tts_error", "transient")]
    # the servers echoed the key in long bodies: none of it in a reject or a file
    assert not leaked_files(tmp_path, KEY)
    assert not find_pieces(KEY, str(got))
