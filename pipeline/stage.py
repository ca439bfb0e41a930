"""The stage contract.

A stage declares its DAG name, a pydantic config (unknown keys are errors), the
resources it needs and whether it holds a model. The engine builds one instance per
worker, calls :meth:`Stage.setup` once, then :meth:`Stage.process` on batches. A batch
maps an input table to outputs plus rejects: every input row ends in at least one output
row (whose ``parent_id`` is the input's ``id``) or exactly one reject row. Per-row
problems are rejects, never exceptions; the engine isolates a row whose processing
raises and turns it into a reject with reason ``error``. What is no row's fault stops the
stage instead: a ``setup()`` that raises, a full or read-only disk, a
:class:`~speechmill.pipeline.errors.SpeechmillError` (e.g. a missing model); and so do
too many ``error`` rows (the stage's ``max_error_fraction``).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from speechmill.pipeline.errors import is_fatal
from speechmill.pipeline.records import conform, reject, rejects_table


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {"cpus": self.cpus, "gpus": self.gpus, "memory_gb": self.memory_gb}


@dataclass(frozen=True)
class StageContext:
    """Where a stage instance runs. Picklable: it travels to Ray workers."""

    stage_id: str
    run_dir: str
    offline: bool = False
    #: what :meth:`Stage.prepare` computed over the stage's whole input (driver side)
    prepared: Any = None

    @property
    def media_dir(self) -> Path:
        """Where the stage writes media files. For a run directory on object storage a
        local directory: its files are uploaded to ``RUN_DIR/media/<stage>/...`` with the
        batch, before the batch's part, and the rows then name the object's URL."""
        return self._local_root() / "media" / self.stage_id

    @property
    def tmp_dir(self) -> Path:
        return self._local_root() / "tmp" / self.stage_id

    def _local_root(self) -> Path:
        from speechmill.pipeline.store.layout import is_url, local_cache_dir

        return local_cache_dir(self.run_dir) if is_url(self.run_dir) else Path(self.run_dir)


@dataclass
class StageResult:
    outputs: pa.Table
    rejects: pa.Table


class Reject(Exception):  # noqa: N818 - it is a verdict, not a failure of the engine
    """Raise from :meth:`Stage.process_row` to reject the row with a reason code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SinkResult:
    """What a sink stage's :meth:`Stage.export` wrote."""

    rows_out: int = 0  # rows written (utterances exported)
    seconds_out: float = 0.0  # audio seconds they cover
    rejects: pa.Table | None = None  # input rows that could not be exported
    summary: dict[str, Any] = field(default_factory=dict)  # -> metrics.json stage_summary


@dataclass
class RowOutcome:
    outputs: list[dict[str, Any]] = field(default_factory=list)
    reject: dict[str, Any] | None = None


class Stage:
    """Base class of every stage. Subclasses set the class attributes below."""

    #: name used in DAG files (``uses:``)
    name: ClassVar[str] = ""
    #: one-line description shown by ``speechmill stages``
    description: ClassVar[str] = ""
    Config: ClassVar[type[StageConfig]] = StageConfig
    resources: ClassVar[Resources] = Resources()
    #: holds a model: runs as an actor pool and loads it once in ``setup()``
    uses_model: ClassVar[bool] = False
    #: a source stage has no upstream: its inputs come from :meth:`plan`
    is_source: ClassVar[bool] = False
    #: the engine keeps one output row per ``id`` (the others become ``duplicate`` rejects)
    unique_output_ids: ClassVar[bool] = False
    #: a sink takes its whole input at once and writes files under
    #: ``RUN_DIR/<output_root>/<stage id>/`` (exports, shards, report) instead of rows
    is_sink: ClassVar[bool] = False
    output_root: ClassVar[str] = "exports"
    #: the stage reads or writes the run directory through local paths (not through the
    #: store), so it cannot run with a run directory on object storage (refused up front)
    local_run_dir_only: ClassVar[bool] = False
    #: a sink that reads the run directory itself (the report) needs no input table:
    #: ``needs`` then only orders it after its upstream stages
    reads_inputs: ClassVar[bool] = True
    #: a sink that may run without any upstream stage (``needs`` empty), exporting
    #: from its own config alone (``voice_bank`` from voice folders)
    inputs_optional: ClassVar[bool] = False
    #: behaviour version: bump it when a change to the stage makes it produce different
    #: outputs for the same input and config (a fixed bug, a new score); it is part of the
    #: stage's resume fingerprint, so a run directory written by an older version is not
    #: silently mixed with new outputs (the run stops and offers ``--restart-from``)
    version: ClassVar[int] = 1
    #: rows per batch unless the DAG sets ``batch_size``
    default_batch_size: ClassVar[int] = 4
    #: audio seconds per batch (model stages), unless the DAG sets ``batch_seconds``
    default_batch_seconds: ClassVar[float | None] = None

    def __init__(self, config: StageConfig, ctx: StageContext) -> None:
        self.config = config
        self.ctx = ctx

    # -- lifecycle ---------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: StageConfig) -> None:  # noqa: B027 - optional hook
        """Cross-field checks that need more than pydantic; raise ValueError naming the key."""

    @classmethod
    def validate_dag(cls, config: StageConfig,  # noqa: B027 - optional hook
                     upstream: dict[str, tuple[type[Stage], StageConfig]]) -> None:
        """Checks that need the rest of the DAG: ``upstream`` maps the id of every stage
        this one depends on (directly or not) to its (class, config). Raise ValueError
        naming the key; called once every stage's own config is valid."""

    #: the input columns :meth:`prepare` reads (``None``: all); the engine reads only
    #: these over the whole input, so a big input never has to fit in memory at once
    prepare_columns: ClassVar[tuple[str, ...] | None] = None
    #: whether :meth:`prepare` reads the input: False for a driver-side check that needs
    #: none (say, that a model can be located), which lets the stage start on part of
    #: its input, fused with its upstream (:mod:`speechmill.pipeline.fused`); it is then
    #: given an empty table
    prepare_reads_inputs: ClassVar[bool] = True

    @classmethod
    def has_prepare(cls) -> bool:
        return cls.prepare.__func__ is not Stage.prepare.__func__  # type: ignore[attr-defined]

    @classmethod
    def prepare(cls, config: StageConfig, inputs: pa.Table,
                ctx: StageContext | None = None) -> Any:
        """Optional driver-side pass over the stage's *whole* input before any batch
        (e.g. per-file statistics, fitting a k-means codebook); the result reaches workers
        as ``ctx.prepared``. It must depend only on the inputs so a resumed run computes
        the same. ``ctx`` (absent in unit tests) locates the run directory."""
        return None

    def plan(self) -> pa.Table:
        """Source stages: the rows to process (each with a deterministic ``id``)."""
        raise NotImplementedError(f"stage {self.name!r} is not a source stage")

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load models / open clients. Called once per worker before any batch."""

    def teardown(self) -> None:  # noqa: B027 - optional hook
        """Release what setup() took."""

    #: GPU share one worker takes when the cluster has GPUs (model stages that can run
    #: on CUDA); 0 = never asks for a GPU. See :meth:`gpu_share`.
    gpu_when_available: ClassVar[float] = 0.0

    @classmethod
    def gpu_share(cls, config: StageConfig) -> float:
        """GPUs a worker asks for when the cluster has some (the DAG's ``resources.gpus``
        wins). Default: :attr:`gpu_when_available` unless the config pins ``device: cpu``."""
        if getattr(config, "device", "auto") == "cpu":
            return 0.0
        return cls.gpu_when_available

    #: output columns :meth:`summarize` reads (``None``: all)
    summary_columns: ClassVar[tuple[str, ...] | None] = None

    @classmethod
    def has_summary(cls) -> bool:
        return cls.summarize.__func__ is not Stage.summarize.__func__  # type: ignore[attr-defined]

    @classmethod
    def summarize(cls, outputs: pa.Table, rejects: pa.Table) -> dict[str, Any] | None:
        """Stage-specific figures for ``metrics.json`` (``stage_summary``), computed from
        everything the stage committed (so they survive resumes). Optional."""
        return None

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        """Human-readable lines for the terminal from :meth:`summarize`'s result."""
        return []

    # -- work ----------------------------------------------------------------------
    def export(self, inputs: pa.Table, out_dir: Path) -> SinkResult:
        """Sink stages: write files for the whole input under ``out_dir`` (an empty
        directory; the engine renames it into place when this returns, so a killed
        export leaves nothing half-written). Must be deterministic: the same input gives
        byte-identical files. Rows that cannot be exported go into ``rejects``."""
        raise NotImplementedError(f"stage {self.name!r} is not a sink stage")

    def process_row(self, row: dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
        """Map one input row to one or more output rows; raise :class:`Reject` to reject."""
        raise NotImplementedError

    def process(self, batch: pa.Table) -> StageResult:
        """Map a batch. The default calls :meth:`process_row` per row."""
        outputs: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        for row in batch.to_pylist():
            outcome = self.run_row(row)
            outputs.extend(outcome.outputs)
            if outcome.reject is not None:
                rejects.append(outcome.reject)
        return StageResult(self.outputs_table(outputs), rejects_table(rejects))

    def run_row(self, row: dict[str, Any]) -> RowOutcome:
        try:
            out = self.process_row(row)
        except Reject as r:
            return RowOutcome(reject=reject(row, self.ctx.stage_id, r.reason, r.detail))
        except Exception as e:  # one row's failure never kills the run...
            if is_fatal(e):  # ...but a full disk or an engine error is not the row's
                raise
            detail = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
            return RowOutcome(reject=reject(row, self.ctx.stage_id, "error", detail))
        rows = [out] if isinstance(out, dict) else list(out)
        for r in rows:
            r.setdefault("parent_id", row.get("id"))
        return RowOutcome(outputs=rows)

    def outputs_table(self, rows: list[dict[str, Any]]) -> pa.Table:
        if not rows:
            return pa.table({"id": pa.array([], pa.string()), "parent_id": pa.array([], pa.string())})
        return conform(pa.Table.from_pylist(rows))

    def reject_row(self, row: dict[str, Any], reason: str, detail: str = "", *,
                   transient: bool = False) -> dict[str, Any]:
        return reject(row, self.ctx.stage_id, reason, detail, transient=transient)


def config_fields(cls: type[StageConfig]) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, description) for each config key, for ``speechmill stages``."""
    from pydantic_core import PydanticUndefined

    out = []
    for name, f in cls.model_fields.items():
        ann = f.annotation
        tname = str(ann).replace("typing.", "")
        if isinstance(ann, type):
            tname = ann.__name__
        elif getattr(ann, "__origin__", None) is Literal:
            tname = " | ".join(repr(a) for a in ann.__args__)  # type: ignore[union-attr]
        default: Any = "<required>" if f.default is PydanticUndefined else f.default
        if f.default_factory is not None:
            default = f.default_factory()  # type: ignore[call-arg]
        out.append((name, tname, default, f.description or ""))
    return out
