"""The ``dialogue_generate`` source stage, end to end against the fake LLM server."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from speechmill.pipeline import dag as dagmod
from speechmill.pipeline import runner
from speechmill.pipeline.errors import ConfigError, SpeechmillError
from speechmill.pipeline.store import RunStore
from speechmill.synth.llm.config import LLMConfig
from speechmill.synth.text.dialogue_generate import (
    DialogueGenerate,
    DialogueGenerateConfig,
    plan_rows,
)
from testkit.fake_llm import FakeLLM, kill_run_while_held
from testkit.http_faults import find_pieces, leaked_files

REPO = Path(__file__).resolve().parents[2]
SPEECHMILL = str(Path(sys.executable).with_name("speechmill"))
KEY_ENV = "SPEECHMILL_TEST_LLM_KEY"
# distinctive and long (48 characters): no 8-character piece of it may be written anywhere
KEY = "sk-proj-Zq7XvK2mW9pL4nR8sT1uY6aB3cD5eF7gH9jK0mN2"


def dag_dict(run_dir: Path, srv: FakeLLM, *, batch_size: int = 8, **with_: Any
             ) -> dict[str, Any]:
    llm = {"base_url": srv.base_url, "model": "fake-model", "backoff_base_s": 0.01,
           "backoff_max_s": 0.05, "api_key_env": KEY_ENV, **with_.pop("llm", {})}
    w = {"count": 10, "min_turns": 1, "max_turns": 3, "llm": llm, **with_}
    return {"name": "dialogues", "run_dir": str(run_dir),
            "executor": {"type": "local", "progress": False},
            "stages": [{"id": "gen", "uses": "dialogue_generate", "batch_size": batch_size,
                        "with": w}]}


def run_dag(d: dict[str, Any], **kw: Any) -> tuple[runner.RunResult, str]:
    from rich.console import Console

    buf = io.StringIO()
    res = runner.run(dagmod.loads(yaml.safe_dump(d)), progress=False,
                     console=Console(file=buf, width=200), **kw)
    return res, buf.getvalue()


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def assert_key_nowhere(run_dir: Path, *texts: str, key: str = KEY) -> None:
    """No 8-character piece of ``key`` in any file under ``run_dir`` (rejects, run.json,
    dag.yaml, metrics, caches) or in ``texts`` (console output, logs, messages)."""
    hits = leaked_files(run_dir, key)
    assert not hits, f"pieces of the API key were written to {hits}"
    found = find_pieces(key, *texts)
    assert not found, f"pieces of the API key were printed: {found}"


def test_plan_from_files(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({
        "topics": ["baking bread", {"topic": "booking a flight", "persona": "a nervous "
                                    "first-time flyer"}, "repairing a bike"],
        "personas": ["a student", "a retired teacher"],
        "styles": ["hurried", "chatty"]}))
    (tmp_path / "t.jsonl").write_text('{"topic": "gardening", "instruction": "mention '
                                      'tomatoes"}\n"stargazing"\n')
    (tmp_path / "t.csv").write_text("topic,style\nchess,formal\nsurfing,\n")
    llm = LLMConfig(model="m")
    for name in ("t.yaml", "t.jsonl", "t.csv"):
        cfg = DialogueGenerateConfig(topics=str(tmp_path / name), count=12, min_turns=2,
                                     max_turns=4, seed=3, llm=llm)
        rows = plan_rows(cfg)
        assert rows == plan_rows(cfg)  # deterministic
        assert len({r["id"] for r in rows}) == 12
        assert all(len(r["id"]) == 16 and "-" not in r["id"] for r in rows)
        assert all(2 <= r["rounds"] <= 4 for r in rows)
        per_topic = Counter(r["topic"] for r in rows)
        assert max(per_topic.values()) - min(per_topic.values()) <= 1  # topics evenly
    yaml_rows = plan_rows(DialogueGenerateConfig(topics=str(tmp_path / "t.yaml"), count=12,
                                                 llm=llm))
    assert {r["persona"] for r in yaml_rows if r["topic"] == "booking a flight"} == {
        "a nervous first-time flyer"}
    assert {r["persona"] for r in yaml_rows} >= {"a student", "a retired teacher"}
    assert {r["style"] for r in yaml_rows} == {"hurried", "chatty"}
    jsonl = plan_rows(DialogueGenerateConfig(topics=str(tmp_path / "t.jsonl"), count=2,
                                             llm=llm))
    assert {r["instruction"] for r in jsonl} == {"mention tomatoes", None}
    other_seed = plan_rows(DialogueGenerateConfig(topics=str(tmp_path / "t.yaml"), count=12,
                                                  seed=4, llm=llm))
    assert {r["id"] for r in other_seed}.isdisjoint({r["id"] for r in yaml_rows})


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with FakeLLM() as srv:
        bad = dag_dict(tmp_path / "a", srv, topics=["x"], min_turns=4, max_turns=2)
        with pytest.raises(ConfigError, match="min_turns"):
            dagmod.loads(yaml.safe_dump(bad))
        bad = dag_dict(tmp_path / "b", srv, topics=["x"], llm={"max_cost_usd": 1.0})
        with pytest.raises(ConfigError, match="max_cost_usd"):
            dagmod.loads(yaml.safe_dump(bad))
        missing = dag_dict(tmp_path / "c", srv, topics=str(tmp_path / "nope.yaml"))
        with pytest.raises(ConfigError, match="gen"):
            run_dag(missing)


def test_dialogues_rejects_and_summary(tmp_path: Path) -> None:
    topics = ["cooking pasta", "a trip to Rome", "fixing a bike [[fault:500]]",
              "jazz [[fault:copy]]", "blues [[fault:copy]]", "taxes [[fault:refusal]]",
              "moving house [[fault:offschemax1]]", "birds [[fault:dull]]",
              "phones [[fault:pii]]", "chess [[fault:429x1,invalidx1]]"]
    with FakeLLM(retry_after="0", api_key=KEY, echo_auth=True) as srv:
        d = dag_dict(tmp_path / "run", srv, topics=topics, count=10, min_turns=2,
                     max_turns=2, llm={"max_attempts": 2, "seed": 100},
                     qc={"pii": "reject"},
                     judge={"llm": {"base_url": srv.base_url, "model": "judge-model",
                                    "api_key_env": KEY_ENV}},
                     dialogue_system_prompt="You are a helpful voice assistant.")
        res, out = run_dag(d)
        sent = srv.chat_requests()
    assert res.status == "succeeded"
    store = RunStore(tmp_path / "run")
    rows = store.read_outputs("gen").to_pylist()
    rejects = store.read_rejects("gen").to_pylist()
    reasons = Counter(r["reason"] for r in rejects)
    assert reasons == {"llm_error": 1, "near_duplicate": 1, "llm_refusal": 1,
                       "qc_judge": 1, "qc_pii": 1}
    # 500 after every retry: the service failed, not the topic (a rerun retries it)
    assert {r["reason"]: r["kind"] for r in rejects} == {
        "llm_error": "transient", "near_duplicate": "data", "llm_refusal": "data",
        "qc_judge": "data", "qc_pii": "data"}
    # the server echoed the key in a long 500 body: the detail keeps the error, not the key
    err = next(r for r in rejects if r["reason"] == "llm_error")
    assert "HTTP 500" in err["detail"] and "<red" in err["detail"]  # cut after redaction
    dialogues: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        dialogues.setdefault(r["dialogue_id"], []).append(r)
    assert len(dialogues) == 5  # pasta, Rome, one of the copies, moving house, chess
    plan = {p["id"]: p for p in plan_rows(DialogueGenerateConfig(**d["stages"][0]["with"]))}
    for did, turns in dialogues.items():
        turns.sort(key=lambda r: r["round"])
        assert [t["role"] for t in turns] == ["user", "assistant"] * 2
        assert [t["id"] for t in turns] == [f"{did}-{i:03d}" for i in range(4)]
        assert all(t["parent_id"] == did and t["n_rounds"] == 4 for t in turns)
        assert all(t["system"] == "You are a helpful voice assistant." for t in turns)
        assert turns[0]["topic"] == plan[did]["topic"]
        src = json.loads(turns[0]["source"])
        assert src["model"] == "fake-model" and src["seed"] == 100 + plan[did]["index"]
        assert len(src["prompt_version"]) == 12
        assert turns[0]["llm_requests"] >= 1
        assert all(json.loads(t["judge"])["coherence"] == 5 for t in turns)
        assert all(t["llm_requests"] is None for t in turns[1:])
    # usage: committed rows and reject details add up to what the server saw
    summary = json.loads((tmp_path / "run/stages/gen/metrics.json").read_text())[
        "stage_summary"]
    assert summary["dialogues"] == 5 and summary["turns"] == 20
    assert summary["llm"]["requests"] == sent
    # the two copies ask the judge the same question: one request, one shared answer
    assert summary["llm"]["prompt_tokens"] > 0 and summary["llm"]["cache_hits"] == 1
    assert f"LLM: {sent} requests sent, 1 cache hits" in out
    assert_key_nowhere(tmp_path / "run", out)


def test_sigkill_mid_stage_then_resume(tmp_path: Path) -> None:
    """``speechmill run`` killed with SIGKILL after two batches are committed and while
    the third has two answers cached and two requests in flight; the resumed run sends
    no request the server already answered, and produces every dialogue exactly once."""
    run_dir = tmp_path / "run"
    topics = [f"topic number {i} of the test" for i in range(40)]
    with FakeLLM(hold_after=10, api_key=KEY) as srv:
        d = dag_dict(run_dir, srv, batch_size=4, topics=topics, count=40,
                     llm={"concurrency": 2})
        dag_file = tmp_path / "dag.yaml"
        dag_file.write_text(yaml.safe_dump(d))
        cmd = [SPEECHMILL, "run", str(dag_file), "--no-progress"]
        env = {**os.environ, KEY_ENV: KEY}
        out1, err1 = kill_run_while_held(srv, cmd, tmp_path, env, run_dir, "gen")
        answered_before = srv.answered_keys()
        assert sum(answered_before.values()) == 10
        srv.drop_held = True  # the held requests die with their client
        srv.release()
        srv.hold_after = None
        time.sleep(0.2)
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        answered = srv.answered_keys()
    assert max(answered.values()) == 1, "a request answered before the kill was sent again"
    assert sum(answered.values()) == 40
    store = RunStore(run_dir)
    rows = store.read_outputs("gen", ["id", "dialogue_id", "round", "llm_requests",
                                      "llm_cache_hits"]).to_pylist()
    assert store.read_rejects("gen").num_rows == 0
    assert len({r["dialogue_id"] for r in rows}) == 40
    assert len({r["id"] for r in rows}) == len(rows)
    first = [r for r in rows if r["round"] == 0]
    assert sum(r["llm_cache_hits"] for r in first) == 2  # answered, not committed
    assert sum(r["llm_requests"] for r in first) == 38
    assert_key_nowhere(run_dir, out1, err1, r.stdout, r.stderr)


def test_budget_stops_the_stage(tmp_path: Path) -> None:
    prices = {"fake-model": {"input_per_1m": 1000.0, "output_per_1m": 1000.0}}
    topics = [f"subject {i}" for i in range(12)]
    with FakeLLM() as srv:
        d = dag_dict(tmp_path / "run", srv, batch_size=4, topics=topics, count=12,
                     min_turns=1, max_turns=1, llm={"prices": prices, "max_tokens": 200,
                                                    "max_cost_usd": 1.2, "concurrency": 1})
        with pytest.raises(SpeechmillError, match="max_cost_usd"):
            run_dag(d)
        paid = srv.chat_requests()
        assert 0 < paid < 12
        store = RunStore(tmp_path / "run")
        assert store.read_rejects("gen").num_rows == 0  # stopped, nothing rejected
        done = len({r["dialogue_id"] for r in store.read_outputs("gen").to_pylist()})
        assert done < paid or done == paid
        # what was paid for is cached: redoing the stage with a bigger budget pays only
        # for the rest
        srv.reset()
        d["stages"][0]["with"]["llm"]["max_cost_usd"] = 100.0
        res, _ = run_dag(d, restart="gen")
        assert res.status == "succeeded"
        assert srv.chat_requests() == 12 - paid
        assert len({r["dialogue_id"] for r in store.read_outputs("gen").to_pylist()}) == 12


def test_budget_resume_with_bigger_budget(tmp_path: Path) -> None:
    prices = {"fake-model": {"input_per_1m": 1000.0, "output_per_1m": 1000.0}}
    with FakeLLM() as srv:
        d = dag_dict(tmp_path / "run", srv, batch_size=2, topics=["a", "b"], count=8,
                     min_turns=1, max_turns=1, llm={"prices": prices, "max_tokens": 200,
                                                    "max_cost_usd": 1.2, "concurrency": 1})
        with pytest.raises(SpeechmillError, match="max_cost_usd"):
            run_dag(d)
        assert RunStore(tmp_path / "run").output_parts("gen")  # a batch was committed
        d["stages"][0]["with"]["llm"]["max_cost_usd"] = 100.0
        res, _ = run_dag(d)
        assert res.status == "succeeded"


def test_dry_run(tmp_path: Path) -> None:
    with FakeLLM() as srv:
        d = dag_dict(tmp_path / "run", srv, topics=["a", "b", "c"], count=6, min_turns=2,
                     max_turns=2, llm={"prices": {"*": {"input_per_1m": 1.0,
                                                        "output_per_1m": 2.0}}})
        cfg = DialogueGenerateConfig(**d["stages"][0]["with"])
        est = DialogueGenerate.dry_run(cfg)
        assert srv.chat_requests() == 0
        assert est["requests"] == 6 and est["dialogues"] == 6 and est["cached"] == 0
        assert est["prompt_tokens"] > 6 * 50
        assert 0 < est["cost_usd"] < est["cost_usd_max"]
        res, _ = run_dag(d)
        assert res.status == "succeeded"
        again = DialogueGenerate.dry_run(cfg, run_dir=tmp_path / "run", stage_id="gen")
        assert again["cached"] == 6 and again["requests"] == 0 and again["cost_usd"] == 0


def test_bundled_generate_dag_with_rules_rewrite(tmp_path: Path) -> None:
    """dags/dialogues_generate.yaml (dialogue_generate -> speech_rewrite rules) pointed
    at the fake server through --set and the environment, as a user points it at vLLM."""
    from rich.console import Console

    with FakeLLM(api_key=KEY) as srv:
        dag = dagmod.load(REPO / "dags/dialogues_generate.yaml", overrides=[
            f"gen.topics={REPO / 'dags/data/dialogue_topics.yaml'}",
            f"gen.llm.api_key_env={KEY_ENV}", "gen.count=6"],
            env={**os.environ, "OPENAI_BASE_URL": srv.base_url, "LLM_MODEL": "fake-model"},
            run_dir=str(tmp_path / "run"))
        os.environ["OPENAI_BASE_URL"] = srv.base_url  # what the client reads at run time
        try:
            res = runner.run(dag, progress=False, console=Console(file=io.StringIO()))
        finally:
            del os.environ["OPENAI_BASE_URL"]
        assert res.status == "succeeded"
        assert srv.chat_requests() == 6
    store = RunStore(tmp_path / "run")
    gen = store.read_outputs("gen", ["dialogue_id"]).column("dialogue_id").to_pylist()
    out = store.read_outputs("rewrite").to_pylist()
    assert len(set(gen)) == 6 and {r["dialogue_id"] for r in out} == set(gen)
    assert all(r["est_seconds"] > 0 for r in out)
    assert_key_nowhere(tmp_path / "run")


@pytest.mark.ray
@pytest.mark.slow
def test_ray_workers_share_claims_and_ledger(tmp_path: Path) -> None:
    """On Ray (two worker processes) near-duplicates produced by different workers are
    still caught (the claims file is shared) and each worker records its own spend."""
    topics = [f"errand {i}" for i in range(18)] + [f"copy {i} [[fault:copy]]"
                                                    for i in range(6)]
    with FakeLLM(api_key=KEY, latency_s=0.05) as srv:
        d = dag_dict(tmp_path / "run", srv, batch_size=2, topics=topics, count=24,
                     min_turns=2, max_turns=2)
        d["executor"] = {"type": "ray", "num_cpus": 2, "progress": False,
                         "stall_timeout_s": 300}
        dag_file = tmp_path / "dag.yaml"
        dag_file.write_text(yaml.safe_dump(d))
        env = {**os.environ, KEY_ENV: KEY}
        cmd = [SPEECHMILL, "run", str(dag_file), "--no-progress"]
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        assert srv.chat_requests() == 24
    store = RunStore(tmp_path / "run")
    rejects = store.read_rejects("gen").to_pylist()
    assert Counter(x["reason"] for x in rejects) == {"near_duplicate": 5}
    rows = store.read_outputs("gen", ["id", "dialogue_id"]).to_pylist()
    assert len({x["dialogue_id"] for x in rows}) == 19 and len({x["id"] for x in rows}) == 76
    ledgers = list((tmp_path / "run/cache/llm/gen/_spend").glob("*.json"))
    assert len({p.name.rsplit("-", 2)[1] for p in ledgers}) >= 2  # pids: several workers
    assert sum(json.loads(p.read_text())["requests"] for p in ledgers) == 24
    assert_key_nowhere(tmp_path / "run", r.stdout, r.stderr)


def test_cli_dry_run_estimates_cost_and_sends_nothing(tmp_path: Path) -> None:
    """`speechmill run --dry-run` prints requests, tokens and cost; the server sees none."""
    with FakeLLM() as srv:
        d = dag_dict(tmp_path / "run", srv, count=12, topics=["tea", "trains"], llm={
            "prices": {"fake-model": {"input_per_1m": 1.0, "output_per_1m": 2.0}}})
        dag = tmp_path / "dag.yaml"
        dag.write_text(yaml.safe_dump(d))
        env = {**os.environ, KEY_ENV: KEY}
        r = subprocess.run([sys.executable, "-m", "speechmill.pipeline.cli", "run", str(dag),
                            "--dry-run"], capture_output=True, text=True, env=env,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert "estimate gen: 12 requests (0 already cached)" in r.stdout
        assert "~$" in r.stdout and "at most $" in r.stdout
        assert srv.chat_requests() == 0
        assert KEY not in r.stdout + r.stderr


def test_status_shows_requests_and_cost(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from speechmill.pipeline.cli import main

    with FakeLLM() as srv:
        d = dag_dict(tmp_path / "run", srv, count=4, topics=["tea"], llm={
            "prices": {"fake-model": {"input_per_1m": 1.0, "output_per_1m": 2.0}}})
        res, _ = run_dag(d)
        assert res.status == "succeeded"
        sent = srv.chat_requests()
    capsys.readouterr()
    assert main(["status", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("gen:") and "request" in x)
    assert f"{sent} request" in line and "$" in line, line


def test_key_echoed_by_the_server_is_nowhere(tmp_path: Path, capfd: pytest.CaptureFixture,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """A server that echoes the Authorization header in long (> 2000 characters) 500
    bodies and in a 200 answer: no 8-character piece of the key reaches the rejects,
    run.json, dag.yaml, any file of the run, the console or the logs."""
    import logging

    caplog.set_level(logging.DEBUG)
    topics = ["broken [[fault:500]]", "echoing [[fault:echo]]", "fine topic"]
    with FakeLLM(retry_after="0", api_key=KEY, echo_auth=True) as srv:
        d = dag_dict(tmp_path / "run", srv, topics=topics, count=3, min_turns=1,
                     max_turns=1, llm={"max_attempts": 2, "max_fix_attempts": 1})
        res, out = run_dag(d)
        echoed = [h for h in srv.chat if h.status == 500]
    assert res.status == "succeeded" and echoed
    rej = {r["reason"]: r for r in RunStore(tmp_path / "run").read_rejects("gen").to_pylist()}
    assert set(rej) == {"llm_error", "llm_invalid_output"}
    assert rej["llm_error"]["kind"] == "transient" and rej["llm_invalid_output"]["kind"] == "data"
    assert "HTTP 500" in rej["llm_error"]["detail"]
    assert "<redacted>" in rej["llm_invalid_output"]["detail"]
    cap = capfd.readouterr()
    assert_key_nowhere(tmp_path / "run", out, cap.out, cap.err, caplog.text)


def test_key_echoed_in_a_401_stops_the_run_without_it(
        tmp_path: Path, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
        ) -> None:
    """The endpoint refuses the key and echoes it in a long 401 body: the run stops with
    the endpoint's answer in its error (run.json too), never a piece of the key."""
    import logging

    caplog.set_level(logging.DEBUG)
    with FakeLLM(api_key="another-key-entirely-0123456789", echo_auth=True) as srv:
        d = dag_dict(tmp_path / "run", srv, topics=["tea"], count=2, min_turns=1,
                     max_turns=1)
        with pytest.raises(SpeechmillError, match="401") as ei:
            run_dag(d)
        assert srv.auth_failures >= 1
    info = json.loads((tmp_path / "run/run.json").read_text())
    assert info["status"] == "failed" and "401" in info["error"]
    cap = capfd.readouterr()
    assert_key_nowhere(tmp_path / "run", str(ei.value), cap.out, cap.err, caplog.text)


EXTRA_KEY = "sk-extra-Hq3Wn8Lp2Vc6Xz9Rt4Ym7Ku1Bf5Gd0Js8Ae6Np"


def test_run_json_argv_redacts_secrets_inside_set_values(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--set 'gen.llm.extra_body={"api_key": ...}'`` (a mapping holding a secret key)
    is in run.json's argv with the secret redacted, as in dag.yaml."""
    from speechmill.pipeline.cli import main

    with FakeLLM(api_key=KEY) as srv:
        d = dag_dict(tmp_path / "run", srv, topics=["tea"], count=1, min_turns=1,
                     max_turns=1)
        dag_file = tmp_path / "dag.yaml"
        dag_file.write_text(yaml.safe_dump(d))
        argv = ["run", str(dag_file), "--no-progress",
                "--set", f'gen.llm.extra_body={{"api_key": "{EXTRA_KEY}", "top_k": 5}}',
                "--set=gen.seed=3"]
        monkeypatch.setattr(sys, "argv", ["speechmill", *argv])
        assert main(argv) == 0
        sent = [h.body for h in srv.chat]
    assert sent and sent[0]["api_key"] == EXTRA_KEY  # extra_body reached the server
    info = json.loads((tmp_path / "run/run.json").read_text())
    setv = info["argv"][info["argv"].index("--set") + 1]
    assert setv.startswith("gen.llm.extra_body=") and '"top_k": 5' in setv
    assert "<redacted>" in setv
    assert info["argv"][-1] == "--set=gen.seed=3"
    assert_key_nowhere(tmp_path / "run", key=EXTRA_KEY)


def test_safe_argv_forms() -> None:
    from speechmill.pipeline.runner import safe_argv as _safe_argv

    class _D:
        secret_env = {"MY_TOKEN": "tok-1234567890abcdef"}

    argv = ["speechmill", "run", "d.yaml",
            "--set", f'gen.llm.extra_body={{"api_key": "{EXTRA_KEY}"}}',
            f"--set=gen.llm.extra_body={{headers: {{Authorization: 'Bearer {EXTRA_KEY}'}}}}",
            "--set", f"gen.llm.api_key={EXTRA_KEY}",
            "--set", "gen.topics=[a, b]",
            "--set", f"x.url=https://bob:{EXTRA_KEY}@example.org/a",
            "--set", "gen.note=tok-1234567890abcdef"]
    out = _safe_argv(_D(), argv)  # type: ignore[arg-type]
    assert not find_pieces(EXTRA_KEY, *out), out
    assert "tok-1234" not in " ".join(out)
    assert out[4] == 'gen.llm.extra_body={"api_key": "<redacted>"}'
    assert out[5] == '--set=gen.llm.extra_body={"headers": "<redacted>"}'
    assert out[7] == "gen.llm.api_key=<redacted>"
    assert out[9] == "gen.topics=[a, b]"  # nothing secret: verbatim
    assert out[11] == "x.url=https://***@example.org/a"
    assert out[13] == "gen.note=<redacted>"  # a secret env value
