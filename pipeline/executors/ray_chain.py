"""A fused chain on Ray: one Ray Data pipeline for consecutive row-local stages.

One operator per member (its own resources, an actor pool for model stages), or, on a
small machine (``executor.colocate``), one operator whose workers hold every member
(:class:`_Chain`). Rows travel as IPC-encoded records tagged with the member they are
for: backlogs enter mid-pipeline with their member's tag, other operators pass them
through; each member runs its rows through its :class:`~.worker.StageHost` (which
commits them) and passes its committed outputs, read back, to the next. Batch stats
ride along to the driver as records of their own. CPU/GPU reservations are scaled
down when one worker of every member would not fit the cluster at once, so every
operator can run. Ray Data's backpressure bounds memory. If a worker process dies the
stream stops (the failure is recorded with the executor's lost workers) and the caller
runs the remaining members one by one.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pyarrow as pa

from speechmill.pipeline.batch import batches_of
from speechmill.pipeline.dag import PlannedStage
from speechmill.pipeline.executors.base import ChainMember, ChainStatsFn
from speechmill.pipeline.executors.ray_support import (
    READ_TASK_CPUS,
    SMALL_CLUSTER_CPUS,
    drain_rows,
)
from speechmill.pipeline.executors.worker import (
    cached_host,
    committed_outputs,
    from_ipc,
    quiet_worker,
    to_ipc,
)
from speechmill.pipeline.failures import fatal_info, stage_failed
from speechmill.pipeline.records import concat
from speechmill.pipeline.stage import Resources, StageContext
from speechmill.pipeline.stage_input import STREAM_GROUP_ROWS
from speechmill.pipeline.store.parts import read_unit

#: Ray row tag of a stats record (goes to the driver)
_TO_DRIVER = -1


def _records(t: pa.Table, to: int) -> pa.Table:
    """One Ray row per record of ``t``, tagged for member ``to``."""
    n = t.num_rows
    return pa.table({"to": pa.array([to] * n, pa.int32()),
                     "ipc": pa.array([to_ipc(t.slice(i, 1)) for i in range(n)], pa.binary()),
                     "stats": pa.array([""] * n, pa.string())})


def _stats_row(stage_id: str, stats: dict[str, Any]) -> pa.Table:
    return pa.table({"to": pa.array([_TO_DRIVER], pa.int32()),
                     "ipc": pa.array([b""], pa.binary()),
                     "stats": pa.array([json.dumps({"stage": stage_id, **stats})])})


def read_tagged(items: list[tuple[Any, Any]], to: int, stage_id: str, size: int = 256) -> Any:
    """Worker side: read one group of upstream units for member ``to``, in blocks of
    ``size`` rows (its batch size: each block can go to another worker)."""
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
        quiet_worker()
        self.k, self.last, self.sid = k, last, ctx.stage_id
        self.size, self.seconds = st.batch_size, st.batch_seconds
        self.host = cached_host(st.cls, st.config, ctx)
        self.fatal = self.host.fatal

    def __call__(self, batch: pa.Table) -> Any:
        """A generator: each batch's stats and outputs leave as their own block at once, so
        the next operator starts on them while this one goes on."""
        import pyarrow.compute as pc

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
        t = concat([from_ipc(r) for r in rows])
        for b in batches_of(t, self.size, self.seconds):
            stats = self.host.run_or_report(b, timed=True)
            if "fatal" in stats:
                self.fatal = stats["fatal"]
                yield _stats_row(self.sid, stats)
                return
            out = [_stats_row(self.sid, stats)]
            if not self.last:
                o = committed_outputs(self.host.store, self.sid, b, stats)
                if o is not None and o.num_rows:
                    out.append(_records(o, self.k + 1))
            yield concat(out)


def _step_task(batch: pa.Table, k: int, last: bool, st: PlannedStage,
               ctx: StageContext) -> Any:
    yield from _worker_cached(_spec_key(k, last, st, ctx),
                              lambda: _Step(k, last, st, ctx))(batch)


def _spec_key(k: int, last: bool, st: PlannedStage, ctx: StageContext) -> tuple[Any, ...]:
    return (k, last, ctx.stage_id, ctx.run_dir, st.config.model_dump_json())


#: the steps and chains a Ray task worker set up (see :func:`_worker_cached`)
_TASK_CACHE: dict[Any, Any] = {}


def _worker_cached(key: Any, make: Any) -> Any:
    """The step (or chain) this Ray task worker set up for ``key``, made on first use: a
    task worker keeps its stages between tasks, and with them what they learnt (a
    ``setup()`` or a batch that failed fatally is reported again, not run again)."""
    obj = _TASK_CACHE.get(key)
    if obj is None:
        obj = _TASK_CACHE[key] = make()
    return obj


def fit_resources(members: list[PlannedStage], cpus: float, gpus: float
                  ) -> list[Resources]:
    """Each member's worker reservation, scaled down (CPUs and GPUs separately) when one
    worker of every member would not fit the cluster at once: every operator of the
    pipeline must be able to run, or the stream would wait forever."""
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


def run_ray_chain(exe: Any, members: list[ChainMember], on_stats: ChainStatsFn,
                  colocate: bool | None) -> bool:
    """Run the chain as one pipeline on ``exe`` (a :class:`~.ray.RayExecutor`); False
    when a worker process died (recorded with ``exe.record_lost``)."""
    import ray.data

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
        exe.record_lost(members[0].id, failed)
    now = time.monotonic()
    for m in members:
        m.ended_mono = now
    return failed is None


def _map_chain(exe: Any, ds: Any, members: list[ChainMember]) -> Any:
    """One operator for the whole chain: a pool of one worker per CPU (actors when a
    member loads a model), each reserving an equal share of what the reads leave."""
    import ray.data

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


def _map_members(exe: Any, ds: Any, members: list[ChainMember]) -> Any:
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


def _drain_stats(ds: Any, by_id: dict[str, ChainMember], on_stats: Any) -> Exception | None:
    """Driver side: pass each stats record to its member as the pipeline yields it.
    Returns the Ray error when a worker process died; raises a member's fatal or an
    application error as :class:`StageFailedError` (as the executor's ``_drain``)."""
    def on_row(row: dict[str, Any]) -> None:
        if row["to"] != _TO_DRIVER:
            return
        stats = json.loads(row["stats"])
        m = by_id[stats.pop("stage")]
        if "fatal" in stats:
            raise stage_failed(m.id, stats["fatal"])
        on_stats(m, stats)

    return drain_rows(ds, next(iter(by_id)), on_row)
