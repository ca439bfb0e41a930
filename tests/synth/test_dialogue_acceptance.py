"""Acceptance: 1,000 dialogues against the fake LLM server with 10 % transient faults.

Every transient fault (429 with Retry-After, 500, 503, a timeout, invalid, off-schema or
truncated JSON, a wrong round count) succeeds on retry; a few persistent faults are
scripted too and are the only rejects. A rerun sends no request, and redoing the whole
stage (``--restart-from``) rebuilds the same dialogues from the cache, asking again only
what never got an answer.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from speechmill.pipeline import dag as dagmod
from speechmill.pipeline import runner
from speechmill.pipeline.store import RunStore
from testkit.fake_llm import FakeLLM

TRANSIENT = ["429x1", "500x1", "503x1", "timeoutx1", "invalidx1", "offschemax1",
             "truncatedx1", "roundsx1", "429x1,500x1", "500x1,offschemax1"]
PERSISTENT = {"500": "llm_error", "refusal": "llm_refusal", "invalid": "llm_invalid_output",
              "refusalfield": "llm_refusal"}
N = 1000
ATTEMPTS = 5  # transient faults need 2-3; the rest is slack for a loaded test machine


def topics() -> tuple[list[str], Counter[str]]:
    out: list[str] = []
    expected: Counter[str] = Counter()
    copies = 0
    for k in range(N):
        fault = ""
        if k % 10 == 3:  # 10 %: transient
            fault = TRANSIENT[(k // 10) % len(TRANSIENT)]
        elif k % 100 in (7, 17, 27, 37):  # 4 %: persistent, the test knows the outcome
            kind = list(PERSISTENT)[(k // 100) % len(PERSISTENT)]
            fault = kind
            expected[PERSISTENT[kind]] += 1
        elif k % 250 == 9:  # four identical dialogues: three near-duplicates
            fault = "copy"
            copies += 1
        out.append(f"topic {k}" + (f" [[fault:{fault}]]" if fault else ""))
    expected["near_duplicate"] = copies - 1
    return out, expected


def run(d: dict[str, Any], **kw: Any) -> runner.RunResult:
    from rich.console import Console

    return runner.run(dagmod.loads(yaml.safe_dump(d)), progress=False,
                      console=Console(file=io.StringIO()), **kw)


def test_thousand_dialogues_with_faults(tmp_path: Path) -> None:
    tlist, expected = topics()
    with FakeLLM(retry_after=None, retry_after_ms="5", timeout_s=3.0) as srv:
        d = {"name": "accept", "run_dir": str(tmp_path / "run"),
             "executor": {"type": "local", "progress": False},
             "stages": [{"id": "gen", "uses": "dialogue_generate", "batch_size": 250,
                         "with": {"topics": tlist, "count": N, "min_turns": 2,
                                  "max_turns": 2, "seed": 1,
                                  "llm": {"base_url": srv.base_url, "model": "fake",
                                          "api_key_env": "SPEECHMILL_TEST_NO_KEY",
                                          "concurrency": 32, "timeout_s": 2.0,
                                          "max_attempts": ATTEMPTS,
                                          "backoff_base_s": 0.005,
                                          "backoff_max_s": 0.02}}}]}
        res = run(d)
        assert res.status == "succeeded"
        first_requests = srv.chat_requests()
        store = RunStore(tmp_path / "run")
        outs = store.read_outputs("gen", ["id", "dialogue_id", "round", "text"])
        rejects = store.read_rejects("gen", ["id", "reason", "detail"]).to_pylist()
        dialogues = set(outs.column("dialogue_id").to_pylist())
        assert len(dialogues) + len(rejects) == N
        assert len({r["id"] for r in rejects} | dialogues) == N
        assert Counter(r["reason"] for r in rejects) == expected, rejects[:5]
        ids = outs.column("id").to_pylist()
        assert len(ids) == len(set(ids)) == 4 * len(dialogues)  # zero duplicates
        by_dlg: dict[str, list[str]] = {}
        for did, text in zip(outs.column("dialogue_id").to_pylist(),
                             outs.column("text").to_pylist(), strict=True):
            by_dlg.setdefault(did, []).append(text)
        assert len({"\n".join(sorted(v)) for v in by_dlg.values()}) == len(by_dlg)
        # every transient fault was retried: 10 % of requests failed at least once
        assert first_requests > N + N // 10

        # the persistent 500s are transient rejects (the service failed, not the row):
        # a plain rerun asks again for those rows only, nothing answered is asked again
        transient = [r for r in store.read_rejects("gen", ["id", "kind"]).to_pylist()
                     if r["kind"] == "transient"]
        assert len(transient) == expected["llm_error"]
        srv.reset()
        res = run(d)
        assert res.status == "succeeded" and res.stages[0]["state"] == "incomplete"
        assert srv.answered_keys() == Counter()
        assert srv.chat_requests() == ATTEMPTS * expected["llm_error"]
        srv.reset()
        res = run(d, restart="gen")  # the whole stage again: answered from the cache
        assert res.status == "succeeded"
        # ... except the requests that never got an answer (the persistent 500s: errors
        # are not cached, a new attempt may succeed); nothing answered is asked again
        assert srv.answered_keys() == Counter()
        assert srv.chat_requests() == ATTEMPTS * expected["llm_error"]
        again = store.read_outputs("gen", ["id", "text"])
        assert sorted(zip(*again.to_pydict().values(), strict=True)) == sorted(
            zip(outs.column("id").to_pylist(), outs.column("text").to_pylist(),
                strict=True))
        assert Counter(r["reason"] for r in store.read_rejects("gen").to_pylist()) == \
            expected
