"""``speech_rewrite`` in ``mode: llm``, killed with SIGKILL mid-stage through the CLI: the
resumed run sends no request the fake LLM server already answered (answers not yet
committed come from the cache), and every turn is rewritten exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from speechmill.pipeline.store import RunStore
from testkit.fake_llm import FakeLLM, kill_run_while_held
from tests.synth.test_speech_rewrite import _answer

ROOT = Path(__file__).resolve().parents[2]
KEY_ENV = "SPEECHMILL_TEST_REWRITE_KEY"
KEY = "sk-test-Rw4kJ8vN2qX6bT1mZ9"


def test_sigkill_mid_rewrite_then_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with FakeLLM(_answer, api_key=KEY, hold_after=10) as srv:
        dag = {"name": "rewrite-kill", "run_dir": str(run_dir),
               "executor": {"type": "local", "progress": False},
               "stages": [
                   {"id": "import", "uses": "sft_import", "with": {
                       "paths": [str(ROOT / "dags/data/dialogues/ultrachat.jsonl")],
                       "language": "en"}},
                   {"id": "rewrite", "uses": "speech_rewrite", "needs": ["import"],
                    "batch_size": 4, "with": {"mode": "llm", "llm": {
                        "base_url": srv.base_url, "model": "fake-model",
                        "api_key_env": KEY_ENV, "concurrency": 2,
                        "backoff_base_s": 0.01, "backoff_max_s": 0.05}}}]}
        path = tmp_path / "dag.yaml"
        path.write_text(yaml.safe_dump(dag))
        cmd = [sys.executable, "-m", "speechmill.pipeline.cli", "run", str(path),
               "--no-progress"]
        env = {**os.environ, KEY_ENV: KEY}
        kill_run_while_held(srv, cmd, tmp_path, env, run_dir, "rewrite")
        assert sum(srv.answered_keys().values()) == 10  # 8 committed, 2 only cached
        srv.drop_held = True  # the held requests die with their client
        srv.release()
        srv.hold_after = None
        time.sleep(0.2)
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        answered = srv.answered_keys()
    assert max(answered.values()) == 1, "a request answered before the kill was sent again"
    store = RunStore(run_dir)
    turns = store.read_outputs("import", ["id"]).column("id").to_pylist()
    rows = store.read_outputs("rewrite", ["id", "text"]).to_pylist()
    assert store.read_rejects("rewrite").num_rows == 0
    assert sorted(r["id"] for r in rows) == sorted(turns)  # each turn once
    assert sum(answered.values()) == len(turns)  # one answered request per turn
    assert all(r["text"].startswith("Um, so this is the spoken") for r in rows)
