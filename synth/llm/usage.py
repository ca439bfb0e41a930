"""LLM usage a stage committed, so ``metrics.json`` and ``speechmill status`` show it.

A row's usage (requests sent, cache hits, prompt/completion tokens, estimated USD) is
stored in columns ``{prefix}requests`` ... ``{prefix}cost_usd`` of its output rows (on
one row per request group), or, for a rejected row, at the end of its reject detail as
``[llm requests=.. cache_hits=.. prompt_tokens=.. completion_tokens=.. cost_usd=..]``
(the format ``dialogue_generate`` writes). :func:`committed_usage` adds both up from what
the stage committed, so the figures survive resumes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

USAGE_KEYS = ("requests", "cache_hits", "prompt_tokens", "completion_tokens", "cost_usd")
_TAIL = re.compile(r"\[llm requests=(\d+) cache_hits=(\d+) prompt_tokens=(\d+) "
                   r"completion_tokens=(\d+) cost_usd=([0-9.eE+-]+)\]\s*$")


def usage_columns(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{k}" for k in USAGE_KEYS)


def usage_values(usage: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {f"{prefix}{k}": (float(usage.get(k, 0.0)) if k == "cost_usd"
                             else int(usage.get(k, 0))) for k in USAGE_KEYS}


def usage_tail(usage: Mapping[str, Any]) -> str:
    return (f" [llm requests={usage.get('requests', 0)} cache_hits="
            f"{usage.get('cache_hits', 0)} prompt_tokens={usage.get('prompt_tokens', 0)} "
            f"completion_tokens={usage.get('completion_tokens', 0)} "
            f"cost_usd={float(usage.get('cost_usd', 0.0)):.6f}]")


def committed_usage(outputs: pa.Table, rejects: pa.Table, prefix: str) -> dict[str, Any]:
    import pyarrow.compute as pc

    total: dict[str, Any] = dict.fromkeys(USAGE_KEYS, 0)
    for key, col in zip(USAGE_KEYS, usage_columns(prefix), strict=True):
        if col in outputs.column_names and outputs.num_rows:
            total[key] += pc.sum(outputs.column(col)).as_py() or 0
    if rejects.num_rows and "detail" in rejects.column_names:
        for d in rejects.column("detail").to_pylist():
            m = _TAIL.search(d or "")
            if m:
                for key, v in zip(USAGE_KEYS, m.groups(), strict=True):
                    total[key] += float(v) if key == "cost_usd" else int(v)
    total["cost_usd"] = round(float(total["cost_usd"]), 6)
    return total


def usage_line(u: Mapping[str, Any]) -> str:
    return (f"LLM: {u.get('requests', 0)} requests sent, {u.get('cache_hits', 0)} cache "
            f"hits, {u.get('prompt_tokens', 0)} prompt + {u.get('completion_tokens', 0)} "
            f"completion tokens, estimated ${u.get('cost_usd', 0.0):.4f}")
