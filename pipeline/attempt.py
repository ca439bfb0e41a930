"""The life of a stage attempt: open -> read input -> prepare -> run -> finish.

Every stage that runs goes through here, alone (:func:`run_stage`), as an export
(:func:`run_sink`) or as a member of a fused chain (:func:`run_chain`):

- **open** (:func:`open_attempt`): the stage's directory, its config fingerprint, the
  scratch files a killed attempt left behind cleared; the rejects that are not final
  are cleared so their rows run again (a sink's rejects all go: it exports again).
- **read input** (:func:`~speechmill.pipeline.stage_input.read_stage_input`): the
  upstream parts (or a source's plan), with the rows still to do marked; a sink reads
  its whole input as one table (:mod:`.sink_input`).
- **prepare** (:func:`prepared_context`): the stage's optional ``prepare`` over the
  columns it declares; what it returns travels to the workers in the
  :class:`StageContext` (built by :func:`stage_context` only).
- **run**: the executor runs the batches, on Ray as one streamed pipeline (read tasks
  read the parts on the workers), otherwise (and on Ray after a worker died) in waves
  of ``executor.wave_rows`` rows; progress, the error budget and the stall watchdog
  follow the batch stats as they arrive.
- **finish** (:func:`finish_stage`): the final error budget, optional dedup of output
  ids, ``metrics.json``, the stage summary and ``_SUCCESS`` (:mod:`.stage_end`).

A :class:`RunSession` carries what every attempt of a run shares: the DAG, the store,
the executor, the offline flag, whether progress bars show, and the console.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from speechmill.pipeline.batch import batches_of
from speechmill.pipeline.dag import Dag, PlannedStage
from speechmill.pipeline.errors import StallError
from speechmill.pipeline.executors.base import ChainMember, Executor
from speechmill.pipeline.failures import ErrorBudget
from speechmill.pipeline.nodes import NodeTally, recovery_metrics
from speechmill.pipeline.records import total_seconds
from speechmill.pipeline.report import StageProgress
from speechmill.pipeline.signals import Watchdog
from speechmill.pipeline.stage import StageContext
from speechmill.pipeline.stage_end import (
    clear_engine_failures,
    dedup_outputs,
    mark_complete,
    now_iso,
    reason_counts,
    stage_metrics,
)
from speechmill.pipeline.stage_input import (
    STREAM_GROUP_ROWS,
    STREAM_MIN_GROUPS,
    StageInput,
    read_stage_input,
)
from speechmill.pipeline.store import RunStore


@dataclass
class RunSession:
    """What every stage attempt of one run shares."""

    dag: Dag
    store: RunStore
    exe: Executor
    offline: bool = False
    show: bool = True  # progress bars
    console: Any = None

    @property
    def settings(self) -> Any:
        """The DAG's ``executor:`` settings."""
        return self.dag.spec.executor


def stage_context(session: RunSession, st: PlannedStage, prepared: Any = None
                  ) -> StageContext:
    """The context a stage instance of this run gets (``prepared``: what its
    ``prepare`` computed)."""
    return StageContext(stage_id=st.id, run_dir=str(session.store.root),
                        offline=session.offline, prepared=prepared)


def add_wall_seconds(store: RunStore, stage_id: str, seconds: float) -> float:
    """The store's wall-time bookkeeping, called in ``finally`` blocks: while an error is
    on its way out (say the disk filled up), a failure of this write never replaces it."""
    try:
        return store.add_wall_seconds(stage_id, seconds)
    except OSError:
        if sys.exc_info()[0] is None:
            raise
        return seconds


def max_error_fraction(dag: Dag, st: PlannedStage) -> float:
    """The stage's error budget: its own ``max_error_fraction``, else the executor's."""
    own = st.spec.max_error_fraction
    return dag.spec.executor.max_error_fraction if own is None else own


def sink_dir(store: RunStore, st: PlannedStage) -> Any:
    """``RUN_DIR/<output_root>/<id>`` (a path, or an object prefix of a URL run dir)."""
    return store.sink_dir(st.cls.output_root, st.id)


def open_attempt(session: RunSession, st: PlannedStage) -> StageContext:
    """The stage's directory ready for an attempt: fingerprint written, scratch files of
    a killed attempt gone, and the rejects that are not final cleared (a sink's: all of
    them); the context before ``prepare``."""
    store = session.store
    store.make_stage_dir(st.id)
    store.write_fingerprint(st.id, st.fingerprint)
    store.clear_scratch(st.id)  # spools/temp files a killed attempt left behind
    if st.cls.is_sink:
        store.remove_tree(store.rejects_dir(st.id))
        return stage_context(session, st)
    retry = clear_engine_failures(store, st.id, session.settings.transient_retries)
    if retry:
        session.console.print(f"  {st.id}: retrying {retry} rows that failed with errors "
                              "or transient service failures in an earlier attempt")
    return stage_context(session, st)


def prepared_context(session: RunSession, st: PlannedStage, ctx: StageContext,
                     rows: pa.Table) -> StageContext:
    """Run the stage's ``prepare`` over ``rows``; the context that carries its result."""
    prepared = st.cls.prepare(st.config, rows, ctx)
    return ctx if prepared is None else stage_context(session, st, prepared)


def run_stage(session: RunSession, st: PlannedStage, recovering_from: int | None = None
              ) -> dict[str, Any]:
    """Run one stage to completion; its metrics. ``recovering_from``: the index in the
    executor's ``lost_workers`` of a failure that stopped this stage's fused stream: its
    pending rows count as run again."""
    if st.cls.is_sink:
        return run_sink(session, st)
    dag, store, exe, console = session.dag, session.store, session.exe, session.console
    ctx = open_attempt(session, st)
    t0 = time.monotonic()
    inp = read_stage_input(dag, st, store, ctx)
    if st.cls.has_prepare():
        ctx = prepared_context(session, st, ctx, inp.read_all(st.cls.prepare_columns))
    pending = inp.pending
    prog = StageProgress(
        st.id, total=inp.rows_in - inp.repeated,
        already=inp.rows_in - inp.repeated - pending,
        console=console, enabled=session.show,
    )
    timeout = session.settings.stall_timeout_s
    budget = ErrorBudget(st.id, max_error_fraction(dag, st),
                         already=inp.rows_in - inp.repeated - pending,
                         total=inp.rows_in - inp.repeated)
    tally = NodeTally()  # where this attempt's batches ran
    rerun = [0, 0]  # rows, batches run again after a worker was lost
    lost_before = len(exe.lost_workers)
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
                if exe.streams and pending:
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
                    for wave in inp.waves(session.settings.wave_rows):
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
    lost = exe.lost_workers[lost_before:]
    recovery = recovery_metrics([{k: f[k] for k in ("error", "message")} for f in lost],
                                rerun[0] + sum(f.get("rows_isolated", 0) for f in lost),
                                rerun[1] + sum(f.get("rows_isolated", 0) for f in lost))
    extra: dict[str, Any] = {"nodes": tally.to_metrics(),
                             "busy_seconds": round(tally.busy_s, 3)}
    if recovery:
        extra["recovery"] = recovery
    return finish_stage(session, st, inp, wall, budget, prog, extra)


def finish_stage(session: RunSession, st: PlannedStage, inp: StageInput, wall: float,
                 budget: ErrorBudget, prog: StageProgress, extra: dict[str, Any]
                 ) -> dict[str, Any]:
    """A stage's end, once every batch ran (alone or as a member of a fused chain):
    the final error budget, dedup, metrics (plus ``extra``), summary, ``_SUCCESS``."""
    store = session.store
    budget.check(final=True)
    if st.cls.unique_output_ids:
        dedup_outputs(st, store)
    metrics = stage_metrics(st, inp, store, wall, session.settings.transient_retries)
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
            session.console.print(f"    {line}")
    return metrics


def run_sink(session: RunSession, st: PlannedStage) -> dict[str, Any]:
    """A sink exports its whole input into ``RUN_DIR/<output_root>/<id>/``.

    It writes into a scratch directory that is renamed into place when the export
    returns, then ``_SUCCESS`` is written: a killed export leaves no half-written files
    where users look, and a rerun simply exports again (exports are deterministic).
    """
    import shutil

    from speechmill.pipeline.sink_input import read_sink_input

    dag, store, console = session.dag, session.store, session.console
    ctx = open_attempt(session, st)
    t0 = time.monotonic()
    spill = store.local_dir("tmp", st.id)  # a large input's sorted, mapped copy
    if st.cls.reads_inputs and st.spec.needs:
        inputs = read_sink_input(
            [p for n in st.spec.needs for p in store.output_parts(n)],
            by_split=bool(getattr(st.config, "by_split", False)),
            max_rows=dag.spec.executor.wave_rows, spill=spill)
    else:
        inputs = pa.table({"id": pa.array([], pa.string())})
    ctx = prepared_context(session, st, ctx, inputs)
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
    reasons = reason_counts(rejects)
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
        "finished_at": now_iso(),
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


# -- fused chains ----------------------------------------------------------------------

@dataclass
class FusedMember(ChainMember):
    """A chain member with what the driver follows of it: error budget, progress,
    where its batches ran and when its first batch started and last one ended."""

    budget: ErrorBudget | None = None
    prog: Any = None
    tally: NodeTally = field(default_factory=NodeTally)
    first_start: float | None = None
    last_end: float | None = None
    chain: list[str] = field(default_factory=list)


def run_chain(session: RunSession, chain: list[PlannedStage]) -> list[dict[str, Any]]:
    """Run the chain's stages as one pipeline (:mod:`.fused`); their metrics, in order.

    Each member opens and reads its input as a stage alone would (the head's input;
    another member's backlog: rows its upstream committed in earlier attempts that it
    has not consumed); the head's ``prepare`` runs over its whole input, another
    member's over no rows. Members are finished in order once the stream ends; a member
    whose input still has rows to do then (it should not) finishes them unfused first.
    If a worker process died, the members run one by one instead (which isolates the
    row that kills its worker)."""
    dag, store, exe, console = session.dag, session.store, session.exe, session.console
    console.print(f"[bold cyan]>[/] fused: {' -> '.join(s.id for s in chain)}")
    t0 = time.monotonic()
    members: list[FusedMember] = []
    for i, st in enumerate(chain):
        ctx = open_attempt(session, st)
        inp = read_stage_input(dag, st, store, ctx)
        if st.cls.has_prepare():  # the head's over its whole input; others' need none
            rows = (inp.read_all(st.cls.prepare_columns) if i == 0
                    else pa.table({"id": pa.array([], pa.string())}))
            ctx = prepared_context(session, st, ctx, rows)
        todo = inp.rows_in - inp.repeated
        already = todo - inp.pending
        budget = ErrorBudget(st.id, max_error_fraction(dag, st), already=already,
                             total=todo if i == 0 else None)
        prog = StageProgress(st.id, total=todo, already=already, console=console,
                             enabled=session.show)
        if already:
            console.print(f"  {st.id}: resuming ({already} rows already done, "
                          f"{inp.pending} committed upstream still to do)")
        members.append(FusedMember(st, ctx, inp, budget=budget, prog=prog,
                                   chain=[s.id for s in chain]))

    timeout = session.settings.stall_timeout_s
    streamed = True
    with Watchdog(timeout, chain[0].id) as dog:
        def on_stats(m: FusedMember, stats: dict[str, Any]) -> None:
            assert m.budget is not None
            dog.tick()
            t_a, t_b = stats.pop("t_start", None), stats.pop("t_end", None)
            if t_a is not None:
                m.first_start = t_a if m.first_start is None else min(m.first_start, t_a)
                m.last_end = t_b if m.last_end is None else max(m.last_end, t_b)
            m.prog.total = max(m.prog.total, m.prog.done + int(stats.get("rows_in", 0)))
            m.tally.add(stats)
            m.prog.update(stats)
            m.budget.add(stats)
            m.budget.check()

        try:
            streamed = exe.run_chain(list(members), store, on_stats,
                                     wave_rows=session.settings.wave_rows,
                                     colocate=session.settings.colocate)
        except KeyboardInterrupt:
            if dog.fired:
                raise StallError(
                    f"fused stages {', '.join(m.id for m in members)}: no batch finished "
                    f"for {timeout:g} s (executor.stall_timeout_s); the run directory "
                    "keeps every finished batch, rerun to resume") from None
            raise
        finally:
            if not streamed or sys.exc_info()[0] is not None:  # the stream's time counts
                for m in members:
                    add_wall_seconds(store, m.id, time.monotonic() - t0)
    if not streamed:  # a worker died: the rest runs stage by stage (isolates the row)
        lost_at = len(exe.lost_workers) - 1
        return [run_stage(session, m.st, recovering_from=lost_at) for m in members]
    return [_finish_member(session, m, t0) for m in members]


def _finish_member(session: RunSession, m: FusedMember, t0: float) -> dict[str, Any]:
    """:func:`finish_stage` for one member of a finished stream."""
    dag, store, exe = session.dag, session.store, session.exe
    st, budget = m.st, m.budget
    assert budget is not None
    inp = read_stage_input(dag, st, store, m.ctx)
    if inp.pending:  # safety net: rows the stream did not bring (never expected)
        for wave in inp.waves(session.settings.wave_rows):
            exe.run_stage(st.cls, st.config, m.ctx,
                          list(batches_of(wave, st.batch_size, st.batch_seconds)),
                          lambda s: (m.tally.add(s), budget.add(s), m.prog.update(s)),
                          concurrency=st.spec.concurrency, resources=st.resources)
        inp = read_stage_input(dag, st, store, m.ctx)
    end = m.ended_mono or time.monotonic()
    wall = store.add_wall_seconds(st.id, end - t0)
    return finish_stage(session, st, inp, wall, budget, m.prog, {
        "nodes": m.tally.to_metrics(),
        "busy_seconds": round(m.tally.busy_s, 3),
        "fused": {"chain": m.chain, "first_batch_started_at": m.first_start,
                  "last_batch_ended_at": m.last_end},
    })
