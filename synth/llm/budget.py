"""Spend and rate limits of the LLM client, shared by every worker of a stage.

* :class:`SpendLedger`: what was spent, run-wide. Each process keeps its own small file
  ``cache_dir/_spend/<host>-<pid>-<random>.json`` (its running totals, rewritten
  atomically after every answer) and the run-wide total is the sum of all of them, so
  several workers (and resumed attempts) add up without sharing a file.
* :class:`Budget`: the hard ``max_cost_usd`` / ``max_total_tokens`` limit. Before a
  request is sent, the ledger total plus what this process has in flight plus the
  request's worst case (its prompt and ``max_tokens`` of answer) must fit, or
  :class:`BudgetExceeded` is raised and the stage stops. Workers of other processes can
  overshoot by at most the requests they already have in flight.
* :class:`RateLimiter`: requests-per-minute and tokens-per-minute token buckets whose
  state lives in ``cache_dir/_ratelimit.json`` under an ``flock``, so the limits hold for
  the whole stage across worker processes (and across hosts where the shared filesystem
  supports ``flock``; where it does not, each process keeps the full limit to itself and a
  warning says so). Token counts are estimated before sending (prompt characters / 4 plus
  ``max_tokens``) and corrected with the server's count afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speechmill.pipeline.errors import SpeechmillError
from speechmill.synth.llm.cache import file_lock, write_atomic


class LLMStop(SpeechmillError):
    """The stage must stop (not reject rows): the engine fails the run with this message;
    a rerun resumes once the cause is fixed (answers received so far are cached)."""


class LLMUnavailable(LLMStop):
    """The endpoint refuses every request for a reason no retry fixes (401/403: the key;
    404: the base URL or model name) or its Batch API failed."""


class BudgetExceeded(LLMStop):
    """The stage's LLM budget (``max_cost_usd`` / ``max_total_tokens``) is reached. The
    stage stops; answers already received are cached, so rerunning with a bigger budget
    resumes without paying for them again."""


@dataclass
class Spend:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Spend) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_usd += other.cost_usd

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cost_usd": round(self.cost_usd, 8)}


class SpendLedger:
    """Run-wide spend of one stage: one file per process, summed."""

    #: seconds between rereads of the other processes' files
    refresh_s = 0.25

    def __init__(self, cache_dir: Path) -> None:
        self.dir = Path(cache_dir) / "_spend"
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        self.own_path = self.dir / name
        self.own = Spend()
        self._others = Spend()
        self._read_at = -1e9
        self._written_at = -1e9

    def record(self, spend: Spend, flush: bool = True) -> None:
        """Add ``spend``; written at once with ``flush`` (a hard budget needs every
        answer counted), else at most every :attr:`refresh_s` seconds and on
        :meth:`flush`."""
        self.own.add(spend)
        now = time.monotonic()
        if flush or now - self._written_at > self.refresh_s:
            self.flush()

    def flush(self) -> None:
        write_atomic(self.own_path, json.dumps(self.own.to_dict()).encode(), mkdir=False)
        self._written_at = time.monotonic()

    def total(self, fresh: bool = False) -> Spend:
        now = time.monotonic()
        if fresh or now - self._read_at > self.refresh_s:
            others = Spend()
            for p in self.dir.glob("*.json"):
                if p == self.own_path:
                    continue
                try:
                    d = json.loads(p.read_bytes())
                except (OSError, ValueError):
                    continue
                others.add(Spend(int(d.get("requests", 0)), int(d.get("prompt_tokens", 0)),
                                 int(d.get("completion_tokens", 0)),
                                 float(d.get("cost_usd", 0.0))))
            self._others, self._read_at = others, now
        out = Spend()
        out.add(self._others)
        out.add(self.own)
        return out


class Budget:
    """The hard limit; ``reserve``/``release`` bracket each request in flight."""

    def __init__(self, ledger: SpendLedger, stage_id: str, max_cost_usd: float | None,
                 max_total_tokens: int | None) -> None:
        self.ledger = ledger
        self.stage_id = stage_id
        self.max_cost_usd = max_cost_usd
        self.max_total_tokens = max_total_tokens
        self.reserved = Spend()

    @property
    def limited(self) -> bool:
        return self.max_cost_usd is not None or self.max_total_tokens is not None

    def reserve(self, tokens: int, cost_usd: float) -> None:
        """Hold ``tokens``/``cost_usd`` (a request's worst case), or raise
        :class:`BudgetExceeded` when that would pass a limit."""
        if self.limited:
            spent = self.ledger.total()
            if (self.max_cost_usd is not None
                    and spent.cost_usd + self.reserved.cost_usd + cost_usd > self.max_cost_usd):
                raise BudgetExceeded(
                    f"stage {self.stage_id!r}: LLM budget reached: ${spent.cost_usd:.4f} "
                    f"spent (run-wide, {spent.requests} requests) of max_cost_usd "
                    f"${self.max_cost_usd:g}; the next request may cost up to "
                    f"${cost_usd:.4f}. Answers so far are cached: raise llm.max_cost_usd "
                    "and run again to resume")
            if (self.max_total_tokens is not None and
                    spent.tokens + self.reserved.tokens + tokens > self.max_total_tokens):
                raise BudgetExceeded(
                    f"stage {self.stage_id!r}: LLM token budget reached: {spent.tokens} "
                    f"tokens spent (run-wide, {spent.requests} requests) of "
                    f"max_total_tokens {self.max_total_tokens}; the next request may use up "
                    f"to {tokens}. Answers so far are cached: raise llm.max_total_tokens and "
                    "run again to resume")
        self.reserved.prompt_tokens += tokens
        self.reserved.cost_usd += cost_usd

    def release(self, tokens: int, cost_usd: float) -> None:
        self.reserved.prompt_tokens -= tokens
        self.reserved.cost_usd -= cost_usd


class RateLimiter:
    """Requests and tokens per minute as token buckets (one second of burst), shared
    through ``state_path`` by every process of the stage."""

    burst_s = 1.0

    def __init__(self, state_path: Path, requests_per_minute: float | None,
                 tokens_per_minute: float | None) -> None:
        self.path = Path(state_path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.rps = requests_per_minute / 60.0 if requests_per_minute else None
        self.tps = tokens_per_minute / 60.0 if tokens_per_minute else None
        self._local: dict[str, float] | None = None  # when the filesystem has no locks

    @property
    def enabled(self) -> bool:
        return self.rps is not None or self.tps is not None

    def _caps(self) -> tuple[float, float]:
        r = max(1.0, (self.rps or 0.0) * self.burst_s)
        k = max(1.0, (self.tps or 0.0) * self.burst_s)
        return r, k

    def _load(self, now: float) -> dict[str, float]:
        r_cap, k_cap = self._caps()
        try:
            st = json.loads(self.path.read_bytes())
            st = {"t": float(st["t"]), "r": float(st["r"]), "k": float(st["k"])}
        except (OSError, ValueError, KeyError, TypeError):
            st = {"t": now, "r": r_cap, "k": k_cap}
        dt = max(0.0, now - st["t"])
        st["r"] = min(r_cap, st["r"] + dt * (self.rps or 0.0))
        st["k"] = min(k_cap, st["k"] + dt * (self.tps or 0.0))
        st["t"] = now
        return st

    def _try(self, tokens: int) -> float:
        """Take one request and ``tokens`` if the buckets allow; else seconds to wait."""
        _, k_cap = self._caps()
        need_k = min(float(tokens), k_cap)
        with file_lock(self.lock_path) as locked:
            now = time.time()
            if locked:
                st = self._load(now)
            else:
                if self._local is None:
                    self._local = {"t": now, "r": self._caps()[0], "k": k_cap}
                st = self._local
                dt = max(0.0, now - st["t"])
                st["r"] = min(self._caps()[0], st["r"] + dt * (self.rps or 0.0))
                st["k"] = min(k_cap, st["k"] + dt * (self.tps or 0.0))
                st["t"] = now
            wait = 0.0
            if self.rps is not None and st["r"] < 1.0:
                wait = max(wait, (1.0 - st["r"]) / self.rps)
            if self.tps is not None and st["k"] < need_k:
                wait = max(wait, (need_k - st["k"]) / self.tps)
            if wait <= 0:
                if self.rps is not None:
                    st["r"] -= 1.0
                if self.tps is not None:
                    st["k"] -= float(tokens)  # may go into debt: paid back by waiting
            if locked:
                write_atomic(self.path, json.dumps(st).encode())
            return wait

    async def acquire(self, tokens: int) -> None:
        if not self.enabled:
            return
        while True:
            wait = self._try(tokens)
            if wait <= 0:
                return
            await asyncio.sleep(min(wait, 5.0) + 0.001)

    def settle(self, estimated: int, actual: int) -> None:
        """Correct the token bucket once the server said how many tokens it used."""
        if self.tps is None or actual == estimated:
            return
        with file_lock(self.lock_path) as locked:
            now = time.time()
            st = self._load(now) if locked else self._local
            if st is None:
                return
            st["k"] = min(self._caps()[1], st["k"] + (estimated - actual))
            if locked:
                write_atomic(self.path, json.dumps(st).encode())

