"""The local executor: batches run one after another in this process (debugging, tiny
runs, tests).

A fused chain runs depth-first: each batch a member commits is read back and pushed to
the next member at once, so each member holds at most about a batch of rows from
upstream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyarrow as pa

from speechmill.pipeline.batch import batches_of
from speechmill.pipeline.executors.base import (
    ChainMember,
    ChainStatsFn,
    Executor,
    StatsFn,
)
from speechmill.pipeline.executors.worker import StageHost, committed_outputs
from speechmill.pipeline.records import concat
from speechmill.pipeline.stage import Resources, Stage, StageConfig, StageContext
from speechmill.pipeline.store import RunStore


class LocalExecutor(Executor):
    """Runs batches sequentially in this process."""

    name = "local"

    def run_stage(self, cls: type[Stage], config: StageConfig, ctx: StageContext,
                  batches: list[pa.Table], on_stats: StatsFn,
                  concurrency: int | None = None, resources: Resources | None = None
                  ) -> None:
        host = StageHost(cls, config, ctx)
        host.raise_fatal()
        try:
            for b in batches:
                on_stats(host.run_or_raise(b))
        finally:
            host.close()

    def run_chain(self, members: list[ChainMember], store: RunStore,
                  on_stats: ChainStatsFn, *, wave_rows: int, colocate: bool | None
                  ) -> bool:
        _DepthFirst(members, store, on_stats).run(wave_rows)
        return True

    def describe(self) -> str:
        return "local (in-process)"


@dataclass
class _Buffer:
    """Rows pushed to one member and not yet run, and the ids pushed this attempt."""

    tables: list[pa.Table] = field(default_factory=list)
    rows: int = 0
    seen: set[str] = field(default_factory=set)


class _DepthFirst:
    """A fused chain in this process: backlogs first, then each member's committed
    outputs go to the next member as soon as a batch of them is there."""

    def __init__(self, members: list[ChainMember], store: RunStore,
                 on_stats: ChainStatsFn) -> None:
        self.members, self.store, self.on_stats = members, store, on_stats
        self.bufs = [_Buffer() for _ in members]
        self.hosts: list[StageHost] = []

    def run(self, wave_rows: int) -> None:
        try:
            for m in self.members:
                host = StageHost(m.st.cls, m.st.config, m.ctx)
                host.raise_fatal()
                self.hosts.append(host)
            for k, m in enumerate(self.members):  # backlogs (the head's: its whole input)
                for wave in m.inp.waves(wave_rows):
                    self.push(k, wave)
            for k, m in enumerate(self.members):  # then flush, upstream first
                self.drain(k, final=True)
                m.ended_mono = time.monotonic()
        finally:
            for h in self.hosts:
                h.close()

    def push(self, k: int, t: pa.Table) -> None:
        m, buf = self.members[k], self.bufs[k]
        ids = t.column("id").to_pylist()
        if any(i in buf.seen for i in ids) or len(set(ids)) < len(ids):
            keep = []
            for i in ids:  # an id seen before is not processed twice
                keep.append(i not in buf.seen)
                buf.seen.add(i)
            t = t.filter(pa.array(keep))
        else:
            buf.seen.update(ids)
        if t.num_rows:
            buf.tables.append(t)
            buf.rows += t.num_rows
            if buf.rows >= m.st.batch_size:
                self.drain(k, final=False)

    def drain(self, k: int, final: bool) -> None:
        m, buf = self.members[k], self.bufs[k]
        if not buf.rows:
            return
        batches = list(batches_of(concat(buf.tables), m.st.batch_size, m.st.batch_seconds))
        keep: list[pa.Table] = []
        if not final and batches[-1].num_rows < m.st.batch_size:
            keep = [batches.pop()]
        buf.tables, buf.rows = keep, sum(b.num_rows for b in keep)
        for b in batches:
            stats = self.hosts[k].run_or_raise(b, timed=True)
            self.on_stats(m, stats)
            if k + 1 < len(self.members):
                out = committed_outputs(self.store, m.id, b, stats)
                if out is not None and out.num_rows:
                    self.push(k + 1, out)
