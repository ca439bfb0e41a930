"""Executors run the batches of one stage: in this process, or on Ray Data.

Both call :func:`speechmill.pipeline.batch.run_batch` on workers, which commits each
batch to the run store itself; the driver only receives small stats dicts, used for
progress and the watchdog. The Ray executor runs model stages as an actor pool (the
model loads once per actor in ``setup()``) and other stages as tasks, and sizes pools
from the CPUs the cluster actually has, leaving room for the tasks around them.

Failures that are not a row's fault never become rejects. Workers catch a ``setup()``
that raises, a run store that cannot be written and engine errors, and return them as a
``fatal`` stats entry (original type, message, traceback), which the driver raises as
:class:`~speechmill.pipeline.errors.StageFailedError`. Of the exceptions Ray itself
raises, only a dead worker process (crash, OOM kill, lost node or object) is retried: in
waves, then row by row, where the row that still kills its worker becomes a
``worker_crash`` reject; an application error that reaches the driver wrapped by Ray
(:func:`ray_application_error`) fails the stage with the original type and message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from speechmill.pipeline.batch import run_batch
from speechmill.pipeline.errors import StageFailedError
from speechmill.pipeline.failures import fatal_info, stage_failed
from speechmill.pipeline.stage import Resources, Stage, StageConfig, StageContext
from speechmill.pipeline.store import RunStore

log = logging.getLogger("speechmill")
StatsFn = Callable[[dict[str, Any]], None]
#: CPUs each read task of a streamed stage reserves (an actor pool leaves them free)
READ_TASK_CPUS = 0.25
#: from this many CPUs on, an actor pool leaves a whole CPU to the tasks around it
SMALL_CLUSTER_CPUS = 4.0

# per-process cache: a task worker builds and sets up each stage once
_WORKER_STAGES: dict[tuple[str, str], Stage] = {}


def _stage_instance(cls: type[Stage], config: StageConfig, ctx: StageContext) -> Stage:
    key = (f"{cls.__module__}.{cls.__qualname__}:{ctx.stage_id}:{ctx.run_dir}",
           config.model_dump_json())
    st = _WORKER_STAGES.get(key)
    if st is None:
        st = cls(config, ctx)
        st.setup()
        _WORKER_STAGES[key] = st
    return st


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


class LocalExecutor:
    """Runs batches sequentially in this process (debugging, tiny runs, tests)."""

    name = "local"

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
        store = RunStore(ctx.run_dir)
        try:
            stage = cls(config, ctx)
            stage.setup()
        except Exception as e:
            raise stage_failed(ctx.stage_id, fatal_info(e, "setup")) from e
        try:
            for b in batches:
                try:
                    stats = run_batch(stage, b, store)
                except Exception as e:  # fatal: run_batch rejects what is a row's fault
                    raise stage_failed(ctx.stage_id, fatal_info(e, "batch")) from e
                on_stats(stats)
        finally:
            stage.teardown()

    def describe(self) -> str:
        return "local (in-process)"

    def close(self) -> None:
        pass


#: column of an IPC-encoded block that carries a read task's failure instead of rows
_FATAL_COL = "__speechmill_fatal__"


def _run_blocks(stage: Stage | None, fatal: dict[str, Any] | None, blocks: list[bytes],
                store: RunStore) -> list[str]:
    """Worker side: run each IPC-encoded batch; JSON stats per batch. A failure that is
    not a row's fault (``setup()`` raised, the store cannot be written, an engine error)
    ends the list as a ``fatal`` entry: the driver fails the stage with it."""
    out: list[str] = []
    for data in blocks:
        if fatal is None:
            t = _from_ipc(data)
            if _FATAL_COL in t.column_names:  # the read task failed
                fatal = json.loads(t.column(_FATAL_COL)[0].as_py())
            else:
                assert stage is not None
                try:
                    out.append(json.dumps(run_batch(stage, t, store)))
                    continue
                except Exception as e:
                    fatal = fatal_info(e, "batch")
        out.append(json.dumps({"fatal": fatal}))
        break
    return out


def _set_up(cls: type[Stage], config: StageConfig, ctx: StageContext
            ) -> tuple[Stage | None, dict[str, Any] | None]:
    try:
        return _stage_instance(cls, config, ctx), None
    except Exception as e:
        return None, fatal_info(e, "setup")


class _ActorWorker:
    """Ray Data callable class: one stage instance (and model) per actor. A ``setup()``
    that raises is reported with the first batch (not by dying: Ray would hide the
    error's type in a traceback string)."""

    def __init__(self, cls: type[Stage], config: StageConfig, ctx: StageContext) -> None:
        _quiet_worker()
        self.store = RunStore(ctx.run_dir)
        self.stage: Stage | None = None
        self.fatal: dict[str, Any] | None = None
        try:
            self.stage = cls(config, ctx)
            self.stage.setup()
        except Exception as e:
            self.fatal = fatal_info(e, "setup")

    def __call__(self, batch: pa.Table) -> pa.Table:
        stats = _run_blocks(self.stage, self.fatal, batch.column("ipc").to_pylist(),
                            self.store)
        return pa.table({"stats": pa.array(stats, pa.string())})


def _task_fn(batch: pa.Table, cls: type[Stage], config: StageConfig,
             ctx: StageContext) -> pa.Table:
    _quiet_worker()
    stage, fatal = _set_up(cls, config, ctx)
    stats = _run_blocks(stage, fatal, batch.column("ipc").to_pylist(), RunStore(ctx.run_dir))
    return pa.table({"stats": pa.array(stats, pa.string())})


def _one_row(cls: type[Stage], config: StageConfig, ctx: StageContext, data: bytes) -> str:
    _quiet_worker()
    stage, fatal = _set_up(cls, config, ctx)
    return _run_blocks(stage, fatal, [data], RunStore(ctx.run_dir))[0]


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
    from speechmill.pipeline.records import concat
    from speechmill.pipeline.store import read_unit

    try:
        t = concat([read_unit(unit, keep) for unit, keep in items])
    except Exception as e:  # e.g. an unreadable upstream part: the stage cannot go on
        info = json.dumps(fatal_info(e, "read"))
        yield pa.table({"ipc": pa.array([_ipc(pa.table({_FATAL_COL: [info]}))], pa.binary())})
        return
    for b in batches_of(t, size, seconds):  # one block per batch: pools spread them
        yield pa.table({"ipc": pa.array([_ipc(b)], pa.binary())})


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


def drain_rows(ds: Any, stage_id: str, on_row: Callable[[dict[str, Any]], None]
               ) -> Exception | None:
    """Hand each row of ``ds`` to ``on_row`` as the pipeline yields it. Returns the Ray
    error when a worker process died; an application error in a worker is raised as
    :class:`StageFailedError` of ``stage_id``; the pipeline stops when this returns."""
    rows = iter(ds.iter_rows())
    try:
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return None
            except Exception as e:
                app = ray_application_error(e)
                if app is None:
                    return e
                raise StageFailedError(stage_id, f"{app[0]}: {app[1]}", cause_type=app[0],
                                       cause=app[1]) from e
            on_row(row)
    finally:
        # stop the pipeline now (Ray Data shuts its executor down when the iterator
        # closes): left running after a failure, its thread keeps scheduling work until
        # Ray shuts down, and then even starts a new local Ray instance
        close = getattr(rows, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()


_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
_EXC_LINE_RE = re.compile(r"^([A-Za-z_][\w.]*): (.*)$")
_RAY_WRAPPERS = ("UserCodeException", "RayTaskError", "RaySystemError", "SystemException")


def _exception_from_traceback(text: str) -> tuple[str, str] | None:
    """(type, message) of the application's exception in a remote traceback's text: the
    outermost exception of a chain that is not one of Ray's wrappers."""
    sections = re.split(r"\n\s*(?:The above exception was the direct cause|During handling "
                        r"of the above exception)", _ANSI_RE.sub("", text))
    for section in reversed(sections):
        lines = section.strip().splitlines()
        for i in range(len(lines) - 1, -1, -1):
            m = _EXC_LINE_RE.match(lines[i])
            if m and not lines[i].startswith(" "):
                typ = m.group(1).rsplit(".", 1)[-1]
                if not typ.startswith(_RAY_WRAPPERS):
                    return typ, "\n".join([m.group(2), *lines[i + 1:]]).strip()
                break
    return None


def ray_application_error(e: BaseException) -> tuple[str, str] | None:
    """None when ``e`` means a worker process died (crash, OOM kill, lost node or
    object: worth retrying, and a row that still kills its worker alone is a
    ``worker_crash`` reject); else the application error's original (type, message):
    a task's exception (Ray wraps it in ``RayTaskError``, Ray Data in a
    ``UserCodeException`` whose original survives only as traceback text), an actor
    whose constructor raised, or any other error (not retried)."""
    import ray.exceptions as rx

    system = (rx.WorkerCrashedError, rx.NodeDiedError, rx.ObjectLostError,
              rx.OutOfMemoryError, rx.LocalRayletDiedError, rx.ActorUnavailableError,
              rx.RaySystemError, rx.TaskCancelledError, rx.ObjectStoreFullError)
    for _ in range(8):  # RayTaskError may wrap a system failure of a task it waited on
        if isinstance(e, system):
            return None
        if isinstance(e, rx.RayActorError):
            if not getattr(e, "actor_init_failed", False):
                return None  # the actor's process died
            text = str(e).split("creation task,", 1)[-1]
            return _exception_from_traceback(text) or (type(e).__name__, str(e)[:2000])
        if isinstance(e, rx.RayTaskError):
            cause = e.cause
            if isinstance(cause, rx.UserCodeException) or not isinstance(cause, Exception):
                # (the subclass Ray makes to also be the cause's type forwards attribute
                # lookups to the cause: read the traceback text through str())
                text = e.__dict__.get("traceback_str") or str(e)
                return (_exception_from_traceback(text)
                        or (type(cause).__name__, str(cause)[:2000]))
            if isinstance(cause, rx.RayError):
                e = cause
                continue
            return type(cause).__name__, str(cause)
        mod = type(e).__module__ or ""
        if mod.startswith("ray.data") and type(e).__name__ == "SystemException":
            return None  # Ray Data's own failure around a dead worker
        return type(e).__name__, str(e)
    return type(e).__name__, str(e)


def _alive_nodes() -> set[str]:
    """Ids of the cluster's live nodes (a row whose worker died with its node is run
    again, not rejected)."""
    import ray

    try:
        return {str(n["NodeID"]) for n in ray.nodes() if n.get("Alive")}
    except Exception:  # the GCS unreachable for a moment: no node known lost
        return set()


def _quiet_worker() -> None:
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.ERROR)


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


class RayExecutor:
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
        self.single_node = len(_alive_nodes()) <= 1
        self.cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
        #: worker failures recovered from (a dead actor, a lost node), for the metrics
        self.lost_workers: list[dict[str, Any]] = []

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
            self._lost(ctx.stage_id, failed)
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
        items = [{"ipc": _ipc(b)} for b in batches]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        size = self.pool_size(cls, concurrency, len(items), res)
        failed = _drain(self._map(ds, cls, config, ctx, size, res), on_stats, ctx.stage_id)
        if failed is not None:
            self._lost(ctx.stage_id, failed)
            log.warning("stage %s: a worker failed (%s); isolating rows", ctx.stage_id,
                        type(failed).__name__)
            self._isolate(cls, config, ctx, batches, on_stats, res)

    def _lost(self, stage_id: str, e: BaseException) -> None:
        msg = _ANSI_RE.sub("", str(e)).strip().splitlines()
        self.lost_workers.append({"stage": stage_id, "error": type(e).__name__,
                                  "message": (msg[0] if msg else "")[:300]})
        import ray

        with contextlib.suppress(Exception):  # a lost node's CPUs/GPUs are gone: size
            res = ray.cluster_resources()     # the pools that finish the stage without them
            self.cluster_cpus = float(res.get("CPU", self.cluster_cpus))
            self.cluster_gpus = float(res.get("GPU", 0.0))
            self.single_node = len(_alive_nodes()) <= 1

    def _isolate(self, cls: type[Stage], config: StageConfig, ctx: StageContext,
                 batches: list[pa.Table], on_stats: StatsFn, res: Resources) -> None:
        """Rerun each row not yet committed as its own task; a row whose task still dies
        becomes a ``worker_crash`` reject (counted in the stage's error budget) instead
        of failing the run, unless a node died meanwhile (a lost node is not the row's
        fault: the row runs again, up to 3 times). An application error fails the stage."""
        import ray

        from speechmill.pipeline.batch import part_name
        from speechmill.pipeline.records import reject, rejects_table

        store = RunStore(ctx.run_dir)
        done = store.consumed_ids(ctx.stage_id)
        rows = [b.slice(i, 1) for b in batches for i in range(b.num_rows)
                if b.column("id")[i].as_py() not in done]
        if self.lost_workers:
            self.lost_workers[-1]["rows_isolated"] = len(rows)
        # the stage's GPU share too: a row of a GPU stage must not land on a CPU-only node
        gpus = res.gpus if self.cluster_gpus > 0 else 0.0
        one = ray.remote(_one_row).options(num_cpus=res.cpus, num_gpus=gpus, max_retries=0)
        limit = self.pool_size(cls, None, max(len(rows), 1), res)
        pending: dict[Any, pa.Table] = {}
        todo = list(rows)
        alive = _alive_nodes()
        node_lost: dict[str, int] = {}  # row id -> times its node died under it
        while todo or pending:
            while todo and len(pending) < limit:
                r = todo.pop()
                pending[one.remote(cls, config, ctx, _ipc(r))] = r
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
                if alive - _alive_nodes() and node_lost.get(rid, 0) < 3:
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

    def close(self) -> None:
        import ray

        if self._owned and ray.is_initialized():
            ray.shutdown()


class Watchdog:
    """Interrupts the main thread when no batch finished for ``timeout_s`` seconds."""

    def __init__(self, timeout_s: float, what: str) -> None:
        self.timeout_s = timeout_s
        self.what = what
        self.last = time.monotonic()
        self.fired = False
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True, name="speechmill-watchdog")

    def __enter__(self) -> Watchdog:
        import signal

        self._old_handler = None
        # background jobs (`cmd &`) start with SIGINT ignored: interrupt_main would then
        # do nothing, so install Python's handler for the watchdog's duration
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
            self._old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        self._stop.set()
        self._t.join(timeout=5)
        if self._old_handler is not None:
            signal.signal(signal.SIGINT, self._old_handler)

    def tick(self) -> None:
        self.last = time.monotonic()

    def _loop(self) -> None:
        from speechmill.pipeline.signals import watchdog_interrupt_main

        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            if time.monotonic() - self.last > self.timeout_s and not self._stop.is_set():
                self.fired = True
                watchdog_interrupt_main()
                return


def batches_of(table: pa.Table, size: int, seconds: float | None = None
               ) -> Iterator[pa.Table]:
    """Batches of at most ``size`` rows and, when ``seconds`` is given, about that much
    audio (a longer row is a batch of its own), so model batches take similar time."""
    if not seconds or "duration" not in table.column_names:
        for start in range(0, table.num_rows, size):
            yield table.slice(start, size)
        return
    durs = [float(d or 0.0) for d in table.column("duration").to_pylist()]
    start, acc = 0, 0.0
    for i, d in enumerate(durs):
        if i > start and (i - start >= size or acc + d > seconds):
            yield table.slice(start, i - start)
            start, acc = i, 0.0
        acc += d
    if start < table.num_rows:
        yield table.slice(start, table.num_rows - start)
