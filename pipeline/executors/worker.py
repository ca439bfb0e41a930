"""The worker host: one stage set up in a worker, running its batches.

Every executor runs a stage's batches through a :class:`StageHost`: in this process (the
local executor, its fused chains), in a Ray actor, or in a Ray task worker, which keeps
its hosts between tasks (:func:`cached_host`: one per stage, set up once per process).
A host builds the stage and calls ``setup()`` once; a ``setup()`` that raises is not
raised there but kept as the host's ``fatal`` entry (original type, message,
traceback), which the driver raises as
:class:`~speechmill.pipeline.errors.StageFailedError` (a Ray worker that died of it
instead would leave only a traceback string). Each batch goes through
:func:`~speechmill.pipeline.batch.run_batch`, which commits it to the run store; what
fails there and is not a row's fault (the store cannot be written, an engine error)
becomes a ``fatal`` entry too.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pyarrow as pa

from speechmill.pipeline.batch import part_name, run_batch
from speechmill.pipeline.failures import fatal_info, stage_failed
from speechmill.pipeline.stage import Stage, StageConfig, StageContext
from speechmill.pipeline.store import RunStore, open_store

#: column of an IPC-encoded block that carries a read task's failure instead of rows
FATAL_COL = "__speechmill_fatal__"


def to_ipc(table: pa.Table) -> bytes:
    """``table`` as Arrow IPC stream bytes (how batches travel as Ray rows)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def quiet_worker() -> None:
    """Keep Ray's own logging in a worker process to errors."""
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.ERROR)


class StageHost:
    """One stage instance set up in a worker, and the run store its batches commit to.

    ``fatal`` is None, or what stopped the stage: its ``setup()`` raised (``error`` is
    that exception)."""

    def __init__(self, cls: type[Stage], config: StageConfig, ctx: StageContext) -> None:
        self.stage_id = ctx.stage_id
        self.store = open_store(ctx.run_dir)
        self.stage: Stage | None = None
        self.fatal: dict[str, Any] | None = None
        self.error: Exception | None = None
        try:
            stage = cls(config, ctx)
            stage.setup()
            self.stage = stage
        except Exception as e:
            self.fatal, self.error = fatal_info(e, "setup"), e

    def raise_fatal(self) -> None:
        """Raise a failed ``setup()`` as the stage's
        :class:`~speechmill.pipeline.errors.StageFailedError` (driver side)."""
        if self.fatal is not None:
            raise stage_failed(self.stage_id, self.fatal) from self.error

    def run(self, batch: pa.Table, timed: bool = False) -> dict[str, Any]:
        """Run and commit one batch; its stats (with ``t_start`` / ``t_end`` wall-clock
        times when ``timed``). Raises what is not a row's fault."""
        assert self.stage is not None
        t_a = time.time()
        stats = run_batch(self.stage, batch, self.store)
        if timed:
            stats.update(t_start=t_a, t_end=time.time())
        return stats

    def run_or_raise(self, batch: pa.Table, timed: bool = False) -> dict[str, Any]:
        """:meth:`run`, a failure raised as the stage's ``StageFailedError`` (in-process
        executors)."""
        self.raise_fatal()
        try:
            return self.run(batch, timed)
        except Exception as e:  # fatal: run_batch rejects what is a row's fault
            raise stage_failed(self.stage_id, fatal_info(e, "batch")) from e

    def run_or_report(self, batch: pa.Table, timed: bool = False) -> dict[str, Any]:
        """:meth:`run`, a failure returned as ``{"fatal": ...}`` stats (Ray workers)."""
        if self.fatal is not None:
            return {"fatal": self.fatal}
        try:
            return self.run(batch, timed)
        except Exception as e:
            return {"fatal": fatal_info(e, "batch")}

    def run_blocks(self, blocks: list[bytes]) -> list[str]:
        """Run each IPC-encoded batch; JSON stats per batch. A failure (``setup()``
        raised, a batch failed, or the block is a read task's failure) ends the list as
        a ``fatal`` entry: the driver fails the stage with it."""
        out: list[str] = []
        for data in blocks:
            t = from_ipc(data) if self.fatal is None else None
            if t is not None and FATAL_COL in t.column_names:  # the read task failed
                stats = {"fatal": json.loads(t.column(FATAL_COL)[0].as_py())}
            else:
                stats = self.run_or_report(t) if t is not None else {"fatal": self.fatal}
            out.append(json.dumps(stats))
            if "fatal" in stats:
                break
        return out

    def close(self) -> None:
        if self.stage is not None:
            self.stage.teardown()


#: the hosts a worker process set up, by stage (see :func:`cached_host`)
_HOSTS: dict[tuple[str, str], StageHost] = {}


def cached_host(cls: type[Stage], config: StageConfig, ctx: StageContext) -> StageHost:
    """This worker process's host of the stage, set up on first use: a Ray task worker
    keeps its stages (and their models) between tasks. A host whose ``setup()`` failed
    is not kept (the next task tries again)."""
    key = (f"{cls.__module__}.{cls.__qualname__}:{ctx.stage_id}:{ctx.run_dir}",
           config.model_dump_json())
    host = _HOSTS.get(key)
    if host is None:
        host = StageHost(cls, config, ctx)
        if host.fatal is None:
            _HOSTS[key] = host
    return host


def committed_outputs(store: RunStore, stage_id: str, batch: pa.Table,
                      stats: dict[str, Any]) -> pa.Table | None:
    """The output part :func:`~speechmill.pipeline.batch.run_batch` committed for
    ``batch``, read back through the store (on an object store its media paths name the
    uploaded objects); None when the batch had no outputs."""
    if not stats.get("rows_out"):
        return None
    return store.read_outputs_part(
        f"{store.stage_dir(stage_id)}/part-{part_name(batch)}.parquet", None)
