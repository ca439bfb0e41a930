"""When a stage fails instead of rejecting rows.

Two kinds of failure never become per-row rejects:

* *fatal* errors: a stage's ``setup()`` raised (missing model, bad checkpoint, CUDA
  error), the run directory cannot be written (disk full, read-only, permission denied),
  or processing raised an engine error (:func:`~speechmill.pipeline.errors.is_fatal`).
  Workers report them as a ``fatal`` entry in the stats they return (a dict that crosses
  process boundaries unchanged, whatever Ray does to exceptions), and the driver raises
  :class:`~speechmill.pipeline.errors.StageFailedError` with the original error's type
  and message;
* an exhausted *error budget*: more rows failed with engine failure reasons (``error``:
  the stage raised on the row; ``worker_crash``: the row killed its worker even alone)
  or as *transient* rejects (a service or resource failed after its retries: connection
  refused, timeout, HTTP 5xx, 429 beyond the retry budget; ``kind == "transient"``)
  than the stage's ``max_error_fraction`` allows. A few such rows are bad input; many
  are a broken stage or environment. :class:`ErrorBudget` counts them from the stats
  every batch returns (``reasons``, and ``errors``: exception type -> count and a sample
  row id), so it works the same for every executor, streamed or not.
"""

from __future__ import annotations

import math
import re
import traceback
from collections import Counter
from typing import Any

import pyarrow as pa

from speechmill.pipeline.errors import ErrorBudgetExceeded, StageFailedError, StoreError
from speechmill.pipeline.records import TRANSIENT

#: reject reasons that are failures of the stage or its environment, not of the data
ENGINE_REASONS = ("error", "worker_crash")
#: the budget's fraction counts once this many rows were processed (below it, only a
#: stage whose every row failed fails)
MIN_ROWS = 20
#: how sure the early stop must be that the budget is exceeded: the lower bound of the
#: Wilson score interval at this many standard deviations (~99.9 %) must exceed it
EARLY_STOP_Z = 3.0

_TYPE_RE = re.compile(r"^([A-Za-z_][\w.]*)(?::|$)")


def error_type(detail: str | None) -> str:
    """The exception type of an engine reject, from its detail (``"TypeName: msg..."``)."""
    m = _TYPE_RE.match((detail or "").strip())
    return m.group(1).rsplit(".", 1)[-1] if m else "unknown"


def is_transient(kinds: Any) -> Any:
    """Boolean mask of the transient rejects among a ``kind`` column (null: data)."""
    import pyarrow.compute as pc

    return pc.fill_null(pc.equal(kinds, TRANSIENT), False)


def error_counts(rejects: pa.Table) -> dict[str, list[Any]]:
    """Engine rejects of a batch by exception type: ``{type: [count, sample row id]}``."""
    out: dict[str, list[Any]] = {}
    if not rejects.num_rows:
        return out
    cols = [rejects.column(c).to_pylist() for c in ("id", "reason", "detail")]
    for rid, reason, detail in zip(*cols, strict=True):
        if reason in ENGINE_REASONS:
            entry = out.setdefault(error_type(detail), [0, rid])
            entry[0] += 1
    return out


def transient_counts(rejects: pa.Table) -> dict[str, list[Any]]:
    """Transient rejects of a batch by reason: ``{reason: [count, sample row id, its
    detail]}``."""
    out: dict[str, list[Any]] = {}
    if not rejects.num_rows or "kind" not in rejects.column_names:
        return out
    cols = [rejects.column(c).to_pylist() for c in ("id", "reason", "kind", "detail")]
    for rid, reason, kind, detail in zip(*cols, strict=True):
        if kind == TRANSIENT:
            entry = out.setdefault(str(reason), [0, rid, (detail or "")[:300]])
            entry[0] += 1
    return out


def fatal_info(exc: BaseException, where: str) -> dict[str, Any]:
    """What a worker reports when ``exc`` stops its stage (JSON-safe). ``where``: setup |
    batch | read."""
    from speechmill.pipeline.errors import SpeechmillError

    typ = type(exc).__name__
    text = str(exc)
    if isinstance(exc, StoreError):
        message = text  # names the OSError itself
    elif where == "setup":
        message = f"setup() failed: {typ}: {text}"
    elif where == "read":
        message = f"cannot read its input: {typ}: {text}"
    elif isinstance(exc, SpeechmillError):
        message = f"{typ}: {text}"
    else:
        message = f"{typ}: {text} (raised while processing a batch: no row was rejected " \
                  "for it)"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=8))
    return {"where": where, "type": typ, "cause": text[:4000], "message": message[:4000],
            "traceback": tb[-4000:]}


def stage_failed(stage_id: str, info: dict[str, Any]) -> StageFailedError:
    """The driver-side error for a worker's :func:`fatal_info`."""
    return StageFailedError(stage_id, str(info.get("message") or info.get("type")),
                            cause_type=info.get("type"), cause=info.get("cause"),
                            traceback=info.get("traceback"))


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def _wilson_lower(k: int, n: int, z: float) -> float:
    if n <= 0:
        return 0.0
    p = k / n
    den = 1 + z * z / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / den


class ErrorBudget:
    """Counts a stage's rows and engine failures as batch stats arrive.

    ``already``: rows the stage consumed in earlier attempts (their engine failures were
    cleared for a retry, see the runner), ``total``: rows the stage has in all.
    :meth:`check` stops the stage early, once ``MIN_ROWS`` rows were processed, when the
    budget is exceeded beyond doubt (the failures alone are over the budget of the whole
    stage, or the failure rate's lower confidence bound is over it); ``final=True`` (the
    stage's
    end) applies the budget to what was processed: over ``max_fraction`` after at least
    ``MIN_ROWS`` rows, or every row failed, whatever their number."""

    def __init__(self, stage_id: str, max_fraction: float, *, already: int = 0,
                 total: int | None = None) -> None:
        self.stage_id = stage_id
        self.max_fraction = max_fraction
        self.rows = already
        self.total = total
        self.failed = 0
        self.types: Counter[str] = Counter()
        self.samples: dict[str, str] = {}
        self.details: dict[str, str] = {}

    def add(self, stats: dict[str, Any]) -> None:
        self.rows += int(stats.get("rows_in", 0))
        reasons = stats.get("reasons") or {}
        failed = sum(int(reasons.get(r, 0)) for r in ENGINE_REASONS)
        self.failed += failed
        typed = 0
        for typ, (n, sample) in (stats.get("errors") or {}).items():
            self.types[typ] += int(n)
            typed += int(n)
            self.samples.setdefault(typ, str(sample))
        if failed > typed:
            self.types["unknown"] += failed - typed
        for reason, (n, sample, *detail) in (stats.get("transient") or {}).items():
            typ = f"{reason} (transient)"
            self.failed += int(n)
            self.types[typ] += int(n)
            self.samples.setdefault(typ, str(sample))
            if detail and detail[0]:
                self.details.setdefault(typ, str(detail[0]))

    def exceeded(self, final: bool = False) -> bool:
        if not self.failed:
            return False
        if final:
            return (self.rows >= MIN_ROWS and self.failed > self.max_fraction * self.rows) \
                or self.failed >= self.rows
        if self.rows < MIN_ROWS:
            return False
        if self.total and self.failed > self.max_fraction * self.total:
            return True  # over the budget even if every other row succeeds
        return _wilson_lower(self.failed, self.rows, EARLY_STOP_Z) > self.max_fraction

    def check(self, final: bool = False) -> None:
        if self.exceeded(final):
            raise self.error()

    def error(self) -> ErrorBudgetExceeded:
        frac = self.failed / max(self.rows, 1)
        top = ", ".join(
            f"{typ} x{n}" + (f" (e.g. row {self.samples[typ]!r}" if typ in self.samples
                             else "")
            + (f": {self.details[typ]}" if typ in self.details else "")
            + (")" if typ in self.samples else "")
            for typ, n in self.types.most_common(3))
        if self.failed >= self.rows:
            why = "every row failed" + (" (too few rows for max_error_fraction "
                                        f"{_pct(self.max_fraction)}, but not one succeeded)"
                                        if self.rows < MIN_ROWS else "")
        else:
            why = f"{_pct(frac)} > max_error_fraction {_pct(self.max_fraction)}"
        return ErrorBudgetExceeded(
            self.stage_id,
            f"{self.failed} of {self.rows} rows failed with errors ({why}); most frequent: "
            f"{top or 'unknown'}. Each row's traceback is in the `detail` of "
            f"stages/{self.stage_id}/rejects/. Committed batches are kept: fix the cause and "
            "rerun to resume (rows that failed are retried), or raise the stage's "
            "max_error_fraction if such rows are expected",
            cause_type=self.types.most_common(1)[0][0] if self.types else None)
