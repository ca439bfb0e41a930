"""A service that fails is not bad data: its rejects are *transient*.

Transient rejects count toward the stage's error budget (an endpoint down for every row
fails the run, with the cause in the message) and are never final: a plain rerun once
the service answers retries them and carries what they make downstream."""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from speechmill.pipeline.errors import StageFailedError
from speechmill.pipeline.store import RunStore
from testkit.fake_llm import FakeLLM
from tests.synth.test_dialogue_generate import KEY, KEY_ENV, dag_dict, run_dag


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _llm_on(port: int, **kw: Any) -> FakeLLM:
    """The fake LLM server, listening on ``port`` (where the DAG expects it)."""
    return FakeLLM(api_key=KEY, port=port, **kw)


class _Endpoint:
    base_url = ""


def _dag(run_dir: Path, port: int, topics: list[str]) -> dict[str, Any]:
    ep = _Endpoint()
    ep.base_url = f"http://127.0.0.1:{port}/v1"
    d = dag_dict(run_dir, ep, topics=topics, count=len(topics), min_turns=1, max_turns=1,
                 llm={"max_attempts": 2, "timeout_s": 5})
    d["stages"].append({"id": "rewrite", "uses": "speech_rewrite", "needs": ["gen"],
                        "with": {"mode": "rules"}})
    return d


def test_endpoint_down_for_every_row_fails_the_run_and_a_rerun_makes_the_rows(
        tmp_path: Path) -> None:
    port = _free_port()  # nothing listens: every request is refused
    topics = [f"subject number {i}" for i in range(25)]
    d = _dag(tmp_path / "run", port, topics)
    with pytest.raises(StageFailedError) as ei:
        run_dag(d)
    msg = str(ei.value)
    assert "stage 'gen'" in msg and "every row failed" in msg  # stopped early, maybe
    assert "llm_error (transient)" in msg and "connect" in msg.lower()  # the cause
    store = RunStore(tmp_path / "run")
    run = json.loads((tmp_path / "run/run.json").read_text())
    assert run["status"] == "failed" and "llm_error" in run["error"]
    rej = store.read_rejects("gen").to_pylist()
    assert len(rej) >= 20 and {r["kind"] for r in rej} == {"transient"}
    assert f"{len(rej)} of {len(rej)} rows failed" in msg
    assert not store.is_done("gen")

    with _llm_on(port) as srv:  # the endpoint is back: a plain rerun makes every row
        res, out = run_dag(d)
        sent = srv.chat_requests()
    assert res.status == "succeeded"
    assert sent == 25
    assert f"retrying {len(rej)} rows" in out
    assert store.read_rejects("gen").num_rows == 0
    dialogues = {r["dialogue_id"] for r in store.read_outputs("gen").to_pylist()}
    assert len(dialogues) == 25
    assert store.is_done("gen") and store.is_done("rewrite")
    _rewrote_every_turn(store)


def _rewrote_every_turn(store: RunStore) -> None:
    turns = {r["id"] for r in store.read_outputs("gen", ["id"]).to_pylist()}
    done = {r["parent_id"] for r in store.read_outputs("rewrite", ["parent_id"]).to_pylist()}
    done |= {r["id"] for r in store.read_rejects("rewrite", ["id"]).to_pylist()}
    assert turns and done == turns


def test_a_few_transient_rejects_leave_the_stage_open_until_a_rerun(tmp_path: Path) -> None:
    port = _free_port()
    topics = [f"subject number {i}" for i in range(24)]
    topics[3] += " [[fault:503x2]]"  # both attempts of the first run get 503
    topics[7] += " [[fault:400]]"  # a bad request: the row's own fault, final
    d = _dag(tmp_path / "run", port, topics)
    with _llm_on(port, retry_after="0") as srv:
        res, out = run_dag(d)
        assert res.status == "succeeded"
        store = RunStore(tmp_path / "run")
        kinds = Counter((r["reason"], r["kind"]) for r in store.read_rejects("gen").to_pylist())
        assert kinds == {("llm_error", "transient"): 1, ("llm_error", "data"): 1}
        assert not store.is_done("gen") and not store.is_done("rewrite")
        states = {s["stage"]: s["state"] for s in res.stages}
        assert states == {"gen": "incomplete", "rewrite": "incomplete"}
        assert "1 transient" in out and "rerun the same command" in out
        first = srv.chat_requests()

        res, out = run_dag(d)  # the 503s are over: only the transient row is asked again
        assert srv.chat_requests() == first + 1
    assert res.status == "succeeded"
    assert [r["reason"] for r in store.read_rejects("gen").to_pylist()] == ["llm_error"]
    assert store.is_done("gen") and store.is_done("rewrite")
    assert len({r["dialogue_id"] for r in store.read_outputs("gen").to_pylist()}) == 23
    _rewrote_every_turn(store)


def test_a_row_that_keeps_failing_is_final_after_transient_retries(tmp_path: Path) -> None:
    port = _free_port()
    topics = [f"subject number {i}" for i in range(4)]
    topics[1] += " [[fault:503]]"  # down for this row on every request
    d = _dag(tmp_path / "run", port, topics)
    d["executor"]["transient_retries"] = 1
    store = RunStore(tmp_path / "run")
    with _llm_on(port, retry_after="0") as srv:
        res, _ = run_dag(d)
        assert [s["state"] for s in res.stages] == ["incomplete", "incomplete"]
        n = srv.chat_requests()
        res, out = run_dag(d)  # the one retry: the row fails again and is final now
        assert "retrying 1 rows" in out
        assert srv.chat_requests() == n + 2  # max_attempts 2
        assert [s["state"] for s in res.stages] == ["done", "done"]
        assert store.is_done("gen") and store.is_done("rewrite")
        rej = store.read_rejects("gen").to_pylist()
        assert [(r["reason"], r["kind"]) for r in rej] == [("llm_error", "transient")]
        res, _ = run_dag(d)  # nothing left to do
        assert srv.chat_requests() == n + 2
        assert [s["state"] for s in res.stages] == ["done earlier", "done earlier"]


@pytest.mark.ray
def test_endpoint_down_on_ray_fails_then_a_rerun_makes_the_rows(tmp_path: Path) -> None:
    """The same on the Ray executor, through the CLI: its workers write the transient
    rejects and its stats feed the budget (exit 1 with the cause). Which rows a rerun
    retries is decided by the driver before any executor runs, the same code on both, so
    the rerun (once the endpoint answers) runs on the local executor: one Ray start less."""
    import os
    import subprocess
    import sys

    import yaml

    port = _free_port()
    topics = [f"subject number {i}" for i in range(20)]
    d = _dag(tmp_path / "run", port, topics)
    d["stages"] = d["stages"][:1]
    d["executor"] = {"type": "ray", "num_cpus": 2, "progress": False,
                     "stall_timeout_s": 300}
    dag_file = tmp_path / "dag.yaml"
    dag_file.write_text(yaml.safe_dump(d))
    cmd = [str(Path(sys.executable).with_name("speechmill")), "run", str(dag_file),
           "--no-progress"]
    env = {**os.environ, KEY_ENV: KEY}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "llm_error (transient)" in r.stdout + r.stderr
    store = RunStore(tmp_path / "run")
    assert {x["kind"] for x in store.read_rejects("gen").to_pylist()} == {"transient"}
    with _llm_on(port) as srv:
        r = subprocess.run([*cmd, "--executor", "local"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        assert srv.chat_requests() == 20
    assert store.read_rejects("gen").num_rows == 0
    assert len({x["dialogue_id"] for x in store.read_outputs("gen").to_pylist()}) == 20
    assert store.is_done("gen")
