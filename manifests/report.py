"""``report``: a sink that ends a DAG with the dataset report of the whole run.

It ignores its input rows (``needs:`` only orders it after the stages it reports on) and
writes ``report.json``, the PNG plots and a self-contained ``index.html`` for the run
directory into ``RUN_DIR/report/<stage id>/`` (see :mod:`speechmill.manifests.dataset_report`;
``speechmill report RUN_DIR`` writes the same files into ``RUN_DIR/report/cli/``). A run
directory on object storage is read through fsspec; the engine uploads the files::

  - id: report
    uses: report
    needs: [filter]
    with: {top_n: 20, bins: 30, scheduler: threads}   # all optional
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field

from speechmill.pipeline.stage import Resources, SinkResult, Stage, StageConfig


class ReportConfig(StageConfig):
    stage: str | None = Field(
        None, description="stage whose outputs are the dataset (default: the last stage "
        "in DAG order whose outputs have a duration column)")
    top_n: int = Field(20, ge=1, le=10000, description="speakers/sources listed in tables")
    bins: int = Field(30, ge=1, le=1000, description="histogram bins")
    scheduler: Literal["threads", "local", "ray"] = Field(
        "threads", description="Dask scheduler: threads, local (synchronous) or ray "
        "(Dask-on-Ray: the run's Ray session or cluster)")
    ray_address: str | None = Field(
        None, description="Ray cluster for scheduler=ray (default: the run's executor)")


class Report(Stage):
    name: ClassVar[str] = "report"
    description: ClassVar[str] = ("dataset report of the whole run: hours by language, "
                                  "speaker, source, split; histograms; rejects (HTML+JSON)")
    Config: ClassVar[type[StageConfig]] = ReportConfig
    resources: ClassVar[Resources] = Resources(cpus=1.0)
    is_sink: ClassVar[bool] = True
    reads_inputs: ClassVar[bool] = False
    output_root: ClassVar[str] = "report"

    def export(self, inputs: pa.Table, out_dir: Path) -> SinkResult:
        from speechmill.manifests.dataset_report import build_report

        cfg: ReportConfig = self.config  # type: ignore[assignment]
        rep = build_report(
            self.ctx.run_dir, out_dir, stage=cfg.stage, top_n=cfg.top_n, bins=cfg.bins,
            scheduler=cfg.scheduler, ray_address=cfg.ray_address,
            exclude_stages=(self.ctx.stage_id,),
        )
        tot, rej = rep["totals"], rep["rejects"]
        return SinkResult(
            rows_out=int(tot["rows"]),
            seconds_out=float(tot["seconds"]),
            summary={
                "dataset_stage": rep["dataset"]["stage"],
                "rows": tot["rows"],
                "hours": tot["hours"],
                "speakers": tot["speakers"],
                "languages": tot["languages"],
                "rejected_rows": rej["rows"],
                "rejected_hours": rej["hours"],
                "report": "index.html",
                "notes": rep["notes"],
            },
        )

    @classmethod
    def build(cls, run_dir: str, out_dir: str | Path, *, atomic: bool, **kw: Any
              ) -> dict[str, Any]:
        """The dataset report of ``run_dir`` (used by ``speechmill report``, which finds
        this stage through the registry: the engine imports no concrete stage)."""
        from speechmill.manifests.dataset_report import build_report, build_report_atomic

        return (build_report_atomic if atomic else build_report)(run_dir, out_dir, **kw)

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        if not summary:
            return []
        lines = [f"dataset {summary.get('dataset_stage')}: {summary.get('rows')} rows, "
                 f"{summary.get('hours')} h, {summary.get('speakers')} speakers, "
                 f"{summary.get('languages')} languages; rejected {summary.get('rejected_rows')}"
                 f" rows ({summary.get('rejected_hours')} h)"]
        lines += [f"note: {n}" for n in summary.get("notes") or []]
        return lines
