"""Benchmark: dialogues per minute of ``dialogue_generate`` vs plain ``openai`` loops.

Usage::

    python benchmarks/llm.py --dialogues 96 --concurrency 16 --latency-ms 500

What it does
------------
1. **Server.** ``testkit/fake_llm.py`` in its own process (so it does not share this
   process's CPU time and GIL), an OpenAI-compatible server on 127.0.0.1 that answers
   every chat request after ``--latency-ms`` (a realistic time for a hosted model to write
   a short dialogue) with a deterministic dialogue.
2. **Requests.** ``--dialogues`` plan rows of a ``dialogue_generate`` config (topics x
   personas x styles, 2-3 rounds) and, for each, the exact request body the stage sends
   (system + user prompt, JSON-schema ``response_format``, per-dialogue seed). All three
   contenders send these same bodies, and the server gives them the same answers.
3. **Sequential** (what users write first): one ``openai.OpenAI`` client, one
   ``chat.completions.create`` after another, each answer parsed and validated with the
   same pydantic model.
4. **Thread pool** (the hand-written fast version): the same call mapped over a
   ``ThreadPoolExecutor(--concurrency)``: speechmill's overhead is the difference.
5. **speechmill**: a one-stage DAG (``dialogue_generate`` with ``llm.concurrency:
   --concurrency``, local executor, the stage's default batch of 64 rows) run with
   ``runner.run`` into a fresh run directory: planning, the cache (every answer written
   to disk before use), accounting, content QC, near-duplicate check and committing
   Parquet parts included. "stage" is the stage's own wall time from its metrics;
   "whole run" adds DAG loading and the run directory's bookkeeping.

Reading the numbers
-------------------
* ``dialogues/min`` is ``--dialogues`` over the wall time, higher is better.
* ``vs sequential`` is the speed-up over the sequential loop; its ceiling is about the
  concurrency (``--latency-ms`` dominates every request).
* ``vs thread pool`` is speechmill over the hand-written thread pool at the same
  concurrency: near 1.0 means the cache, accounting and checks cost little next to the
  requests. The stage commits a batch at a time, so the tail of each batch (fewer rows in
  flight than the concurrency while its last answers arrive) costs a little.
* Imports, the server start and each contender's first request (for speechmill: a
  two-dialogue warm-up run) are done before any timing.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _topics() -> dict[str, list[str]]:
    return {
        "topics": ["planning a weekend hike", "fixing a leaking tap", "choosing a laptop",
                   "learning to bake bread", "a delayed train", "saving for a holiday",
                   "a first guitar lesson", "repotting a plant"],
        "personas": ["a busy parent", "a retired engineer", "a student on a budget"],
        "styles": ["casual", "hurried", "curious"],
    }


def start_server(latency_s: float) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen([sys.executable, str(REPO / "testkit/fake_llm.py"),
                          "--latency", str(latency_s)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    url = p.stdout.readline().strip()
    if not url.startswith("http"):
        raise SystemExit(f"fake server did not start: {url!r}")
    return p, url


def stage_config(url: str, n: int, concurrency: int) -> dict[str, Any]:
    return {**_topics(), "count": n, "min_turns": 2, "max_turns": 3,
            "llm": {"base_url": url, "model": "bench-model", "concurrency": concurrency,
                    "api_key_env": "SPEECHMILL_BENCH_NO_KEY", "max_tokens": 512}}


def request_bodies(with_: dict[str, Any]) -> list[dict[str, Any]]:
    """The exact JSON bodies the stage sends for its plan."""
    from speechmill.synth.llm.client import LLMClient
    from speechmill.synth.llm.conversation import Conversation
    from speechmill.synth.text.dialogue_generate import (
        DialogueGenerateConfig,
        build_request,
        plan_rows,
        prompt_version,
    )

    cfg = DialogueGenerateConfig(**with_)
    pv = prompt_version(cfg)
    tmp = tempfile.mkdtemp(prefix="llm-bench-bodies-")
    try:
        client = LLMClient(cfg.llm, tmp, "bench")
        return [client.body(Conversation(build_request(cfg, r, pv), "json_schema"))
                for r in plan_rows(cfg)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def one_call(client: Any, body: dict[str, Any]) -> int:
    from speechmill.synth.text.dialogue_generate import DialogueOut

    r = client.chat.completions.create(**body)
    d = DialogueOut.model_validate_json(r.choices[0].message.content)
    return len(d.turns)


def run_sequential(url: str, bodies: list[dict[str, Any]]) -> float:
    import openai

    client = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0)
    t0 = time.perf_counter()
    for b in bodies:
        one_call(client, b)
    return time.perf_counter() - t0


def run_threads(url: str, bodies: list[dict[str, Any]], concurrency: int) -> float:
    import openai

    client = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda b: one_call(client, b), bodies))
    return time.perf_counter() - t0


def run_speechmill(with_: dict[str, Any], run_dir: Path) -> tuple[float, float, dict[str, Any]]:
    import yaml
    from rich.console import Console

    from speechmill.pipeline import dag as dagmod
    from speechmill.pipeline import runner

    shutil.rmtree(run_dir, ignore_errors=True)
    d = {"name": "llm-bench", "run_dir": str(run_dir),
         "executor": {"type": "local", "progress": False},
         "stages": [{"id": "gen", "uses": "dialogue_generate", "with": with_}]}
    t0 = time.perf_counter()
    res = runner.run(dagmod.loads(yaml.safe_dump(d)), progress=False,
                     console=Console(file=io.StringIO()))
    wall = time.perf_counter() - t0
    if res.status != "succeeded":
        raise SystemExit(f"speechmill run {res.status}: {res.error}")
    m = json.loads((run_dir / "stages/gen/metrics.json").read_text())
    return wall, float(m["wall_seconds"]), m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dialogues", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--latency-ms", type=float, default=500.0)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llm-bench")
    a = ap.parse_args()
    import openai  # noqa: F401 - imported before any timing

    srv, url = start_server(a.latency_ms / 1000.0)
    try:
        with_ = stage_config(url, a.dialogues, a.concurrency)
        bodies = request_bodies(with_)
        # warm-up outside the timings: imports and first-call costs of each contender
        # (one request for the loops; a two-dialogue run for speechmill, with another
        # seed so its answers are not in the timed run's cache)
        run_sequential(url, bodies[:1])
        run_speechmill({**with_, "count": 2, "seed": 999}, a.workdir / "warmup_run")
        t_seq = run_sequential(url, bodies)
        t_thr = run_threads(url, bodies, a.concurrency)
        wall, stage_wall, m = run_speechmill(with_, a.workdir / "speechmill_run")
    finally:
        assert srv.stdin is not None
        srv.stdin.close()
        srv.wait(timeout=10)
    n = a.dialogues
    kept = m["stage_summary"]["dialogues"]
    llm = m["stage_summary"]["llm"]

    def rate(t: float) -> float:
        return n / t * 60.0

    print(f"{n} dialogues, {a.latency_ms:g} ms per request, concurrency {a.concurrency}; "
          f"speechmill kept {kept} ({m['rows_rejected']} rejected), sent "
          f"{llm['requests']} requests")
    print(f"{'':26}{'wall s':>9}{'dialogues/min':>15}{'vs sequential':>15}"
          f"{'vs thread pool':>16}")
    rows = [("sequential openai loop", t_seq), (f"thread pool ({a.concurrency})", t_thr),
            ("speechmill (stage)", stage_wall), ("speechmill (whole run)", wall)]
    for name, t in rows:
        print(f"{name:26}{t:9.2f}{rate(t):15.1f}{t_seq / t:15.2f}{t_thr / t:16.2f}")
    print(f"ideal: {a.latency_ms / 1000 * n:.1f} s sequential, "
          f"{a.latency_ms / 1000 * -(-n // a.concurrency):.1f} s at concurrency "
          f"{a.concurrency}")


if __name__ == "__main__":
    main()
