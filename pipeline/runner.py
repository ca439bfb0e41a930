"""Run a DAG: stage by stage in dependency order, each stage resumable.

For each stage the runner counts its inputs (a source stage's plan, or the upstream
stages' part files, read one at a time), marks the inputs the stage already consumed
(outputs' ``parent_id`` and rejects' ``id`` in its own directory) and ids seen twice,
runs the stage's optional ``prepare`` over the columns it declares, then hands the rest
to the executor: on Ray as one streamed pipeline whose read tasks read the parts on the
workers (the driver sends part paths and row masks), otherwise (and on Ray after a
worker died) in batches, wave by wave (``executor.wave_rows`` rows at a time, so a
stage never holds its whole input in memory); then it finalises: optional dedup of
output ids, ``metrics.json`` and ``_SUCCESS``. A stage with ``_SUCCESS`` is skipped, so
rerunning a finished run does no work. Sinks (exports) get their whole input as one
table, sorted on disk and memory-mapped when it is large (:mod:`.sink_input`).

A stage fails loudly instead of finishing with rows it could not process: a fatal error
(``setup()`` raised, the run directory cannot be written) stops it at once, and so does
its error budget (``max_error_fraction`` of rows rejected as ``error`` /
``worker_crash``, see :mod:`.failures`), checked as batch stats arrive and at the end.
Every committed batch stays; when the stage runs again, the rows it rejected with those
engine reasons are retried (their rejects removed first), so a rerun after the fix
completes without duplicates. SIGINT / SIGTERM mark the run ``interrupted``
(:mod:`.signals`).
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from speechmill.pipeline.dag import Dag, PlannedStage, written_by_version
from speechmill.pipeline.errors import ConfigError, SpeechmillError, StallError
from speechmill.pipeline.executors import LocalExecutor, RayExecutor, Watchdog, batches_of
from speechmill.pipeline.failures import ENGINE_REASONS, ErrorBudget, is_transient
from speechmill.pipeline.nodes import NodeTally, recovery_metrics
from speechmill.pipeline.records import (
    REJECT_SCHEMA,
    concat,
    first_copies,
    reject,
    total_seconds,
)
from speechmill.pipeline.report import StageProgress, render_summary
from speechmill.pipeline.signals import GracefulSignals, RunInterrupted
from speechmill.pipeline.stage import StageContext
from speechmill.pipeline.store import RunStore, is_url, open_store, read_unit


@dataclass
class RunResult:
    run_dir: str
    status: str
    stages: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def rejected(self) -> int:
        return sum(int(s.get("rows_rejected", 0)) for s in self.stages)


def add_wall_seconds(store: RunStore, stage_id: str, seconds: float) -> float:
    """The store's wall-time bookkeeping, called in ``finally`` blocks: while an error is
    on its way out (say the disk filled up), a failure of this write never replaces it."""
    try:
        return store.add_wall_seconds(stage_id, seconds)
    except OSError:
        if sys.exc_info()[0] is None:
            raise
        return seconds


def _state(metrics: dict[str, Any]) -> str:
    return "incomplete" if metrics.get("incomplete") else "done"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("speechmill", "ray", "pyarrow", "av", "soxr", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def make_executor(dag: Dag, executor: str | None = None, ray_address: str | None = None):
    kind = executor or dag.spec.executor.type
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(
            address=ray_address or dag.spec.executor.ray_address,
            num_cpus=dag.spec.executor.num_cpus,
        )
    raise ConfigError(f"unknown executor {kind!r} (ray | local)", key="executor.type")


def check_resumable(dag: Dag, store: RunStore) -> None:
    """Fail fast when a stage's config or behaviour version changed since its outputs
    were written. A stage that committed nothing (say its ``setup()`` failed on a wrong
    model path) may change freely: its directory is cleared and it starts afresh."""
    for st in dag.stages:
        fp = store.read_fingerprint(st.id)
        if fp is not None and fp == st.legacy_fingerprint != st.fingerprint:
            store.write_fingerprint(st.id, st.fingerprint)  # same config, newer formula
            continue
        if (fp is not None and fp != st.fingerprint and not store.is_done(st.id)
                and not store.output_parts(st.id) and not store.reject_parts(st.id)):
            for d in (store.stage_dir(st.id), store.media_dir(st.id)):
                store.remove_tree(d)
            if st.cls.is_sink:
                store.remove_tree(sink_dir(store, st))
            continue
        if fp is not None and fp != st.fingerprint:
            old = written_by_version(dag, st, fp)
            if old is not None:
                raise ConfigError(
                    f"its behaviour version changed: {str(store.stage_dir(st.id))!r} was "
                    f"written by version {old} of stage {st.spec.uses!r}, this speechmill "
                    f"has version {st.cls.version}; rerun with --restart-from {st.id} to "
                    "redo it and everything after it with the new behaviour (or use a new "
                    "run directory)",
                    stage=st.id,
                )
            raise ConfigError(
                f"its config changed since {str(store.stage_dir(st.id))!r} was written; "
                f"use a new run directory, or --restart-from {st.id} to redo it and "
                "everything after it",
                stage=st.id,
                key="with",
            )


def check_store_support(dag: Dag, store: RunStore) -> None:
    """Before anything runs: refuse a stage that needs a local run directory (it reads or
    writes it by local paths) when the run directory is on object storage."""
    if not is_url(dag.run_dir):
        return
    for st in dag.stages:
        if st.cls.local_run_dir_only:
            raise ConfigError(
                f"stage {st.spec.uses!r} needs a local (or shared POSIX) run directory; "
                f"it does not run with a run directory on object storage "
                f"({dag.run_dir!r}) yet: run it on a copy of the run directory, or drop it",
                stage=st.id, key="run_dir")


def restart_from(dag: Dag, store: RunStore, stage_id: str) -> list[str]:
    """Delete ``stage_id`` and every stage downstream of it from the run directory."""
    if stage_id not in {s.id for s in dag.stages}:
        raise ConfigError(f"--restart-from: no stage {stage_id!r}")
    doomed = {stage_id}
    for s in dag.stages:  # topological order: downstream stages come later
        if set(s.spec.needs) & doomed:
            doomed.add(s.id)
    by_id = {s.id: s for s in dag.stages}
    for sid in doomed:
        store.remove_tree(store.stage_dir(sid))
        store.remove_tree(store.media_dir(sid))
        if by_id[sid].cls.is_sink:
            store.remove_tree(sink_dir(store, by_id[sid]))
    return sorted(doomed)


def run(
    dag: Dag,
    *,
    executor: str | None = None,
    ray_address: str | None = None,
    offline: bool = False,
    progress: bool | None = None,
    restart: str | None = None,
    console: Any = None,
) -> RunResult:
    from rich.console import Console

    console = console or Console(stderr=False)
    store = open_store(dag.run_dir)
    check_store_support(dag, store)
    show = dag.spec.executor.progress if progress is None else progress
    result = RunResult(run_dir=str(store.root), status="running")
    with store.lock():
        if restart:
            gone = restart_from(dag, store, restart)
            console.print(f"restarting from {restart}: cleared {', '.join(gone)}")
        check_resumable(dag, store)
        store.write_root_file("dag.yaml", dag.resolved_yaml().encode())
        prev = store.read_run() or {}
        info: dict[str, Any] = {
            "name": dag.name,
            "status": "running",
            "started_at": _now(),
            "first_started_at": prev.get("first_started_at") or _now(),
            "attempt": int(prev.get("attempt", 0)) + 1,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "argv": _safe_argv(dag),
            "dag_file": dag.source_path,
            "versions": _versions(),
        }
        store.write_run(info)
        exe = None

        def force_exit(signal_name: str) -> None:  # a second signal: exit at once
            info.update(status="interrupted", ended_at=_now(),
                        error=f"interrupted by {signal_name} (second signal: exited at once)")
            store.write_run(info)

        signals = GracefulSignals(on_force=force_exit).install()
        try:
            pending_stages = [s for s in dag.stages if not store.is_done(s.id)]
            if pending_stages:
                exe = make_executor(dag, executor, ray_address)
                signals.install()  # ray.init replaces the driver's SIGTERM handler
                info["executor"] = exe.describe()
                store.write_run(info)
                console.print(f"[bold]{dag.name}[/] -> {store.root}  ({exe.describe()})")
            from speechmill.pipeline.fused import plan_chains, run_chain

            chains, fused = plan_chains(dag, store), set()
            for st in dag.stages:
                if st.id in fused:  # ran with its chain
                    continue
                if store.is_done(st.id):
                    m = store.read_metrics(st.id) or {"stage": st.id}
                    result.stages.append({**m, "state": "done earlier"})
                    continue
                assert exe is not None
                if st.id in chains:  # consecutive row-local stages: one pipeline
                    for m in run_chain(dag, chains[st.id], store, exe, offline=offline,
                                       show=show, console=console):
                        result.stages.append({**m, "state": _state(m)})
                    fused.update(s.id for s in chains[st.id])
                    continue
                m = _run_stage(dag, st, store, exe, offline=offline, show=show,
                               console=console)
                result.stages.append({**m, "state": _state(m)})
            result.status = "succeeded"
            retry = sum(int(m.get("rows_transient") or 0) for m in result.stages)
            if retry:
                info["transient_rejects"] = retry
                console.print(
                    f"[yellow]{retry} rows failed transiently (a service or resource failed "
                    "after its retries); they are not final: rerun the same command to "
                    "retry them[/]")
        except KeyboardInterrupt as e:
            result.status = "interrupted"
            result.error = str(e) if isinstance(e, RunInterrupted) else "interrupted"
            raise
        except BaseException as e:
            result.status = "failed"
            result.error = f"{type(e).__name__}: {e}"
            tb = getattr(e, "traceback", None)  # a worker's, for a StageFailedError
            if tb:
                info["error_traceback"] = str(tb)[-4000:]
            raise
        finally:
            info.update(status=result.status, ended_at=_now())
            if result.error:
                info["error"] = result.error[:2000]
            try:
                store.write_run(info)
            except OSError as e:  # never hides the error that stopped the run
                if sys.exc_info()[0] is None:
                    raise
                console.print(f"[red]cannot record the run's end in run.json: {e}[/]")
            try:
                if exe is not None:
                    exe.close()  # stops the workers
            finally:
                signals.restore()
    render_summary(result.stages, console=console, run_dir=str(store.root))
    return result


def _safe_argv(dag: Dag, argv: list[str] | None = None) -> list[str]:
    """The command line for run.json, with secrets out: env values, --set of secret keys,
    secret keys inside a --set value that is a mapping or list (``gen.llm.extra_body=
    {"api_key": ...}``, parsed as YAML/JSON like the override itself and redacted with
    :func:`speechmill.pipeline.dag.redact`), then every argument through
    :func:`speechmill.pipeline.redact.redact_text` (registered secrets, URL credentials,
    ``api_key=...``-looking values)."""
    import json

    import yaml

    from speechmill.pipeline.dag import REDACTED, is_secret_key, redact
    from speechmill.pipeline.redact import redact_text

    env = [v for v in dag.secret_env.values() if v and len(v) >= 4]
    out = []
    prev = ""
    for raw in sys.argv if argv is None else argv:
        a = raw
        body = a[len("--set="):] if a.startswith("--set=") else (a if prev == "--set" else None)
        if body is not None and "=" in body:
            path, value = body.split("=", 1)
            parts = path.strip().split(".")
            if any(is_secret_key(p) for p in parts):
                value = REDACTED
            else:
                try:
                    parsed = yaml.safe_load(value)
                except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError):
                    parsed = None
                if isinstance(parsed, dict | list):
                    red = redact(parsed, parts[-1])
                    if red != parsed:
                        value = json.dumps(red, ensure_ascii=False, default=str)
            a = a[: len(a) - len(body)] + f"{path}={value}"
        out.append(redact_text(a, env))
        prev = raw
    return out


def stage_inputs(dag: Dag, st: PlannedStage, store: RunStore, ctx: StageContext) -> pa.Table:
    """A source stage's plan. The first attempt's plan is kept: a resume finishes
    exactly that work even if the sources changed meanwhile (new files, a feed that is
    down or has moved on)."""
    kept = store.read_plan(st.id)
    if kept is not None:
        return kept
    stage = st.cls(st.config, ctx)
    try:
        planned = stage.plan()
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot plan inputs: {e}", stage=st.id) from None
    store.write_plan(st.id, planned)
    return planned


@dataclass
class StageInput:
    """A stage's input, read part file by part file: what the stage still has to do
    comes in waves of at most ``wave_rows`` rows, so no stage ever holds its whole
    upstream in memory (only the ids, to skip consumed and repeated ones)."""

    units: list[Any]  # upstream part files, or a source's plan table
    masks: list[Any]  # per unit: numpy bool array, rows still to process
    rows_in: int = 0
    seconds_in: float = 0.0
    has_duration: bool = False
    repeated: int = 0  # rows whose id an earlier row has (skipped, not work done)

    @property
    def pending(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks))

    def read_all(self, columns: tuple[str, ...] | None) -> pa.Table:
        """Every input row (consumed ones too), only ``columns`` (None: all)."""
        return concat([read_unit(u, columns=None if columns is None else list(columns))
                       for u in self.units])

    def groups(self, target_rows: int) -> list[list[tuple[Any, Any]]]:
        """The rows still to do as groups of ``(unit, mask)`` of about ``target_rows``
        rows each: what read tasks on workers read when a stage is streamed. Small
        parts are grouped; a part (or a source's plan) with more rows than that is
        split by row masks, each read task keeping only its share."""
        import numpy as np

        out: list[list[tuple[Any, Any]]] = []
        cur: list[tuple[Any, Any]] = []
        n = 0
        for unit, keep in zip(self.units, self.masks, strict=True):
            todo = int(keep.sum())
            if not todo:
                continue
            if isinstance(unit, pa.Table):  # a source's plan: slices of it
                for a in range(0, unit.num_rows, target_rows):
                    k = keep[a:a + target_rows]
                    if k.any():
                        out.append([(unit.slice(a, target_rows), k)])
                continue
            if todo > target_rows:  # one part, several read tasks
                rows = np.flatnonzero(keep)
                for a in range(0, len(rows), target_rows):
                    k = np.zeros(len(keep), dtype=bool)
                    k[rows[a:a + target_rows]] = True
                    out.append([(unit, k)])
                continue
            cur.append((unit, keep))
            n += todo
            if n >= target_rows:
                out.append(cur)
                cur, n = [], 0
        if cur:
            out.append(cur)
        return out

    def waves(self, wave_rows: int) -> Iterator[pa.Table]:
        buf: list[pa.Table] = []
        n = 0
        for unit, keep in zip(self.units, self.masks, strict=True):
            if not keep.any():
                continue
            t = read_unit(unit, keep)
            for a in range(0, t.num_rows, wave_rows):
                piece = t.slice(a, wave_rows)
                buf.append(piece)
                n += piece.num_rows
                if n >= wave_rows:
                    yield concat(buf)
                    buf, n = [], 0
        if buf:
            yield concat(buf)


#: rows a read task of a streamed stage reads (whole upstream parts, so about this many)
STREAM_GROUP_ROWS = 2048
#: read tasks a small streamed stage is cut into, at least
STREAM_MIN_GROUPS = 32


def read_stage_input(dag: Dag, st: PlannedStage, store: RunStore,
                     ctx: StageContext) -> StageInput:
    """Count the input and mark, per part, the rows to do: not consumed by an earlier
    attempt (outputs' ``parent_id``, rejects' ``id``) and not an id seen before (an id
    twice upstream would be processed twice: the first is kept). Ids are handled as
    Arrow columns (about 50 bytes per row while the masks are made; one byte per row
    after), never as Python objects."""
    from speechmill.pipeline.store import as_string

    units: list[Any] = ([stage_inputs(dag, st, store, ctx)] if st.cls.is_source else
                        [p for n in st.spec.needs for p in store.output_parts(n)])
    inp = StageInput(units=units, masks=[])
    chunks: list[pa.Array] = []
    sizes: list[int] = []
    for u in units:
        t = read_unit(u, columns=["id", "duration"])
        if t.num_rows and "id" not in t.column_names:
            raise SpeechmillError(f"stage {st.id!r}: its input has no 'id' column")
        if t.num_rows:
            chunks.extend(as_string(t.column("id")).chunks)
        sizes.append(t.num_rows)
        inp.rows_in += t.num_rows
        if "duration" in t.column_names:
            inp.has_duration = True
            inp.seconds_in += total_seconds(t)
    ids = pa.chunked_array(chunks, pa.string())
    keep = first_copies(ids, store.consumed_id_array(st.id))
    inp.repeated = len(ids) - (pc.count_distinct(ids, mode="all").as_py() if len(ids) else 0)
    del ids, chunks
    a = 0
    for n in sizes:
        inp.masks.append(keep[a:a + n])
        a += n
    return inp


def _run_stage(dag: Dag, st: PlannedStage, store: RunStore, exe: Any, *, offline: bool,
               show: bool, console: Any, recovering_from: int | None = None
               ) -> dict[str, Any]:
    """Run one stage to completion. ``recovering_from``: the index in the executor's
    ``lost_workers`` of a failure that stopped this stage's fused stream: its pending
    rows count as run again."""
    if st.cls.is_sink:
        return _run_sink(dag, st, store, offline=offline, console=console)
    ctx = StageContext(stage_id=st.id, run_dir=str(store.root), offline=offline)
    store.make_stage_dir(st.id)
    store.write_fingerprint(st.id, st.fingerprint)
    store.clear_scratch(st.id)  # spools/temp files a killed attempt left behind
    retry = clear_engine_failures(store, st.id, dag.spec.executor.transient_retries)
    if retry:
        console.print(f"  {st.id}: retrying {retry} rows that failed with errors or "
                      "transient service failures in an earlier attempt")
    t0 = time.monotonic()
    inp = read_stage_input(dag, st, store, ctx)
    if st.cls.has_prepare():
        prepared = st.cls.prepare(st.config, inp.read_all(st.cls.prepare_columns), ctx)
        if prepared is not None:
            ctx = StageContext(stage_id=st.id, run_dir=str(store.root), offline=offline,
                               prepared=prepared)
    pending = inp.pending
    prog = StageProgress(
        st.id, total=inp.rows_in - inp.repeated,
        already=inp.rows_in - inp.repeated - pending,
        console=console, enabled=show,
    )
    timeout = dag.spec.executor.stall_timeout_s
    budget = ErrorBudget(st.id, max_error_fraction(dag, st),
                         already=inp.rows_in - inp.repeated - pending,
                         total=inp.rows_in - inp.repeated)
    tally = NodeTally()  # where this attempt's batches ran
    rerun = [0, 0]  # rows, batches run again after a worker was lost
    lost_before = len(getattr(exe, "lost_workers", []))
    if recovering_from is not None:
        lost_before = recovering_from
        rerun[:] = [pending, -(-pending // st.batch_size)]
    try:
        with prog, Watchdog(timeout, st.id) as dog:

            def on_stats(stats: dict[str, Any]) -> None:
                dog.tick()
                tally.add(stats)
                prog.update(stats)
                budget.add(stats)
                budget.check()  # stops the stage once the budget is exceeded beyond doubt

            try:
                streamed = False
                if getattr(exe, "streams", False) and pending:
                    # one pipeline for the whole stage; workers read the parts
                    # ~2048 rows a read task; small stages in more, smaller tasks
                    # (at least one batch each) so the pool has work to spread
                    target = max(st.batch_size,
                                 min(STREAM_GROUP_ROWS, -(-pending // STREAM_MIN_GROUPS)))
                    streamed = exe.run_streaming(
                        st.cls, st.config, ctx, inp.groups(target),
                        n_batches=-(-pending // st.batch_size), batch_size=st.batch_size,
                        batch_seconds=st.batch_seconds, on_stats=on_stats,
                        concurrency=st.spec.concurrency, resources=st.resources)
                    if not streamed:  # a worker died: what is left goes in waves
                        inp = read_stage_input(dag, st, store, ctx)
                        rerun[0] += inp.pending
                if not streamed:
                    for wave in inp.waves(dag.spec.executor.wave_rows):
                        batches = list(batches_of(wave, st.batch_size, st.batch_seconds))
                        if rerun[0]:
                            rerun[1] += len(batches)
                        exe.run_stage(st.cls, st.config, ctx, batches, on_stats,
                                      concurrency=st.spec.concurrency,
                                      resources=st.resources)
                        dog.tick()
            except KeyboardInterrupt:
                if dog.fired:
                    raise StallError(
                        f"stage {st.id!r}: no batch finished for {timeout:g} s "
                        "(executor.stall_timeout_s); the run directory keeps every "
                        "finished batch, rerun to resume"
                    ) from None
                raise
    finally:
        wall = add_wall_seconds(store, st.id, time.monotonic() - t0)
    lost = getattr(exe, "lost_workers", [])[lost_before:]
    recovery = recovery_metrics([{k: f[k] for k in ("error", "message")} for f in lost],
                                rerun[0] + sum(f.get("rows_isolated", 0) for f in lost),
                                rerun[1] + sum(f.get("rows_isolated", 0) for f in lost))
    extra: dict[str, Any] = {"nodes": tally.to_metrics(),
                             "busy_seconds": round(tally.busy_s, 3)}
    if recovery:
        extra["recovery"] = recovery
    return finish_stage(st, store, inp, wall, budget, prog, console, extra,
                        dag.spec.executor.transient_retries)


def finish_stage(st: PlannedStage, store: RunStore, inp: StageInput, wall: float,
                 budget: ErrorBudget, prog: StageProgress, console: Any,
                 extra: dict[str, Any], transient_retries: int = 3) -> dict[str, Any]:
    """A stage's end, once every batch ran (unfused or as a member of a fused chain):
    the final error budget, dedup, metrics (plus ``extra``), summary, ``_SUCCESS``."""
    budget.check(final=True)
    if st.cls.unique_output_ids:
        _dedup_outputs(st, store)
    metrics = _metrics(st, inp, store, wall, transient_retries)
    metrics.update(extra)
    summary = None
    if st.cls.has_summary():
        cols = None if st.cls.summary_columns is None else list(st.cls.summary_columns)
        summary = st.cls.summarize(store.read_outputs(st.id, cols), store.read_rejects(st.id))
    if summary:
        metrics["stage_summary"] = summary
    store.write_metrics(st.id, metrics)
    mark_complete(st, store, metrics)
    prog.finish(metrics)
    if summary:
        for line in st.cls.summary_lines(summary):
            console.print(f"    {line}")
    return metrics


def max_error_fraction(dag: Dag, st: PlannedStage) -> float:
    """The stage's error budget: its own ``max_error_fraction``, else the executor's."""
    own = st.spec.max_error_fraction
    return dag.spec.executor.max_error_fraction if own is None else own


#: per stage: how many runs already retried each row rejected as transient
TRANSIENT_LEDGER = "_transient_retries.parquet"


def _ledger(store: RunStore, stage_id: str) -> dict[str, int]:
    t = store.read_stage_table(stage_id, TRANSIENT_LEDGER)
    if t is None:
        return {}
    return dict(zip(t.column("id").to_pylist(), t.column("retries").to_pylist(), strict=True))


def _retriable(t: pa.Table, ledger: dict[str, int], max_retries: int) -> Any:
    """Mask of the reject rows of ``t`` that run again: engine reasons, and transient
    rejects retried fewer than ``max_retries`` times."""
    retry = pc.fill_null(pc.is_in(t.column("reason"),
                                  value_set=pa.array(ENGINE_REASONS, pa.string())), False)
    if "kind" not in t.column_names:
        return retry
    spent = pa.array([ledger.get(i, 0) < max_retries for i in t.column("id").to_pylist()],
                     pa.bool_())
    return pc.or_(retry, pc.and_(is_transient(t.column("kind")), spent))


def clear_engine_failures(store: RunStore, stage_id: str, max_retries: int = 3) -> int:
    """Remove the stage's rejects that are not final so their rows run again: engine
    reasons (``error``, ``worker_crash``: the stage or its environment failed, often what
    made the last attempt fail) and transient rejects (a service or resource failed after
    its retries) that fewer than ``max_retries`` runs retried already (a ledger in the
    stage's directory counts them; after that the reject is final). Each reject part is
    rewritten atomically (or removed when nothing is left), and the ledger is written
    first, so an interruption here is harmless. Returns how many rows will be retried."""
    ledger = _ledger(store, stage_id)
    todo: list[tuple[Any, pa.Table, Any, int]] = []
    retried: list[str] = []
    for part in store.reject_parts(stage_id):
        t = store.read_outputs_part(part, None)
        retry = _retriable(t, ledger, max_retries)
        bad = int(pc.sum(retry).as_py() or 0)
        if not bad:
            continue
        todo.append((part, t, retry, bad))
        if "kind" in t.column_names:
            trans = pc.and_(retry, is_transient(t.column("kind")))
            retried.extend(t.filter(trans).column("id").to_pylist())
    if retried:
        for i in retried:
            ledger[i] = ledger.get(i, 0) + 1
        store.write_stage_table(stage_id, TRANSIENT_LEDGER, pa.table(
            {"id": pa.array(list(ledger), pa.string()),
             "retries": pa.array(list(ledger.values()), pa.int32())}))
    n = 0
    for part, t, retry, bad in todo:
        n += bad
        if bad == t.num_rows:
            store.remove_part(part)
        else:
            store.replace_part(part, t.filter(pc.invert(retry)))
    return n


def transient_left(store: RunStore, stage_id: str, max_retries: int = 3) -> int:
    """How many of the stage's transient rejects the next run retries."""
    t = store.read_rejects(stage_id, ["id", "reason", "kind"])
    if not t.num_rows or "kind" not in t.column_names:
        return 0
    ledger = _ledger(store, stage_id)
    mask = pc.and_(_retriable(t, ledger, max_retries), is_transient(t.column("kind")))
    return int(pc.sum(mask).as_py() or 0)


def mark_complete(st: PlannedStage, store: RunStore, metrics: dict[str, Any]) -> None:
    """``_SUCCESS`` for a stage that has nothing left to retry: no transient rejects of
    its own and every upstream stage complete. Otherwise the stage stays open, so the
    next run retries those rows and carries what they make downstream."""
    waiting = [n for n in st.spec.needs if not store.is_done(n)]
    if metrics.get("rows_transient") or waiting:
        metrics["incomplete"] = (
            f"{metrics['rows_transient']} transient rejects" if metrics.get("rows_transient")
            else f"upstream {', '.join(waiting)} incomplete")
        store.write_metrics(st.id, metrics)
        return
    store.mark_done(st.id)


def sink_dir(store: RunStore, st: PlannedStage) -> Any:
    """``RUN_DIR/<output_root>/<id>`` (a path, or an object prefix of a URL run dir)."""
    return store.sink_dir(st.cls.output_root, st.id)


def _run_sink(dag: Dag, st: PlannedStage, store: RunStore, *, offline: bool,
              console: Any) -> dict[str, Any]:
    """A sink exports its whole input into ``RUN_DIR/<output_root>/<id>/``.

    It writes into a scratch directory that is renamed into place when the export
    returns, then ``_SUCCESS`` is written: a killed export leaves no half-written files
    where users look, and a rerun simply exports again (exports are deterministic).
    """
    import shutil

    ctx = StageContext(stage_id=st.id, run_dir=str(store.root), offline=offline)
    store.make_stage_dir(st.id)
    store.write_fingerprint(st.id, st.fingerprint)
    store.clear_scratch(st.id)
    store.remove_tree(store.rejects_dir(st.id))
    t0 = time.monotonic()
    from speechmill.pipeline.sink_input import read_sink_input

    spill = store.local_dir("tmp", st.id)  # a large input's sorted, mapped copy
    if st.cls.reads_inputs and st.spec.needs:
        inputs = read_sink_input(
            [p for n in st.spec.needs for p in store.output_parts(n)],
            by_split=bool(getattr(st.config, "by_split", False)),
            max_rows=dag.spec.executor.wave_rows, spill=spill)
    else:
        inputs = pa.table({"id": pa.array([], pa.string())})
    prepared = st.cls.prepare(st.config, inputs, ctx)
    if prepared is not None:
        ctx = StageContext(stage_id=st.id, run_dir=str(store.root), offline=offline,
                           prepared=prepared)
    final = sink_dir(store, st)
    scratch = store.export_scratch(final)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    console.print(f"> {st.id}: exporting {inputs.num_rows} rows -> "
                  f"{store.to_url(final)}")
    n_in, sec_in = inputs.num_rows, total_seconds(inputs)
    stage = st.cls(st.config, ctx)
    try:
        stage.setup()
        try:
            res = stage.export(inputs, scratch)
        finally:
            stage.teardown()
    finally:  # the sorted copy of a large input goes, whatever the export did
        del inputs, stage, ctx
        shutil.rmtree(spill, ignore_errors=True)
    if res.rejects is not None and res.rejects.num_rows:
        store.write_rejects(st.id, "export", res.rejects)
    published = store.publish_export(scratch, final)  # a rename, or uploads (markers last)
    wall = store.add_wall_seconds(st.id, time.monotonic() - t0)
    rejects = store.read_rejects(st.id, ["id", "reason", "duration"])
    reasons = _reason_counts(rejects)
    metrics: dict[str, Any] = {
        "stage": st.id,
        "uses": st.spec.uses,
        "rows_in": n_in,
        "rows_out": int(res.rows_out),
        "rows_rejected": rejects.num_rows,
        "audio_hours_in": sec_in / 3600.0,
        "audio_hours_out": float(res.seconds_out) / 3600.0,
        "wall_seconds": round(wall, 3),
        "realtime_factor": (wall / sec_in) if sec_in > 0 else None,
        "speed_x_realtime": (sec_in / wall) if wall > 0 and sec_in > 0 else None,
        "reasons": dict(sorted(reasons.items())),
        "output_dir": published,
        "fingerprint": st.fingerprint,
        "finished_at": _now(),
    }
    if res.summary:
        metrics["stage_summary"] = res.summary
    store.write_metrics(st.id, metrics)
    mark_complete(st, store, metrics)
    console.print(
        f"  done {st.id}: {n_in} in -> {res.rows_out} exported, "
        f"{rejects.num_rows} rejected; {res.seconds_out / 3600:.3f} h in {wall:.1f} s"
    )
    for line in st.cls.summary_lines(res.summary or {}):
        console.print(f"    {line}")
    return metrics


def _dedup_outputs(st: PlannedStage, store: RunStore) -> None:
    """Keep one output row per id; the others become ``duplicate`` rejects.

    The survivor is chosen by content, not by timing (smallest ``source_url``, then
    ``parent_id``), so a resumed run keeps the same rows as an uninterrupted one. Each
    touched part is rewritten atomically after its rejects are written, so a crash
    in between is repaired by the next run's identical pass.
    """
    parts = store.output_parts(st.id)
    cols = ["id", "parent_id", "source_url"]
    best: dict[str, tuple[str, str]] = {}
    per_part: list[tuple[Any, pa.Table]] = []
    for p in parts:
        t = store.read_outputs_part(p, cols)
        per_part.append((p, t))
        for rid, par, src in zip(*(t.column(c).to_pylist() for c in cols), strict=True):
            key = (src or "", par or "")
            if rid not in best or key < best[rid]:
                best[rid] = key
    for p, t in per_part:
        keep = [
            best[rid] == (src or "", par or "")
            for rid, par, src in zip(*(t.column(c).to_pylist() for c in cols), strict=True)
        ]
        if all(keep):
            continue
        full = store.read_outputs_part(p, None)
        losers = full.filter(pc.invert(pa.array(keep)))
        rows = []
        for r in losers.to_pylist():
            winner_src = best[r["id"]][0]
            rej = reject({**r, "id": r["parent_id"]}, st.id, "duplicate",
                         f"same content as {winner_src} (id {r['id']})")
            rows.append(rej)
        store.write_rejects(st.id, f"dup-{Path(str(p)).stem.removeprefix('part-')}",
                            pa.Table.from_pylist(rows, schema=REJECT_SCHEMA))
        kept = full.filter(pa.array(keep))
        if kept.num_rows:
            store.replace_part(p, kept)
        else:
            store.remove_part(p)


def _reason_counts(rejects: pa.Table) -> dict[str, int]:
    """Rejects per reason (Arrow ``value_counts``: no Python object per reject)."""
    if not rejects.num_rows:
        return {}
    vc = pc.value_counts(rejects.column("reason"))
    return {str(v): int(c) for v, c in zip(vc.field("values").to_pylist(),
                                           vc.field("counts").to_pylist(), strict=True)}


def _metrics(st: PlannedStage, inp: StageInput, store: RunStore, wall: float,
             transient_retries: int = 3) -> dict[str, Any]:
    outs = store.read_outputs(st.id, ["id", "duration"])
    rejects = store.read_rejects(st.id, ["id", "reason", "duration"])
    sec_out = total_seconds(outs)
    sec_rej = float(pc.sum(rejects.column("duration")).as_py() or 0.0) if rejects.num_rows else 0.0
    sec_in = inp.seconds_in
    if st.cls.is_source or not inp.has_duration:
        sec_in = sec_out + sec_rej
    reasons = _reason_counts(rejects)
    return {
        "stage": st.id,
        "uses": st.spec.uses,
        "rows_in": inp.rows_in,
        "rows_out": outs.num_rows,
        "rows_rejected": rejects.num_rows,
        "rows_transient": transient_left(store, st.id, transient_retries),
        "audio_hours_in": sec_in / 3600.0,
        "audio_hours_out": sec_out / 3600.0,
        "wall_seconds": round(wall, 3),
        # realtime factor: wall seconds per second of input audio (lower is faster)
        "realtime_factor": (wall / sec_in) if sec_in > 0 else None,
        "speed_x_realtime": (sec_in / wall) if wall > 0 and sec_in > 0 else None,
        "reasons": dict(sorted(reasons.items())),
        "fingerprint": st.fingerprint,
        "finished_at": _now(),
    }
