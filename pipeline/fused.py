"""Fusion: consecutive row-local stages run as one streamed pipeline.

The runner runs each stage to completion before the next (a barrier). A *chain* lifts
the barrier between consecutive pending stages where the later one needs only the one
before it and can start on part of its input: no sink, no source, no ``prepare()`` over
the whole input (:attr:`Stage.prepare_reads_inputs`); the earlier one is no sink and
does not rewrite its parts when it ends (``unique_output_ids``). The head of a chain may
be anything but a sink (a source, a stage with a whole-input ``prepare()``): its
upstream is complete when the chain starts. ``executor: {fuse: false}`` turns it off.

Every member still commits its own parts and rejects batch by batch through
:func:`~speechmill.pipeline.batch.run_batch`, and what a member consumes is what its
upstream *committed* (the batch's output part, read back), so the run directory is the
same as unfused: resume, ``metrics.json``, ``status`` and ``--restart-from`` keep their
meaning. On resume each member first gets its *backlog* (rows its upstream committed in
earlier attempts that it has not consumed, from :func:`~.runner.read_stage_input`), then
what its upstream commits now. Members are finalised in order once the stream ends
(error budget, dedup, metrics, ``_SUCCESS``); a member whose input still has rows to do
then (it should not) finishes them unfused first.

Local executor: batches flow depth-first, each member holding at most about a batch of
rows from upstream. Ray: one Ray Data pipeline, one operator per member (its own
resources, actor pool for model stages); rows travel as IPC-encoded records tagged with
the member they are for (backlogs enter mid-pipeline with their member's tag, other
operators pass them through), batch stats ride along to the driver. CPU/GPU
reservations are scaled down when one worker of every member would not fit the cluster
at once, so every operator can run. Ray Data's backpressure bounds memory. If a worker
process dies the stream stops and the remaining members run unfused (which isolates
the row that kills its worker).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from speechmill.pipeline.batch import part_name, run_batch
from speechmill.pipeline.dag import Dag, PlannedStage
from speechmill.pipeline.failures import ErrorBudget, fatal_info, stage_failed
from speechmill.pipeline.nodes import NodeTally
from speechmill.pipeline.records import concat
from speechmill.pipeline.stage import Resources, StageContext
from speechmill.pipeline.store import RunStore

#: Ray row tag of a stats record (goes to the driver)
_TO_DRIVER = -1


def joins_chain(st: PlannedStage) -> bool:
    """Whether ``st`` can start on part of its (single) upstream's outputs."""
    c = st.cls
    return (len(st.spec.needs) == 1 and not (c.is_source or c.is_sink)
            and not (c.has_prepare() and c.prepare_reads_inputs))


def feeds_chain(st: PlannedStage) -> bool:
    """Whether ``st``'s parts are final as each batch commits (a fused downstream may
    read them at once)."""
    return not (st.cls.is_sink or st.cls.unique_output_ids)


def plan_chains(dag: Dag, store: RunStore) -> dict[str, list[PlannedStage]]:
    """Chains of two or more pending stages, by the id of their head stage."""
    if not getattr(dag.spec.executor, "fuse", True):
        return {}
    chains: dict[str, list[PlannedStage]] = {}
    cur: list[PlannedStage] = []

    def close() -> None:
        if len(cur) > 1:
            chains[cur[0].id] = list(cur)

    for st in dag.stages:
        if store.is_done(st.id):
            close()
            cur = []
        elif cur and feeds_chain(cur[-1]) and joins_chain(st) and st.spec.needs == [cur[-1].id]:
            cur.append(st)
        else:
            close()
            cur = [] if st.cls.is_sink else [st]
    close()
    return chains


@dataclass
class _Member:
    st: PlannedStage
    ctx: StageContext
    inp: Any  # the StageInput read at the chain's start (head: its input; others: backlog)
    budget: ErrorBudget
    prog: Any
    buf: list[pa.Table] = field(default_factory=list)
    nbuf: int = 0
    seen: set[str] = field(default_factory=set)  # ids pushed this attempt (local)
    tally: NodeTally = field(default_factory=NodeTally)  # where its batches ran
    first_start: float | None = None
    last_end: float | None = None
    ended_mono: float | None = None
    chain: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.st.id


def run_chain(dag: Dag, chain: list[PlannedStage], store: RunStore, exe: Any, *,
              offline: bool, show: bool, console: Any) -> list[dict[str, Any]]:
    """Run the chain's stages as one pipeline; their metrics, in order."""
    from speechmill.pipeline import runner as R
    from speechmill.pipeline.executors import Watchdog

    console.print(f"[bold cyan]>[/] fused: {' -> '.join(s.id for s in chain)}")
    t0 = time.monotonic()
    members: list[_Member] = []
    for i, st in enumerate(chain):
        ctx = StageContext(stage_id=st.id, run_dir=str(store.root), offline=offline)
        store.make_stage_dir(st.id)
        store.write_fingerprint(st.id, st.fingerprint)
        store.clear_scratch(st.id)
        retry = R.clear_engine_failures(store, st.id, dag.spec.executor.transient_retries)
        if retry:
            console.print(f"  {st.id}: retrying {retry} rows that failed with errors or "
                          "transient service failures in an earlier attempt")
        inp = R.read_stage_input(dag, st, store, ctx)
        if st.cls.has_prepare():  # the head's over its whole input; others' need none
            rows = (inp.read_all(st.cls.prepare_columns) if i == 0
                    else pa.table({"id": pa.array([], pa.string())}))
            prepared = st.cls.prepare(st.config, rows, ctx)
            if prepared is not None:
                ctx = StageContext(stage_id=st.id, run_dir=str(store.root),
                                   offline=offline, prepared=prepared)
        todo = inp.rows_in - inp.repeated
        already = todo - inp.pending
        budget = ErrorBudget(st.id, R.max_error_fraction(dag, st), already=already,
                             total=todo if i == 0 else None)
        prog = R.StageProgress(st.id, total=todo, already=already, console=console,
                               enabled=show)
        if already:
            console.print(f"  {st.id}: resuming ({already} rows already done, "
                          f"{inp.pending} committed upstream still to do)")
        members.append(_Member(st, ctx, inp, budget, prog, chain=[s.id for s in chain]))

    timeout = dag.spec.executor.stall_timeout_s
    streamed = True
    with Watchdog(timeout, chain[0].id) as dog:
        def on_stats(m: _Member, stats: dict[str, Any]) -> None:
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
            if getattr(exe, "streams", False):
                streamed = _run_ray(exe, members, store, dag.spec.executor.colocate,
                                    on_stats)
            else:
                _run_local(members, store, dag.spec.executor.wave_rows, on_stats)
        except KeyboardInterrupt:
            if dog.fired:
                from speechmill.pipeline.errors import StallError

                raise StallError(
                    f"fused stages {', '.join(m.id for m in members)}: no batch finished "
                    f"for {timeout:g} s (executor.stall_timeout_s); the run directory "
                    "keeps every finished batch, rerun to resume") from None
            raise
        finally:
            if not streamed or sys.exc_info()[0] is not None:  # the stream's time counts
                for m in members:
                    R.add_wall_seconds(store, m.id, time.monotonic() - t0)
    out: list[dict[str, Any]] = []
    if not streamed:  # a worker died: the rest runs stage by stage (isolates the row)
        lost_at = len(exe.lost_workers) - 1
        for m in members:
            out.append(R._run_stage(dag, m.st, store, exe, offline=offline, show=show,
                                    console=console, recovering_from=lost_at))
        return out
    for m in members:
        out.append(_finish(dag, m, store, exe, t0, console))
    return out


def _finish(dag: Dag, m: _Member, store: RunStore, exe: Any, t0: float,
            console: Any) -> dict[str, Any]:
    """What the runner does at a stage's end, for one member of a finished stream."""
    from speechmill.pipeline import runner as R
    from speechmill.pipeline.executors import batches_of

    st = m.st
    inp = R.read_stage_input(dag, st, store, m.ctx)
    if inp.pending:  # safety net: rows the stream did not bring (never expected)
        for wave in inp.waves(dag.spec.executor.wave_rows):
            exe.run_stage(st.cls, st.config, m.ctx,
                          list(batches_of(wave, st.batch_size, st.batch_seconds)),
                          lambda s: (m.tally.add(s), m.budget.add(s), m.prog.update(s)),
                          concurrency=st.spec.concurrency, resources=st.resources)
        inp = R.read_stage_input(dag, st, store, m.ctx)
    end = m.ended_mono or time.monotonic()
    wall = store.add_wall_seconds(st.id, end - t0)
    return R.finish_stage(st, store, inp, wall, m.budget, m.prog, console, {
        "nodes": m.tally.to_metrics(),
        "busy_seconds": round(m.tally.busy_s, 3),
        "fused": {"chain": m.chain, "first_batch_started_at": m.first_start,
                  "last_batch_ended_at": m.last_end},
    }, dag.spec.executor.transient_retries)


def committed_outputs(store: RunStore, stage_id: str, batch: pa.Table,
                      stats: dict[str, Any]) -> pa.Table | None:
    """The output part :func:`run_batch` committed for ``batch``, read back through the
    store (on an object store its media paths name the uploaded objects); None when
    the batch had no outputs."""
    if not stats.get("rows_out"):
        return None
    return store.read_outputs_part(
        f"{store.stage_dir(stage_id)}/part-{part_name(batch)}.parquet", None)


def _timed_batch(stage: Any, batch: pa.Table, store: RunStore) -> dict[str, Any]:
    t_a = time.time()
    stats = run_batch(stage, batch, store)
    stats.update(t_start=t_a, t_end=time.time())
    return stats


# -- local: depth-first ----------------------------------------------------------------

def _run_local(members: list[_Member], store: RunStore, wave_rows: int,
               on_stats: Any) -> None:
    from speechmill.pipeline.executors import batches_of

    stages: list[Any] = []
    try:
        for m in members:
            try:
                s = m.st.cls(m.st.config, m.ctx)
                s.setup()
            except Exception as e:
                raise stage_failed(m.id, fatal_info(e, "setup")) from e
            stages.append(s)

        def push(k: int, t: pa.Table) -> None:
            m = members[k]
            ids = t.column("id").to_pylist()
            if any(i in m.seen for i in ids) or len(set(ids)) < len(ids):
                keep = []
                for i in ids:  # an id seen before is not processed twice
                    keep.append(i not in m.seen)
                    m.seen.add(i)
                t = t.filter(pa.array(keep))
            else:
                m.seen.update(ids)
            if t.num_rows:
                m.buf.append(t)
                m.nbuf += t.num_rows
                if m.nbuf >= m.st.batch_size:
                    drain(k, final=False)

        def drain(k: int, final: bool) -> None:
            m = members[k]
            if not m.nbuf:
                return
            batches = list(batches_of(concat(m.buf), m.st.batch_size, m.st.batch_seconds))
            keep: list[pa.Table] = []
            if not final and batches[-1].num_rows < m.st.batch_size:
                keep = [batches.pop()]
            m.buf, m.nbuf = keep, sum(b.num_rows for b in keep)
            for b in batches:
                try:
                    stats = _timed_batch(stages[k], b, store)
                except Exception as e:
                    raise stage_failed(m.id, fatal_info(e, "batch")) from e
                on_stats(m, stats)
                if k + 1 < len(members):
                    out = committed_outputs(store, m.id, b, stats)
                    if out is not None and out.num_rows:
                        push(k + 1, out)

        for k, m in enumerate(members):  # backlogs (the head's: its whole input)
            for wave in m.inp.waves(wave_rows):
                push(k, wave)
        for k, m in enumerate(members):  # then flush, upstream first
            drain(k, final=True)
            m.ended_mono = time.monotonic()
    finally:
        for s in stages:
            s.teardown()


# -- Ray: one Ray Data pipeline, one operator per member -------------------------------

def _ipc(t: pa.Table) -> bytes:
    from speechmill.pipeline.executors import _ipc as enc

    return enc(t)


def _records(t: pa.Table, to: int) -> pa.Table:
    """One Ray row per record of ``t``, tagged for member ``to``."""
    n = t.num_rows
    return pa.table({"to": pa.array([to] * n, pa.int32()),
                     "ipc": pa.array([_ipc(t.slice(i, 1)) for i in range(n)], pa.binary()),
                     "stats": pa.array([""] * n, pa.string())})


def _stats_row(stage_id: str, stats: dict[str, Any]) -> pa.Table:
    return pa.table({"to": pa.array([_TO_DRIVER], pa.int32()),
                     "ipc": pa.array([b""], pa.binary()),
                     "stats": pa.array([json.dumps({"stage": stage_id, **stats})])})


def read_tagged(items: list[tuple[Any, Any]], to: int, stage_id: str, size: int = 256) -> Any:
    """Worker side: read one group of upstream units for member ``to``, in blocks of
    ``size`` rows (its batch size: each block can go to another worker)."""
    from speechmill.pipeline.store import read_unit

    try:
        t = concat([read_unit(unit, keep) for unit, keep in items])
    except Exception as e:  # e.g. an unreadable upstream part: the chain cannot go on
        yield _stats_row(stage_id, {"fatal": fatal_info(e, "read")})
        return
    for a in range(0, t.num_rows, size):
        yield _records(t.slice(a, size), to)


def _tagged_source(tasks: list[tuple[list[tuple[Any, Any]], int, str, int]]) -> Any:
    import functools

    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class _Tagged(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None)
            return [ReadTask(functools.partial(read_tagged, g, to, sid, size), meta)
                    for g, to, sid, size in tasks]

    return _Tagged()


class _Step:
    """One member's work on a Ray batch: run the rows tagged for it, pass the others
    through, emit its stats and (unless last) its committed outputs for the next."""

    def __init__(self, k: int, last: bool, st: PlannedStage, ctx: StageContext) -> None:
        from speechmill.pipeline.executors import _quiet_worker, _set_up

        _quiet_worker()
        self.k, self.last, self.sid = k, last, ctx.stage_id
        self.size, self.seconds = st.batch_size, st.batch_seconds
        self.store = RunStore(ctx.run_dir)
        self.stage, self.fatal = _set_up(st.cls, st.config, ctx)

    def __call__(self, batch: pa.Table) -> Any:
        """A generator: each batch's stats and outputs leave as their own block at once, so
        the next operator starts on them while this one goes on."""
        import pyarrow.compute as pc

        from speechmill.pipeline.executors import _from_ipc, batches_of

        mine = pc.equal(batch.column("to"), self.k)
        other = batch.filter(pc.invert(mine))
        if other.num_rows:
            yield other
        rows = batch.filter(mine).column("ipc").to_pylist()
        if not rows:
            return
        if self.fatal is not None:
            yield _stats_row(self.sid, {"fatal": self.fatal})
            return
        t = concat([_from_ipc(r) for r in rows])
        for b in batches_of(t, self.size, self.seconds):
            try:
                stats = _timed_batch(self.stage, b, self.store)
            except Exception as e:
                self.fatal = fatal_info(e, "batch")
                yield _stats_row(self.sid, {"fatal": self.fatal})
                return
            out = [_stats_row(self.sid, stats)]
            if not self.last:
                o = committed_outputs(self.store, self.sid, b, stats)
                if o is not None and o.num_rows:
                    out.append(_records(o, self.k + 1))
            yield concat(out)


def _step_task(batch: pa.Table, k: int, last: bool, st: PlannedStage,
               ctx: StageContext) -> Any:
    yield from _worker_cached(_spec_key(k, last, st, ctx),
                              lambda: _Step(k, last, st, ctx))(batch)


def _spec_key(k: int, last: bool, st: PlannedStage, ctx: StageContext) -> tuple[Any, ...]:
    return (k, last, ctx.stage_id, ctx.run_dir, st.config.model_dump_json())


def _worker_cached(key: Any, make: Any) -> Any:
    """The step (or chain) a Ray task worker set up for ``key``, set up on first use: a
    task worker keeps its stages' models between tasks."""
    obj = _TASK_CACHE.get(key)
    if obj is None:
        obj = _TASK_CACHE[key] = make()
    return obj


_TASK_CACHE: dict[Any, Any] = {}  # per task worker


def fit_resources(members: list[PlannedStage], cpus: float, gpus: float
                  ) -> list[Resources]:
    """Each member's worker reservation, scaled down (CPUs and GPUs separately) when one
    worker of every member would not fit the cluster at once: every operator of the
    pipeline must be able to run, or the stream would wait forever."""
    from speechmill.pipeline.executors import READ_TASK_CPUS

    res = [st.resources for st in members]
    need_c = sum(r.cpus for r in res)
    need_g = sum(r.gpus for r in res) if gpus > 0 else 0.0
    # the read tasks keep their share: the members' reservations fit in what is left
    fc = min(1.0, (cpus - READ_TASK_CPUS) / need_c) if need_c > 0 else 1.0
    fg = min(1.0, gpus / need_g) if need_g > 0 else 1.0
    return [Resources(cpus=r.cpus * fc, gpus=(r.gpus * fg if gpus > 0 else 0.0),
                      memory_gb=r.memory_gb) for r in res]


def colocated(members: list[PlannedStage], exe: Any, setting: bool | None) -> bool:
    """Whether a chain runs as one operator whose workers hold every member
    (``executor.colocate``; by default on a small single machine with no GPU stage and
    no member with its own ``concurrency``)."""
    from speechmill.pipeline.executors import SMALL_CLUSTER_CPUS

    if setting is not None:
        return setting
    return (exe.single_node and exe.cluster_cpus < SMALL_CLUSTER_CPUS
            and not any(st.resources.gpus > 0 or st.spec.concurrency for st in members))


class _Chain:
    """Every member of a chain in one worker (``executor.colocate``): each Ray batch goes
    through the members in order, each running the rows tagged for it and passing its
    committed outputs to the next within the call; stats leave at once. One worker per
    CPU then works like one plain loop per CPU (models that members share are loaded
    once per process; nothing waits on another process), while each member still
    commits its own parts and rejects batch by batch."""

    def __init__(self, specs: list[tuple[int, bool, PlannedStage, StageContext]]) -> None:
        self.steps = [_Step(k, last, st, ctx) for k, last, st, ctx in specs]

    def __call__(self, batch: pa.Table) -> Any:
        import pyarrow.compute as pc

        cur = [batch]
        for step in self.steps:
            nxt: list[pa.Table] = []
            for t in cur:
                for out in step(t):
                    drv = pc.equal(out.column("to"), _TO_DRIVER)
                    if pc.any(drv).as_py():
                        yield out.filter(drv)
                    rest = out.filter(pc.invert(drv))
                    if rest.num_rows:
                        nxt.append(rest)
            cur = nxt


def _chain_task(batch: pa.Table, specs: list[tuple[int, bool, PlannedStage, StageContext]]
                ) -> Any:
    yield from _worker_cached(tuple(_spec_key(*spec) for spec in specs),
                              lambda: _Chain(specs))(batch)


def _run_ray(exe: Any, members: list[_Member], store: RunStore, colocate: bool | None,
             on_stats: Any) -> bool:
    import ray.data

    from speechmill.pipeline.executors import READ_TASK_CPUS
    from speechmill.pipeline.runner import STREAM_GROUP_ROWS

    tasks: list[tuple[list[tuple[Any, Any]], int, str, int]] = []
    for k in range(len(members) - 1, -1, -1):  # backlogs nearest the end first
        m = members[k]
        if m.inp.pending:
            target = max(m.st.batch_size, min(STREAM_GROUP_ROWS, -(-m.inp.pending // 8)))
            tasks.extend((g, k, m.id, max(1, m.st.batch_size))
                         for g in m.inp.groups(target))
    if not tasks:
        return True
    # every batch an operator yields leaves as its own block (Ray Data would otherwise
    # gather a call's yields into one block of up to 128 MiB, so the next operator
    # could start only when the whole call ended): rows here are small records
    dctx = ray.data.DataContext.get_current()
    dctx.target_max_block_size = 1
    ds = ray.data.read_datasource(_tagged_source(tasks), override_num_blocks=len(tasks),
                                  num_cpus=READ_TASK_CPUS)
    if colocated([m.st for m in members], exe, colocate):
        ds = _map_chain(exe, ds, members)
    else:
        ds = _map_members(exe, ds, members)
    by_id = {m.id: m for m in members}
    failed = _drain_stats(ds, by_id, on_stats)
    if failed is not None:  # a worker process died: recorded for the members' recovery
        exe._lost(members[0].id, failed)
    now = time.monotonic()
    for m in members:
        m.ended_mono = now
    return failed is None


def _map_chain(exe: Any, ds: Any, members: list[_Member]) -> Any:
    """One operator for the whole chain: a pool of one worker per CPU (actors when a
    member loads a model), each reserving an equal share of what the reads leave."""
    import ray.data

    from speechmill.pipeline.executors import READ_TASK_CPUS

    specs = [(k, k == len(members) - 1, m.st, m.ctx) for k, m in enumerate(members)]
    size = max(1, int(exe.cluster_cpus))
    share = max(math.floor((exe.cluster_cpus - READ_TASK_CPUS) / size * 100) / 100, 0.01)
    # a call is the unit the pool spreads over its workers: the smallest member batch,
    # or less where that would leave fewer than four calls per worker
    pending = sum(m.inp.pending for m in members)
    batch = max(1, min(min(m.st.batch_size for m in members), -(-pending // (4 * size))))
    common: dict[str, Any] = dict(batch_size=batch, batch_format="pyarrow", num_cpus=share)
    mem = sum(m.st.resources.memory_gb for m in members)
    if mem > 0:
        common["memory"] = int(mem * 2**30)
    if any(m.st.cls.uses_model for m in members):
        return ds.map_batches(_Chain, fn_constructor_kwargs={"specs": specs},
                              # one call at a time: a worker that starts first must
                              # not queue the calls another one would take
                              compute=ray.data.ActorPoolStrategy(
                                  size=size, max_tasks_in_flight_per_actor=1),
                              max_restarts=0, **common)
    return ds.map_batches(_chain_task, fn_kwargs={"specs": specs},
                          compute=ray.data.TaskPoolStrategy(size=size), max_retries=2,
                          **common)


def _map_members(exe: Any, ds: Any, members: list[_Member]) -> Any:
    """One operator per member, each with its own pool and reservation."""
    import ray.data

    fitted = fit_resources([m.st for m in members], exe.cluster_cpus, exe.cluster_gpus)
    for k, (m, res) in enumerate(zip(members, fitted, strict=True)):
        st = m.st
        size = exe.pool_size(st.cls, st.spec.concurrency, 1 << 20, res)
        common: dict[str, Any] = dict(batch_size=st.batch_size, batch_format="pyarrow",
                                      num_cpus=res.cpus)
        if res.memory_gb > 0:
            common["memory"] = int(res.memory_gb * 2**30)
        args = {"k": k, "last": k == len(members) - 1, "st": st, "ctx": m.ctx}
        if st.cls.uses_model:
            ds = ds.map_batches(_Step, fn_constructor_kwargs=args,
                                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size),
                                num_gpus=res.gpus or None, max_restarts=0, **common)
        else:
            ds = ds.map_batches(_step_task, fn_kwargs=args,
                                compute=ray.data.TaskPoolStrategy(size=size),
                                max_retries=2, **common)
    return ds


def _drain_stats(ds: Any, by_id: dict[str, _Member], on_stats: Any) -> Exception | None:
    """Driver side: pass each stats record to its member as the pipeline yields it.
    Returns the Ray error when a worker process died; raises a member's fatal or an
    application error as :class:`StageFailedError` (as the executor's ``_drain``)."""
    from speechmill.pipeline.executors import drain_rows

    def on_row(row: dict[str, Any]) -> None:
        if row["to"] != _TO_DRIVER:
            return
        stats = json.loads(row["stats"])
        m = by_id[stats.pop("stage")]
        if "fatal" in stats:
            raise stage_failed(m.id, stats["fatal"])
        on_stats(m, stats)

    return drain_rows(ds, next(iter(by_id)), on_row)
