"""Terminal output: per-stage progress, the end-of-run summary and ``status``."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any


def _hours(h: float | None) -> str:
    if h is None:
        return "-"
    if h < 1:
        return f"{h * 60:.1f} min"
    return f"{h:.2f} h"


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min"


class StageProgress:
    """A progress bar per stage: rows, rejects, audio hours and speed (x realtime)."""

    def __init__(self, stage_id: str, total: int, already: int, console: Any,
                 enabled: bool = True) -> None:
        self.stage_id = stage_id
        self.total = total
        self.done = already
        self.already = already
        self.rejected = 0
        self.seconds = 0.0
        self.reasons: Counter[str] = Counter()
        self.console = console
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None
        self._t0 = time.monotonic()
        self._last_line = 0.0

    def __enter__(self) -> StageProgress:
        note = f" (resuming: {self.already} already done)" if self.already else ""
        self.console.print(f"[bold cyan]>[/] {self.stage_id}: {self.total} rows{note}")
        if self.enabled and self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("  {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[extra]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                self.stage_id, total=self.total, completed=self.done, extra=""
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _extra(self) -> str:
        el = max(time.monotonic() - self._t0, 1e-9)
        speed = self.seconds / el
        return (f"rej {self.rejected}  {_hours(self.seconds / 3600)} audio  "
                f"{speed:.1f}x RT  {(self.done - self.already) / el:.2f} rows/s")

    def update(self, stats: dict[str, Any]) -> None:
        self.done += int(stats.get("rows_in", 0))
        self.rejected += int(stats.get("rows_rejected", 0))
        self.seconds += float(stats.get("seconds_in", 0.0) or 0.0) or float(
            stats.get("seconds_out", 0.0) or 0.0
        ) + float(stats.get("seconds_rejected", 0.0) or 0.0)
        self.reasons.update(stats.get("reasons") or {})
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done, extra=self._extra())
        elif time.monotonic() - self._last_line > 10:  # logs: a line every 10 s
            self._last_line = time.monotonic()
            self.console.print(f"  {self.stage_id}: {self.done}/{self.total}  {self._extra()}")

    def finish(self, m: dict[str, Any]) -> None:
        reasons = ", ".join(f"{k} {v}" for k, v in (m.get("reasons") or {}).items())
        speed = m.get("speed_x_realtime")
        word = "[yellow]incomplete[/]" if m.get("incomplete") else "[green]done[/]"
        self.console.print(
            f"  {word} {self.stage_id}: {m['rows_in']} in -> {m['rows_out']} out, "
            f"{_rejected(m)} rejected{f' ({reasons})' if reasons else ''}; "
            f"{_hours(m['audio_hours_out'])} audio out in {_secs(m['wall_seconds'])}"
            + (f" ({speed:.1f}x realtime)" if speed else "")
        )


def _rejected(m: dict[str, Any]) -> str:
    """Rejects, with the transient ones (retried by a rerun) apart from the data ones."""
    n = m.get("rows_rejected", "-")
    t = int(m.get("rows_transient") or 0)
    return f"{n} ({t} transient)" if t else str(n)


def summary_table(stages: list[dict[str, Any]], title: str = "speechmill run summary") -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col, just in [("stage", "left"), ("state", "left"), ("in", "right"), ("out", "right"),
                      ("rejected", "right"), ("hours in", "right"), ("hours out", "right"),
                      ("wall", "right"), ("RTF", "right"), ("top reject reasons", "left")]:
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for m in stages:
        reasons = sorted((m.get("reasons") or {}).items(), key=lambda kv: -kv[1])[:3]
        rtf = m.get("realtime_factor")
        t.add_row(
            str(m.get("stage", "?")),
            str(m.get("state", "")),
            str(m.get("rows_in", "-")),
            str(m.get("rows_out", "-")),
            _rejected(m),
            _hours(m.get("audio_hours_in")),
            _hours(m.get("audio_hours_out")),
            _secs(m.get("wall_seconds")),
            f"{rtf:.3g}" if isinstance(rtf, float) else "-",
            ", ".join(f"{k}={v}" for k, v in reasons),
        )
    return t


def render_summary(stages: list[dict[str, Any]], console: Any, run_dir: str) -> None:
    console.print()
    console.print(summary_table(stages))
    rejected = sum(int(s.get("rows_rejected", 0) or 0) for s in stages)
    transient = sum(int(s.get("rows_transient", 0) or 0) for s in stages)
    console.print(
        f"outputs: {run_dir}/stages/<stage>/part-*.parquet   "
        f"rejects: {rejected} rows in {run_dir}/stages/<stage>/rejects/"
        + (f" ({rejected - transient} data, {transient} transient: a rerun retries "
           "the transient ones)" if transient else "")
    )
    sinks = [f"{s['stage']}: {s['output_dir']}" for s in stages if s.get("output_dir")]
    for line in sinks:
        console.print(f"  {line}")
    console.print("RTF = wall seconds per second of input audio (lower is faster)")
    from rich.markup import escape

    from speechmill.pipeline.nodes import cluster_lines

    for s in stages:
        for line in cluster_lines(s):
            console.print(f"  {s.get('stage', '?')}: {escape(line)}")


def status_rows(run_dir: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """State and counts of each stage of the DAG recorded in ``run_dir``."""
    import yaml

    from speechmill.pipeline.store import RunStore

    store = RunStore(run_dir)  # a local path or a URL run dir
    info = store.read_run() or {}
    dag_text = store.read_root_file("dag.yaml")
    stage_ids: list[str] = []
    uses: dict[str, str] = {}
    if dag_text is not None:
        raw = yaml.safe_load(dag_text) or {}
        stage_ids = [s["id"] for s in raw.get("stages", [])]
        uses = {s["id"]: str(s.get("uses", "")) for s in raw.get("stages", [])}
    else:
        stage_ids = store.stage_ids()
    rows = []
    for sid in stage_ids:
        outs, rej = store.count_rows(sid)
        m = store.read_metrics(sid)
        if store.is_done(sid):
            state = "done"
        elif m and m.get("incomplete") and info.get("status") != "running":
            state = "incomplete"
        elif outs or rej:
            state = "partial" if info.get("status") != "running" else "running"
        else:
            state = "pending"
        row: dict[str, Any] = {"stage": sid, "state": state, "rows_out": outs,
                               "rows_rejected": rej}
        if m:
            row.update({k: m[k] for k in ("rows_in", "rows_transient", "audio_hours_in",
                                           "audio_hours_out",
                                           "wall_seconds", "realtime_factor", "reasons",
                                           "output_dir")
                        if k in m})
            if m.get("output_dir"):  # a sink: its rows are in its export, not in parts
                row["rows_out"] = m.get("rows_out", outs)
            if m.get("stage_summary") and uses.get(sid):
                row["summary_lines"] = _summary_lines(uses[sid], m["stage_summary"])
            from speechmill.pipeline.nodes import cluster_lines

            row.update({k: m[k] for k in ("nodes", "recovery") if m.get(k)})
            if cluster_lines(m):
                row["cluster_lines"] = cluster_lines(m)
        rows.append(row)
    return info, rows


def _summary_lines(uses: str, summary: dict[str, Any]) -> list[str]:
    """The stage's own readable lines for its ``stage_summary`` (LLM requests and cost,
    hosts of a crawl, ...); none when the stage is not installed here."""
    from speechmill.pipeline import registry

    try:
        return list(registry.get(uses).summary_lines(summary))
    except Exception:  # an unknown/uninstalled stage: the table still shows its counts
        return []
