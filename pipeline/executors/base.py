"""What the runner asks of an executor.

An executor runs the batches of a stage (:meth:`Executor.run_stage`), optionally a
whole stage as one streamed pipeline whose workers read its input
(:meth:`Executor.run_streaming`, where :attr:`Executor.streams`), and a fused chain of
stages (:meth:`Executor.run_chain`). Workers commit each batch to the run store
themselves (:mod:`.worker`); the driver receives only small stats dicts, passed to the
``on_stats`` callback (progress, error budget, the stall watchdog). A failure that is
not a row's fault is raised as
:class:`~speechmill.pipeline.errors.StageFailedError`. Worker processes the executor
lost and recovered from are listed in :attr:`Executor.lost_workers` (for the stages'
``recovery`` metrics).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from speechmill.pipeline.dag import PlannedStage
from speechmill.pipeline.stage import Resources, Stage, StageConfig, StageContext
from speechmill.pipeline.stage_input import StageInput
from speechmill.pipeline.store import RunStore

StatsFn = Callable[[dict[str, Any]], None]


@dataclass
class ChainMember:
    """One stage of a fused chain, as the executor runs it: its context (with what its
    ``prepare`` computed), the input read when the chain started (the head's whole
    input; another member's backlog) and, once the stream ends, when it ended."""

    st: PlannedStage
    ctx: StageContext
    inp: StageInput
    ended_mono: float | None = None

    @property
    def id(self) -> str:
        return self.st.id


#: ``on_stats(member, stats)`` of a chain: a batch of ``member`` finished
ChainStatsFn = Callable[[Any, dict[str, Any]], None]


class Executor(ABC):
    """Runs stages' batches; see the module docstring."""

    name: str = ""
    #: whether :meth:`run_streaming` runs a whole stage as one pipeline
    streams: bool = False

    @property
    def lost_workers(self) -> list[dict[str, Any]]:
        """Worker failures recovered from (``stage``, ``error``, ``message``, and
        ``rows_isolated`` when rows were rerun one by one), oldest first."""
        return []

    @abstractmethod
    def describe(self) -> str: ...

    def close(self) -> None:  # noqa: B027 - an executor without workers keeps it
        """Stop the workers."""

    @abstractmethod
    def run_stage(self, cls: type[Stage], config: StageConfig, ctx: StageContext,
                  batches: list[pa.Table], on_stats: StatsFn,
                  concurrency: int | None = None, resources: Resources | None = None
                  ) -> None:
        """Run and commit ``batches`` of one stage."""

    def run_streaming(self, cls: type[Stage], config: StageConfig, ctx: StageContext,
                      groups: list[list[tuple[Any, Any]]], n_batches: int,
                      batch_size: int, batch_seconds: float | None, on_stats: StatsFn,
                      concurrency: int | None = None, resources: Resources | None = None
                      ) -> bool:
        """Run a whole stage from ``groups`` of ``(unit, mask)`` its workers read. False
        when a worker died: the caller runs what is left with :meth:`run_stage`."""
        raise NotImplementedError(f"the {self.name} executor does not stream stages")

    @abstractmethod
    def run_chain(self, members: list[ChainMember], store: RunStore,
                  on_stats: ChainStatsFn, *, wave_rows: int, colocate: bool | None
                  ) -> bool:
        """Run a fused chain: each member's backlog, then what its upstream commits, as
        one pipeline; sets each member's ``ended_mono``. False when a worker died (the
        failure is in :attr:`lost_workers`): the caller runs the members one by one."""
