"""The LLM client against a real HTTP fake of an OpenAI-compatible server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from speechmill.synth.llm.budget import BudgetExceeded, LLMUnavailable
from speechmill.synth.llm.client import LLMClient
from speechmill.synth.llm.config import LLMConfig, estimate
from speechmill.synth.llm.conversation import ChatRequest
from testkit.fake_llm import FakeLLM

REPO = Path(__file__).resolve().parents[2]


class Turn(BaseModel):
    role: str
    text: str


class Dialogue(BaseModel):
    turns: list[Turn]


def cfg(srv: FakeLLM, **kw: object) -> LLMConfig:
    base = dict(base_url=srv.base_url, model="fake-model", backoff_base_s=0.01,
                backoff_max_s=0.05, timeout_s=2.0, api_key_env="SPEECHMILL_TEST_NO_KEY")
    base.update(kw)
    return LLMConfig(**base)  # type: ignore[arg-type]


def req(i: int | str, fault: str = "", schema: type[BaseModel] | None = Dialogue,
        **kw: object) -> ChatRequest:
    text = f"Write 2 rounds about topic {i}." + (f" [[fault:{fault}]]" if fault else "")
    return ChatRequest(key=str(i), messages=[{"role": "user", "content": text}],
                       schema=schema, **kw)  # type: ignore[arg-type]


@pytest.fixture
def srv():
    with FakeLLM(retry_after="0") as s:
        yield s


def test_retry_after_is_honoured(tmp_path: Path) -> None:
    with FakeLLM(retry_after="1") as srv:
        with LLMClient(cfg(srv), tmp_path, "gen") as c:
            [r] = c.run([req(1, "429x2")])
        assert r.ok and r.usage["requests"] == 3 and r.usage["attempts"] == 3
        times = [h.t for h in srv.chat]
        assert [h.status for h in srv.chat] == [429, 429, 200]
        # the client waited the server's Retry-After (1 s) before each retry, not its
        # own backoff (0.01-0.05 s)
        assert times[1] - times[0] >= 0.95 and times[2] - times[1] >= 0.95


def test_retry_after_is_capped(tmp_path: Path) -> None:
    with FakeLLM(retry_after="3600") as srv:
        with LLMClient(cfg(srv, max_retry_after_s=0.2), tmp_path, "gen") as c:
            [r] = c.run([req(1, "429x1")])
        assert r.ok and r.usage["requests"] == 2
        assert srv.chat[1].t - srv.chat[0].t < 30


def test_backoff_is_exponential_with_full_jitter(srv: FakeLLM, tmp_path: Path) -> None:
    c = LLMClient(cfg(srv, backoff_base_s=0.5, backoff_max_s=4.0), tmp_path, "gen")
    for attempt, cap in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (6, 4.0)):
        d = [c.delay(attempt) for _ in range(400)]
        assert min(d) >= 0 and max(d) <= cap
        assert min(d) < cap * 0.1 and max(d) > cap * 0.9  # full jitter: spread over [0, cap]
    assert c.delay(3, {"retry-after-ms": "250"}) == pytest.approx(0.25)


def test_transient_faults_are_retried(srv: FakeLLM, tmp_path: Path) -> None:
    faults = ["500x2", "502x1", "503x1", "timeoutx1"]
    srv.timeout_s = 1.5
    with LLMClient(cfg(srv, timeout_s=0.5), tmp_path, "gen") as c:
        res = c.run([req(i, f) for i, f in enumerate(faults)])
    assert all(r.ok for r in res), [(r.reason, r.detail) for r in res]
    assert [r.usage["requests"] for r in res] == [3, 2, 2, 2]
    assert all(isinstance(r.parsed, Dialogue) for r in res)


def test_reject_reasons(srv: FakeLLM, tmp_path: Path) -> None:
    cases = {
        "500": ("llm_error", 4),            # persistent: max_attempts, then the status
        "400": ("llm_error", 1),            # not retryable
        "invalid": ("llm_invalid_output", 3),  # 1 + max_fix_attempts (2)
        "truncated": ("llm_invalid_output", 3),
        "offschema": ("llm_invalid_output", 3),
        "refusal": ("llm_refusal", 1),
        "refusalfield": ("llm_refusal", 1),
        "empty": ("llm_invalid_output", 1),
    }
    with LLMClient(cfg(srv, max_attempts=4), tmp_path, "gen") as c:
        res = c.run([req(k, k) for k in cases])
    for r, (fault, (reason, n)) in zip(res, cases.items(), strict=True):
        assert not r.ok and r.reason == reason, (fault, r.reason, r.detail)
        assert r.usage["requests"] == n, (fault, r.usage)
    assert "HTTP 500" in (res[0].detail or "") and "4 attempts" in (res[0].detail or "")
    assert "HTTP 400" in (res[1].detail or "")
    assert "cut off" in (res[3].detail or "")


def test_invalid_output_is_fed_back(srv: FakeLLM, tmp_path: Path) -> None:
    seen = []

    def check(d: Dialogue) -> None:
        seen.append(len(d.turns))
        if len(d.turns) != 4:
            raise ValueError(f"{len(d.turns) // 2} rounds, 2 were asked for")

    with LLMClient(cfg(srv), tmp_path, "gen") as c:
        a, b = c.run([req("a", "offschemax1"), req("b", "roundsx1", validate=check)])
    assert a.ok and a.usage["requests"] == 2 and len(a.parsed.turns) == 4
    assert b.ok and b.usage["requests"] == 2 and seen == [6, 4]
    follow_ups = [h.body for h in srv.chat if h.n == 2]
    assert len(follow_ups) == 2
    for body in follow_ups:
        assert body is not None
        msgs = body["messages"]
        assert msgs[-2]["role"] == "assistant" and msgs[-1]["role"] == "user"
        assert "cannot be used" in msgs[-1]["content"]
    texts = " ".join(b["messages"][-1]["content"] for b in follow_ups)  # type: ignore[index]
    assert "turns" in texts and "3 rounds, 2 were asked for" in texts


def test_cache_second_run_sends_nothing(srv: FakeLLM, tmp_path: Path) -> None:
    reqs = [req(i, f) for i, f in enumerate(["", "429x1", "offschemax1", "invalid", ""])]
    with LLMClient(cfg(srv), tmp_path, "gen") as c:
        first = c.run(reqs)
    sent = srv.chat_requests()
    assert sent >= 9
    srv.reset()
    with LLMClient(cfg(srv), tmp_path, "gen") as c:
        again = c.run(reqs)
    assert srv.chat_requests() == 0
    assert [(r.ok, r.reason, r.text) for r in again] == [(r.ok, r.reason, r.text)
                                                         for r in first]
    assert all(r.usage["requests"] == 0 and r.usage["cache_hits"] >= 1 for r in again)
    # the cache key covers the sampling parameters: another seed is another request
    with LLMClient(cfg(srv, seed=7), tmp_path, "gen") as c:
        c.run(reqs[:1])
    assert srv.chat_requests() == 1


def test_identical_requests_in_flight_are_sent_once(srv: FakeLLM, tmp_path: Path) -> None:
    srv.latency_s = 0.2
    with LLMClient(cfg(srv), tmp_path, "gen") as c:
        res = c.run([req("same"), req("same"), req("same")])
    assert srv.chat_requests() == 1
    assert len({r.text for r in res}) == 1 and all(r.ok for r in res)


def test_json_schema_fallback_is_remembered(tmp_path: Path) -> None:
    with FakeLLM(json_schema=False) as srv:
        with LLMClient(cfg(srv), tmp_path, "gen") as c:
            [r] = c.run([req(1)])
        assert r.ok
        assert [h.status for h in srv.chat] == [400, 200]
        assert srv.chat[1].body["response_format"] == {"type": "json_object"}  # type: ignore[index]
        srv.reset()
        with LLMClient(cfg(srv), tmp_path, "gen") as c:  # a new worker: no 400 probe again
            [r1, r2] = c.run([req(1), req(2)])
        assert r1.ok and r2.ok and [h.status for h in srv.chat] == [200]
    with FakeLLM(json_schema=False, json_object=False) as srv:
        with LLMClient(cfg(srv), tmp_path / "plain", "gen") as c:
            [r] = c.run([req(1)])
        assert r.ok and [h.status for h in srv.chat] == [400, 400, 200]
        assert "response_format" not in srv.chat[2].body  # type: ignore[operator]
        assert "JSON schema" in srv.chat[2].body["messages"][-1]["content"]  # type: ignore[index]


def test_auth_failure_stops(tmp_path: Path) -> None:
    with FakeLLM(api_key="right-key") as srv:
        os.environ["SPEECHMILL_TEST_WRONG_KEY"] = "wrong-key-123"
        try:
            with LLMClient(cfg(srv, api_key_env="SPEECHMILL_TEST_WRONG_KEY"), tmp_path,
                           "gen") as c, pytest.raises(LLMUnavailable) as e:
                c.run([req(1), req(2)])
        finally:
            del os.environ["SPEECHMILL_TEST_WRONG_KEY"]
        assert "401" in str(e.value) and "SPEECHMILL_TEST_WRONG_KEY" in str(e.value)
        assert "wrong-key-123" not in str(e.value)


def test_concurrency_is_bounded(srv: FakeLLM, tmp_path: Path) -> None:
    srv.latency_s = 0.15
    with LLMClient(cfg(srv, concurrency=3), tmp_path, "gen") as c:
        res = c.run([req(i) for i in range(12)])
    assert all(r.ok for r in res)
    assert srv.max_in_flight == 3


def test_rate_limit_is_shared_by_clients(srv: FakeLLM, tmp_path: Path) -> None:
    """Two clients on one cache directory (two workers of a stage) share 240 requests
    a minute (4 a second, 1 s of burst): 12 requests take about 2 s, whoever sends."""
    conf = cfg(srv, requests_per_minute=240)
    clients = [LLMClient(conf, tmp_path, "gen") for _ in range(2)]
    threads = [threading.Thread(target=c.run, args=([req(f"{k}-{i}") for i in range(6)],))
               for k, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    times = sorted(h.t for h in srv.chat)
    assert len(times) == 12
    assert times[-1] - times[0] >= 1.7  # (12 - 4 burst) / 4 per s = 2 s
    # never more than burst + rate x window in any window
    for i, t0 in enumerate(times):
        in_1s = sum(1 for t in times[i:] if t - t0 < 1.0)
        assert in_1s <= 4 + 4 + 1


def test_budget_stops_and_resumes(srv: FakeLLM, tmp_path: Path) -> None:
    prices = {"fake-model": {"input_per_1m": 1000.0, "output_per_1m": 1000.0}}
    # each request: ~20 prompt tokens + max_tokens 200 at most = 0.22 USD worst case;
    # an answer costs about 0.15 USD
    tight = cfg(srv, prices=prices, max_tokens=200, max_cost_usd=0.6, concurrency=1)
    reqs = [req(i) for i in range(8)]
    with LLMClient(tight, tmp_path, "gen") as c, pytest.raises(BudgetExceeded) as e:
        c.run(reqs)
    assert "max_cost_usd" in str(e.value) and "gen" in str(e.value)
    paid = srv.chat_requests()
    assert 1 <= paid < 8
    with LLMClient(tight, tmp_path, "gen") as c:
        spent = c.spent()
    assert spent["requests"] == paid and spent["cost_usd"] <= 0.6
    srv.reset()
    bigger = cfg(srv, prices=prices, max_tokens=200, max_cost_usd=100.0, concurrency=1)
    with LLMClient(bigger, tmp_path, "gen") as c:
        res = c.run(reqs)
        assert c.spent()["requests"] == 8
    assert all(r.ok for r in res)
    assert srv.chat_requests() == 8 - paid  # answered work is not asked again
    assert sum(r.usage["cache_hits"] for r in res) == paid


def test_token_budget(srv: FakeLLM, tmp_path: Path) -> None:
    with LLMClient(cfg(srv, max_tokens=100, max_total_tokens=50), tmp_path, "gen") as c, \
            pytest.raises(BudgetExceeded, match="max_total_tokens"):
        c.run([req(1)])
    assert srv.chat_requests() == 0


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="needs a price"):
        LLMConfig(model="m", max_cost_usd=1.0).check()
    with pytest.raises(ValueError, match="output_per_1m"):
        LLMConfig(model="m", prices={"m": {"input_per_1m": 1.0}})
    e = estimate(LLMConfig(model="m", prices={"*": {"input_per_1m": 2.0,
                                                    "output_per_1m": 4.0}}), 1000, 500, 250)
    assert e["requests"] == 1000 and e["total_tokens"] == 750_000
    assert e["cost_usd"] == pytest.approx(0.5 * 2 + 0.25 * 4)


def test_batch_api(srv: FakeLLM, tmp_path: Path) -> None:
    conf = cfg(srv, batch_api=True, batch_poll_s=0.05, max_attempts=3)
    reqs = [req(0), req(1, "offschemax1"), req(2, "500"), req(3, "500x1"), req(4, "refusal")]
    with LLMClient(conf, tmp_path, "gen") as c:
        res = c.run(reqs)
    assert [(r.ok, r.reason) for r in res] == [
        (True, None), (True, None), (False, "llm_error"), (True, None), (False, "llm_refusal")]
    assert "batch API" in (res[2].detail or "") and "HTTP 500" in (res[2].detail or "")
    assert srv.hits["/v1/chat/completions"] == 0  # everything went through batches
    # round 1: all five; round 2: the fixed answer and the two 500s; round 3: the last 500
    assert len(srv.batches) == 3 and srv.hits["/v1/files"] == 3
    assert not list((tmp_path / "_batches").glob("*.json"))  # collected: bookkeeping gone
    srv.reset()
    with LLMClient(conf, tmp_path, "gen") as c:
        again = c.run([reqs[0], reqs[1], reqs[3]])
    assert all(r.ok for r in again) and srv.stats()["hits"] == {}


_BATCH_CLIENT = """
import sys
from tests.synth.test_llm_client import req, Dialogue
from speechmill.synth.llm.client import LLMClient
from speechmill.synth.llm.config import LLMConfig
conf = LLMConfig(base_url=sys.argv[1], model="fake-model", batch_api=True, batch_poll_s=0.05,
                 api_key_env="SPEECHMILL_TEST_NO_KEY")
LLMClient(conf, sys.argv[2], "gen").run([req(i) for i in range(4)])
print("finished")
"""


def test_batch_resumes_polling_after_sigkill(tmp_path: Path) -> None:
    """A client killed while its batch runs: the next one polls the same batch instead
    of submitting (and paying for) the requests again."""
    with FakeLLM(batch_polls=10**9) as srv:  # the batch never finishes while polled
        p = subprocess.Popen([sys.executable, "-c", _BATCH_CLIENT, srv.base_url,
                              str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(
                    b["_polls"] >= 2 for b in srv.batches.values()):
                time.sleep(0.05)
            assert len(srv.batches) == 1, p.stdout.read() if p.poll() is not None else ""
        finally:
            p.kill()
            p.wait()
        state = list((tmp_path / "_batches").glob("*.json"))
        assert len(state) == 1 and json.loads(state[0].read_text())["batch_id"] == \
            next(iter(srv.batches))
        srv.batch_polls = 0
        conf = LLMConfig(base_url=srv.base_url, model="fake-model", batch_api=True,
                         batch_poll_s=0.05, api_key_env="SPEECHMILL_TEST_NO_KEY")
        with LLMClient(conf, tmp_path, "gen") as c:
            res = c.run([req(i) for i in range(4)])
        assert all(r.ok for r in res)
        assert len(srv.batches) == 1 and srv.hits["/v1/files"] == 1  # not resubmitted
        assert sum(r.usage["requests"] for r in res) == 4


def test_token_bucket_waits_and_settles(tmp_path: Path) -> None:
    """tokens_per_minute 600 = 10 tokens a second, 1 s of burst: a 10-token request
    passes, the next waits about a second; a refund (the server used fewer tokens than
    estimated) lets the one after that pass at once."""
    import asyncio

    from speechmill.synth.llm.budget import RateLimiter

    lim = RateLimiter(tmp_path / "_ratelimit.json", None, 600)

    async def go() -> list[float]:
        out = []
        for i in range(3):
            t0 = time.monotonic()
            await lim.acquire(10)
            out.append(time.monotonic() - t0)
            if i == 1:
                lim.settle(10, 0)
        return out

    waits = asyncio.run(go())
    assert waits[0] < 0.5 and 0.8 <= waits[1] < 3.0 and waits[2] < 0.5
