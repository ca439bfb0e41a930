"""The Ray executor: stages run on Ray Data, embedded local Ray or an existing cluster.

Model stages run as an actor pool (the model loads once per actor in ``setup()``),
other stages as tasks (a task worker keeps its stages between tasks, see
:func:`~.worker.cached_host`); pools are sized from the CPUs the cluster actually has,
leaving room for the tasks around them. A whole stage can run as one streamed pipeline
whose read tasks read the upstream parts on the workers (:meth:`RayExecutor.run_streaming`);
fused chains run as one pipeline too (:mod:`.ray_chain`).

Of the exceptions Ray itself raises, only a dead worker process (crash, OOM kill, lost
node or object) is retried: in waves, then row by row, where the row that still kills
its worker becomes a ``worker_crash`` reject; an application error that reaches the
driver wrapped by Ray (:func:`~.ray_support.ray_application_error`) fails the stage
with the original type and message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from speechmill.pipeline.batch import batches_of, part_name
from speechmill.pipeline.errors import StageFailedError
from speechmill.pipeline.executors.base import ChainMember, ChainStatsFn, Executor, StatsFn
from speechmill.pipeline.executors.ray_chain import run_ray_chain
from speechmill.pipeline.executors.ray_support import (
    ANSI_RE,
    READ_TASK_CPUS,
    SMALL_CLUSTER_CPUS,
    alive_nodes,
    drain_rows,
    ray_application_error,
)
from speechmill.pipeline.executors.worker import (
    FATAL_COL,
    StageHost,
    cached_host,
    quiet_worker,
    to_ipc,
)
from speechmill.pipeline.failures import fatal_info, stage_failed
from speechmill.pipeline.records import concat, reject, rejects_table
from speechmill.pipeline.stage import Resources, Stage, StageConfig, StageContext
from speechmill.pipeline.store import RunStore, open_store
from speechmill.pipeline.store.parts import read_unit

log = logging.getLogger("speechmill")


class _ActorWorker:
    """Ray Data callable class: one stage instance (and model) per actor. A ``setup()``
    that raises is reported with the first batch (not by dying: Ray would hide the
    error's type in a traceback string)."""

    def __init__(self, cls: type[Stage], config: StageConfig, ctx: StageContext) -> None:
        quiet_worker()
        self.host = StageHost(cls, config, ctx)

    def __call__(self, batch: pa.Table) -> pa.Table:
        stats = self.host.run_blocks(batch.column("ipc").to_pylist())
        return pa.table({"stats": pa.array(stats, pa.string())})


def _task_fn(batch: pa.Table, cls: type[Stage], config: StageConfig,
             ctx: StageContext) -> pa.Table:
    quiet_worker()
    stats = cached_host(cls, config, ctx).run_blocks(batch.column("ipc").to_pylist())
    return pa.table({"stats": pa.array(stats, pa.string())})


def _one_row(cls: type[Stage], config: StageConfig, ctx: StageContext, data: bytes) -> str:
    quiet_worker()
    return cached_host(cls, config, ctx).run_blocks([data])[0]


def _deliver(stats_json: str, on_stats: StatsFn, stage_id: str) -> None:
    """Driver side: pass a batch's stats on, or fail the stage with a worker's fatal."""
    stats = json.loads(stats_json)
    if "fatal" in stats:
        raise stage_failed(stage_id, stats["fatal"])
    on_stats(stats)


def read_group(items: list[tuple[Any, Any]], size: int, seconds: float | None
               ) -> Iterator[pa.Table]:
    """Worker side of a streamed stage: read one group of upstream units (part files,
    or slices of a source's plan), keep the rows still to do, cut them into batches and
    yield each as a block holding it IPC-encoded."""
    try:
        t = concat([read_unit(unit, keep) for unit, keep in items])
    except Exception as e:  # e.g. an unreadable upstream part: the stage cannot go on
        info = json.dumps(fatal_info(e, "read"))
        yield pa.table({"ipc": pa.array([to_ipc(pa.table({FATAL_COL: [info]}))], pa.binary())})
        return
    for b in batches_of(t, size, seconds):  # one block per batch: pools spread them
        yield pa.table({"ipc": pa.array([to_ipc(b)], pa.binary())})


def _groups_source(groups: list[list[tuple[Any, Any]]], size: int,
                   seconds: float | None) -> Any:
    """A Ray Data datasource with one read task per group: reads run on the workers."""
    import functools

    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class _Groups(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None)
            return [ReadTask(functools.partial(read_group, g, size, seconds), meta)
                    for g in groups]

    return _Groups()


def _drain(ds: Any, on_stats: StatsFn, stage_id: str) -> Exception | None:
    """Pass every batch's stats on as the pipeline yields them. Returns the Ray error
    when a worker process died (segfault, OOM kill, lost node) more often than retried;
    raises :class:`StageFailedError` for a worker's fatal or an application error."""
    return drain_rows(ds, stage_id, lambda row: _deliver(row["stats"], on_stats, stage_id))


def _note_local_cluster() -> None:
    """Say so when a `ray start` cluster runs on this machine: the embedded Ray does not
    join it (that takes ``--ray-address`` or ``RAY_ADDRESS``)."""
    try:
        from ray._private.services import find_bootstrap_address

        found = find_bootstrap_address(None)
    except Exception:  # noqa: BLE001 - only a note; Ray internals may move
        return
    if found:
        log.warning("`ray start` on this machine recorded a cluster at %s; this run starts "
                    "its own embedded Ray (to run on that cluster: --ray-address %s or "
                    "RAY_ADDRESS)", found, found)


class RayExecutor(Executor):
    """Ray Data: embedded local Ray by default, or an existing cluster."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        import ray

        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        asked = "--ray-address / executor.ray_address" if address else "RAY_ADDRESS"
        address = address or os.environ.get("RAY_ADDRESS") or None
        self._owned = not ray.is_initialized()
        if self._owned:
            kwargs: dict[str, Any] = dict(
                include_dashboard=False,
                logging_level=logging.ERROR,
                log_to_driver=True,
                configure_logging=True,
            )
            if address:  # a cluster only when the user asked for one
                kwargs["address"] = address
                log.warning("joining the Ray cluster at %s (%s)%s", address, asked,
                            "; executor.num_cpus is ignored there" if num_cpus else "")
            else:
                # embedded: always a Ray of its own. Without an address ray.init() joins
                # the cluster a `ray start` on this machine recorded (and refuses
                # num_cpus there); "local" starts a new one beside it
                kwargs["address"] = "local"
                if num_cpus:
                    kwargs["num_cpus"] = num_cpus
                _note_local_cluster()
            ray.init(**kwargs)
        import ray.data

        dctx = ray.data.DataContext.get_current()
        dctx.enable_progress_bars = False
        dctx.print_on_execution_start = False
        with contextlib.suppress(AttributeError, TypeError):
            dctx.enable_operator_progress_bars = False
        with contextlib.suppress(AttributeError, TypeError):
            dctx.verbose_stats_logs = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        self.address = address
        self.cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        #: the shrunk actor reservations of a small machine only hold on one node (Ray
        #: reserves per node: two 1-CPU nodes would each be left too little for a read)
        self.single_node = len(alive_nodes()) <= 1
        self.cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
        #: worker failures recovered from (a dead actor, a lost node), for the metrics
        self._lost_workers: list[dict[str, Any]] = []

    @property
    def lost_workers(self) -> list[dict[str, Any]]:
        """Worker failures recovered from (a dead actor, a lost node), for the metrics."""
        return self._lost_workers

    def describe(self) -> str:
        where = self.address or "embedded local Ray"
        return f"ray ({where}; {self.cluster_cpus:g} CPUs, {self.cluster_gpus:g} GPUs)"

    def pool_size(self, cls: type[Stage], requested: int | None, n_batches: int,
                  res: Resources | None = None) -> int:
        """Workers to run at once: as many as the CPUs (and GPUs, for a stage that asks
        for them) hold. An actor pool never takes every CPU (the read tasks that feed it
        would starve and the run hang): from :data:`SMALL_CLUSTER_CPUS` CPUs on it leaves
        one CPU to them; on a smaller single machine, where that CPU would be a third or
        half of it, the actors instead reserve a little less than they declare
        (:meth:`actor_cpus`). A cluster of several nodes always keeps the spare CPU: Ray
        reserves per node, so shrunk shares would leave no node room for a read task."""
        res = res or cls.resources
        cpus = max(res.cpus, 0.01)
        small = self.cluster_cpus < SMALL_CLUSTER_CPUS and self.single_node
        spare = 1.0 if cls.uses_model and self.cluster_cpus > 1 and not small else 0.0
        fit = max(int((self.cluster_cpus - spare) // cpus), 1)
        if res.gpus > 0 and self.cluster_gpus > 0:
            fit = min(fit, int(self.cluster_gpus // res.gpus) or 1)
        size = min(requested, fit) if requested else fit
        return max(1, min(size, n_batches))

    def actor_cpus(self, res: Resources, size: int) -> float:
        """CPUs each of ``size`` actors reserves: what the stage declares, or, where
        that would not leave :data:`READ_TASK_CPUS` free, an equal share of the rest
        (rounded down to 1/100)."""
        free = self.cluster_cpus - READ_TASK_CPUS
        if size * res.cpus <= free or free <= 0 or not self.single_node:
            return res.cpus
        return max(math.floor(free / size * 100) / 100, 0.01)

    def _map(self, ds: Any, cls: type[Stage], config: StageConfig, ctx: StageContext,
             size: int, res: Resources) -> Any:
        import ray.data

        gpus = res.gpus if self.cluster_gpus > 0 else 0.0
        cpus = self.actor_cpus(res, size) if cls.uses_model else res.cpus
        common: dict[str, Any] = dict(batch_size=1, batch_format="pyarrow", num_cpus=cpus)
        if math.floor(cpus) < math.floor(res.cpus) and "OMP_NUM_THREADS" not in os.environ:
            # Ray gives a worker floor(reserved CPUs) threads: keep what the stage declares
            common["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(int(res.cpus))}}
        if res.memory_gb > 0:
            common["memory"] = int(res.memory_gb * 2**30)
        # bounded retries: a file that crashes its worker must not be retried forever
        if cls.uses_model:
            return ds.map_batches(
                _ActorWorker,
                fn_constructor_kwargs={"cls": cls, "config": config, "ctx": ctx},
                compute=ray.data.ActorPoolStrategy(size=size),
                num_gpus=gpus or None,
                # a dead actor is not restarted (its constructor args may be gone); the
                # rows of the failed batch are isolated instead
                max_restarts=0,
                **common,
            )
        return ds.map_batches(
            _task_fn,
            fn_kwargs={"cls": cls, "config": config, "ctx": ctx},
            compute=ray.data.TaskPoolStrategy(size=size),
            max_retries=2,
            **common,
        )

    #: the runner may hand this executor a whole stage as groups of units (see
    #: :meth:`run_streaming`) instead of waves of batches
    streams = True

    def run_streaming(self, cls: type[Stage], config: StageConfig, ctx: StageContext,
                      groups: list[list[tuple[Any, Any]]], n_batches: int, batch_size: int,
                      batch_seconds: float | None, on_stats: StatsFn,
                      concurrency: int | None = None, resources: Resources | None = None
                      ) -> bool:
        """Run a whole stage as one Ray Data pipeline: read tasks on the workers read
        the upstream parts (the driver sends only part paths and row masks), cut
        batches, and one worker pool (one model load per actor) processes them all,
        with Ray Data's backpressure. False when a worker died: the caller reruns what
        is left in waves, which isolate the row that kills its worker."""
        import ray.data

        if not groups:
            return True
        res = resources or cls.resources
        ds = ray.data.read_datasource(_groups_source(groups, batch_size, batch_seconds),
                                      override_num_blocks=len(groups),
                                      num_cpus=READ_TASK_CPUS)
        size = self.pool_size(cls, concurrency, max(1, n_batches), res)
        failed = _drain(self._map(ds, cls, config, ctx, size, res), on_stats, ctx.stage_id)
        if failed is not None:
            self.record_lost(ctx.stage_id, failed)
            log.warning("stage %s: a worker failed (%s); finishing in waves", ctx.stage_id,
                        type(failed).__name__)
        return failed is None

    def run_stage(
        self,
        cls: type[Stage],
        config: StageConfig,
        ctx: StageContext,
        batches: list[pa.Table],
        on_stats: StatsFn,
        concurrency: int | None = None,
        resources: Resources | None = None,
    ) -> None:
        import ray.data

        if not batches:
            return
        res = resources or cls.resources
        items = [{"ipc": to_ipc(b)} for b in batches]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        size = self.pool_size(cls, concurrency, len(items), res)
        failed = _drain(self._map(ds, cls, config, ctx, size, res), on_stats, ctx.stage_id)
        if failed is not None:
            self.record_lost(ctx.stage_id, failed)
            log.warning("stage %s: a worker failed (%s); isolating rows", ctx.stage_id,
                        type(failed).__name__)
            self._isolate(cls, config, ctx, batches, on_stats, res)

    def record_lost(self, stage_id: str, e: BaseException) -> None:
        msg = ANSI_RE.sub("", str(e)).strip().splitlines()
        self._lost_workers.append({"stage": stage_id, "error": type(e).__name__,
                                  "message": (msg[0] if msg else "")[:300]})
        import ray

        with contextlib.suppress(Exception):  # a lost node's CPUs/GPUs are gone: size
            res = ray.cluster_resources()     # the pools that finish the stage without them
            self.cluster_cpus = float(res.get("CPU", self.cluster_cpus))
            self.cluster_gpus = float(res.get("GPU", 0.0))
            self.single_node = len(alive_nodes()) <= 1

    def _isolate(self, cls: type[Stage], config: StageConfig, ctx: StageContext,
                 batches: list[pa.Table], on_stats: StatsFn, res: Resources) -> None:
        """Rerun each row not yet committed as its own task; a row whose task still dies
        becomes a ``worker_crash`` reject (counted in the stage's error budget) instead
        of failing the run, unless a node died meanwhile (a lost node is not the row's
        fault: the row runs again, up to 3 times). An application error fails the stage."""
        import ray

        store = open_store(ctx.run_dir)
        done = store.consumed_ids(ctx.stage_id)
        rows = [b.slice(i, 1) for b in batches for i in range(b.num_rows)
                if b.column("id")[i].as_py() not in done]
        if self._lost_workers:
            self._lost_workers[-1]["rows_isolated"] = len(rows)
        # the stage's GPU share too: a row of a GPU stage must not land on a CPU-only node
        gpus = res.gpus if self.cluster_gpus > 0 else 0.0
        one = ray.remote(_one_row).options(num_cpus=res.cpus, num_gpus=gpus, max_retries=0)
        limit = self.pool_size(cls, None, max(len(rows), 1), res)
        pending: dict[Any, pa.Table] = {}
        todo = list(rows)
        alive = alive_nodes()
        node_lost: dict[str, int] = {}  # row id -> times its node died under it
        while todo or pending:
            while todo and len(pending) < limit:
                r = todo.pop()
                pending[one.remote(cls, config, ctx, to_ipc(r))] = r
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            r = pending.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as e:
                app = ray_application_error(e)
                if app is not None:
                    raise StageFailedError(ctx.stage_id, f"{app[0]}: {app[1]}",
                                           cause_type=app[0], cause=app[1]) from e
                rid = str(r.column("id")[0].as_py())
                # a node died since isolation began: likely this row's (bounded retries)
                if alive - alive_nodes() and node_lost.get(rid, 0) < 3:
                    node_lost[rid] = node_lost.get(rid, 0) + 1
                    todo.append(r)
                    continue
                # this row kills its worker even alone
                row = r.to_pylist()[0]
                typ = type(e).__name__
                rej = rejects_table([reject(row, ctx.stage_id, "worker_crash",
                                            f"{typ}: {str(e)[:500]}")])
                try:
                    store.write_rejects(ctx.stage_id, part_name(r), rej)
                except OSError as w:
                    raise StageFailedError(
                        ctx.stage_id, f"cannot write to the run directory "
                        f"{str(store.root)!r}: {type(w).__name__}: {w}") from w
                on_stats({"rows_in": 1, "rows_out": 0, "rows_rejected": 1,
                          "seconds_in": float(row.get("duration") or 0.0),
                          "reasons": {"worker_crash": 1},
                          "errors": {typ: [1, row["id"]]}})
                continue
            _deliver(out, on_stats, ctx.stage_id)

    def run_chain(self, members: list[ChainMember], store: RunStore,
                  on_stats: ChainStatsFn, *, wave_rows: int, colocate: bool | None
                  ) -> bool:
        """One Ray Data pipeline for the chain (:mod:`.ray_chain`)."""
        return run_ray_chain(self, members, on_stats, colocate)

    def close(self) -> None:
        import ray

        if self._owned and ray.is_initialized():
            ray.shutdown()
