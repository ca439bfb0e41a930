"""Executors run the batches of one stage: in this process, or on Ray Data.

Both call :func:`speechmill.pipeline.batch.run_batch` on workers, which commits each
batch to the run store itself; the driver only receives small stats dicts, used for
progress and the watchdog. The Ray executor runs model stages as an actor pool (the
model loads once per actor in ``setup()``) and other stages as tasks, and sizes pools
from the CPUs the cluster actually has, leaving room for the tasks around them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from speechmill.pipeline.batch import run_batch
from speechmill.pipeline.stage import Resources, Stage, StageConfig, StageContext
from speechmill.pipeline.store import RunStore

log = logging.getLogger("speechmill")
StatsFn = Callable[[dict[str, Any]], None]

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
        stage = cls(config, ctx)
        stage.setup()
        try:
            for b in batches:
                on_stats(run_batch(stage, b, store))
        finally:
            stage.teardown()

    def describe(self) -> str:
        return "local (in-process)"

    def close(self) -> None:
        pass


class _ActorWorker:
    """Ray Data callable class: one stage instance (and model) per actor."""

    def __init__(self, cls: type[Stage], config: StageConfig, ctx: StageContext) -> None:
        _quiet_worker()
        self.stage = cls(config, ctx)
        self.stage.setup()
        self.store = RunStore(ctx.run_dir)

    def __call__(self, batch: pa.Table) -> pa.Table:
        stats = [json.dumps(run_batch(self.stage, _from_ipc(b), self.store))
                 for b in batch.column("ipc").to_pylist()]
        return pa.table({"stats": stats})


def _task_fn(batch: pa.Table, cls: type[Stage], config: StageConfig,
             ctx: StageContext) -> pa.Table:
    _quiet_worker()
    stage = _stage_instance(cls, config, ctx)
    store = RunStore(ctx.run_dir)
    stats = [json.dumps(run_batch(stage, _from_ipc(b), store))
             for b in batch.column("ipc").to_pylist()]
    return pa.table({"stats": stats})


def _one_row(cls: type[Stage], config: StageConfig, ctx: StageContext, data: bytes) -> str:
    _quiet_worker()
    stage = _stage_instance(cls, config, ctx)
    return json.dumps(run_batch(stage, _from_ipc(data), RunStore(ctx.run_dir)))


def read_group(items: list[tuple[Any, Any]], size: int, seconds: float | None
               ) -> Iterator[pa.Table]:
    """Worker side of a streamed stage: read one group of upstream units (part files,
    or slices of a source's plan), keep the rows still to do, cut them into batches and
    yield each as a block holding it IPC-encoded."""
    from speechmill.pipeline.records import concat
    from speechmill.pipeline.store import read_unit

    t = concat([read_unit(unit, keep) for unit, keep in items])
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


def _drain(ds: Any, on_stats: StatsFn) -> Exception | None:
    """Pass every batch's stats on as the pipeline yields them. Returns the Ray error
    when a worker died (segfault, OOM kill) more often than retried; raises others."""
    try:
        for row in ds.iter_rows():
            on_stats(json.loads(row["stats"]))
    except Exception as e:
        if not _is_ray_failure(e):
            raise
        return e
    return None


def _is_ray_failure(e: BaseException) -> bool:
    mod = type(e).__module__ or ""
    return mod.startswith("ray.") or "ray" in mod.split(".")[:1]


def _quiet_worker() -> None:
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.ERROR)


class RayExecutor:
    """Ray Data: embedded local Ray by default, or an existing cluster."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        import ray

        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        address = address or os.environ.get("RAY_ADDRESS") or None
        self._owned = not ray.is_initialized()
        if self._owned:
            kwargs: dict[str, Any] = dict(
                include_dashboard=False,
                logging_level=logging.ERROR,
                log_to_driver=True,
                configure_logging=True,
            )
            if address:
                kwargs["address"] = address
            elif num_cpus:
                kwargs["num_cpus"] = num_cpus
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
        self.cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))

    def describe(self) -> str:
        where = self.address or "embedded local Ray"
        return f"ray ({where}; {self.cluster_cpus:g} CPUs, {self.cluster_gpus:g} GPUs)"

    def pool_size(self, cls: type[Stage], requested: int | None, n_batches: int,
                  res: Resources | None = None) -> int:
        """Workers to run at once. An actor pool never takes every CPU (the read/write
        tasks around it would starve and the run hang); task stages may use them all."""
        res = res or cls.resources
        cpus = max(res.cpus, 0.01)
        spare = 1.0 if cls.uses_model and self.cluster_cpus > 1 else 0.0
        fit = max(int((self.cluster_cpus - spare) // cpus), 1)
        if res.gpus > 0 and self.cluster_gpus > 0:
            fit = min(fit, int(self.cluster_gpus // res.gpus) or 1)
        size = min(requested, fit) if requested else fit
        return max(1, min(size, n_batches))

    def _map(self, ds: Any, cls: type[Stage], config: StageConfig, ctx: StageContext,
             size: int, res: Resources) -> Any:
        import ray.data

        gpus = res.gpus if self.cluster_gpus > 0 else 0.0
        common: dict[str, Any] = dict(batch_size=1, batch_format="pyarrow", num_cpus=res.cpus)
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
                                      override_num_blocks=len(groups), num_cpus=0.25)
        size = self.pool_size(cls, concurrency, max(1, n_batches), res)
        failed = _drain(self._map(ds, cls, config, ctx, size, res), on_stats)
        if failed is not None:
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
        failed = _drain(self._map(ds, cls, config, ctx, size, res), on_stats)
        if failed is not None:
            log.warning("stage %s: a worker failed (%s); isolating rows", ctx.stage_id,
                        type(failed).__name__)
            self._isolate(cls, config, ctx, batches, on_stats, res, failed)

    def _isolate(self, cls: type[Stage], config: StageConfig, ctx: StageContext,
                 batches: list[pa.Table], on_stats: StatsFn, res: Resources,
                 error: Exception) -> None:
        """Rerun each row not yet committed as its own task; a row whose task still dies
        becomes a ``worker_crash`` reject instead of failing the run."""
        import ray

        from speechmill.pipeline.batch import part_name
        from speechmill.pipeline.errors import SpeechmillError
        from speechmill.pipeline.records import reject, rejects_table

        store = RunStore(ctx.run_dir)
        done = store.consumed_ids(ctx.stage_id)
        rows = [b.slice(i, 1) for b in batches for i in range(b.num_rows)
                if b.column("id")[i].as_py() not in done]
        one = ray.remote(_one_row).options(num_cpus=res.cpus, max_retries=0)
        limit = self.pool_size(cls, None, max(len(rows), 1), res)
        pending: dict[Any, pa.Table] = {}
        failed = 0
        todo = list(rows)
        while todo or pending:
            while todo and len(pending) < limit:
                r = todo.pop()
                pending[one.remote(cls, config, ctx, _ipc(r))] = r
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            r = pending.pop(ref)
            try:
                on_stats(json.loads(ray.get(ref)))
            except Exception as e:  # this row kills its worker
                failed += 1
                row = r.to_pylist()[0]
                rej = rejects_table([reject(row, ctx.stage_id, "worker_crash",
                                            f"{type(e).__name__}: {str(e)[:500]}")])
                store.write_rejects(ctx.stage_id, part_name(r), rej)
                on_stats({"rows_in": 1, "rows_out": 0, "rows_rejected": 1,
                          "seconds_in": float(row.get("duration") or 0.0),
                          "reasons": {"worker_crash": 1}})
        if rows and failed == len(rows) and failed >= 3:
            raise SpeechmillError(
                f"stage {ctx.stage_id!r}: every one of {failed} rows failed even alone; "
                f"this is not bad input but the stage or environment: {error}"
            ) from error

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
        import _thread

        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            if time.monotonic() - self.last > self.timeout_s and not self._stop.is_set():
                self.fired = True
                _thread.interrupt_main()
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
