"""The dataset report: what a run made, as numbers, plots and one HTML page.

Dask reads the run's Parquet (the part files only: a stage directory also holds
``metrics.json`` and ``rejects/``) and computes hours per language, speaker, source and
split; duration, DNSMOS and speaking-rate histograms; rejects of every stage by reason
(rows and hours) and the top speakers. It runs on Dask's local schedulers (``threads``,
the default, or ``local``: synchronous, one thread) or on Ray (``ray``: Dask-on-Ray, on the
run's cluster or an embedded one).

Written into ``out_dir``::

    report.json     every number (sorted keys: the same run gives the same file)
    index.html      self-contained page: tables, plots embedded as data: URIs
    *.png           the plots (also embedded in index.html)

The *dataset* is one stage's outputs: by default the last non-sink stage in DAG order
that committed part files with a ``duration`` column (or finished with no rows at all);
``stage=`` picks another. Rejects come from every stage. A run still in progress, failed
or interrupted is reported as far as it is committed, and the report says so (``notes``).

Where reports go: the ``report`` sink stage (:mod:`speechmill.manifests.report`) writes
``RUN_DIR/report/<stage id>/``; ``speechmill report RUN_DIR`` writes ``RUN_DIR/report/cli/``
(or ``--out DIR``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from speechmill.manifests.report_html import JSON_GROUP_LIMIT, render_html, write_plots
from speechmill.pipeline.errors import ConfigError

SCHEDULERS = ("threads", "local", "ray")
REPORT_VERSION = 1
UNKNOWN = "(unknown)"
#: grouping keys (``source`` is derived from ``source_url``, else ``audio_path``)
GROUP_KEYS = ("language", "speaker", "source", "split")
#: histograms: name -> (column in the frame, axis label, (lo, hi) the bins always cover;
#: hi <= lo: only lo, e.g. durations start at 0)
METRICS: dict[str, tuple[str, str, tuple[float, float] | None]] = {
    "duration_s": ("duration", "duration (s)", (0.0, 0.0)),
    "dnsmos_ovrl": ("dnsmos_ovrl", "DNSMOS OVRL", (1.0, 5.0)),
    "chars_per_s": ("chars_per_s", "speaking rate (characters/s)", (0.0, 0.0)),
    "words_per_s": ("words_per_s", "speaking rate (words/s)", (0.0, 0.0)),
}
#: score columns: frame column -> names it may have inside ``scores`` or at top level
SCORE_COLUMNS: dict[str, tuple[str, ...]] = {
    "dnsmos_ovrl": ("dnsmos_ovrl", "dnsmos"),
    "chars_per_s": ("chars_per_s",),
    "words_per_s": ("words_per_s",),
}
FRAME_SCHEMA = pa.schema(
    [("duration", pa.float64())]
    + [(k, pa.string()) for k in GROUP_KEYS]
    + [(c, pa.float64()) for c in SCORE_COLUMNS]
)
REJECT_FRAME_SCHEMA = pa.schema(
    [("stage", pa.string()), ("reason", pa.string()), ("duration", pa.float64())]
)


# -- reading one part file (runs on Dask workers: module-level, picklable) -------------------


def source_of(url: str | None) -> str:
    """Where a row comes from: the host of an http(s) URL, ``scheme://bucket`` of an
    object-store URL, or the parent directory of a local path."""
    if not url:
        return UNKNOWN
    p = urlparse(url)
    if p.scheme in ("http", "https"):
        return (p.hostname or UNKNOWN).lower()
    if p.scheme == "file":
        return str(PurePosixPath(unquote(p.path)).parent)
    if len(p.scheme) > 1:  # s3://bucket/..., gs://..., mem://... (one letter: C:\ on Windows)
        host = p.netloc.rsplit("@", 1)[-1]  # never user:password@
        return f"{p.scheme}://{host}" if host else f"{p.scheme}:"
    return os.path.dirname(url.rstrip("/\\")) or "."


def _strings(t: pa.Table, name: str) -> pa.Array:
    if name not in t.column_names:
        return pa.nulls(t.num_rows, pa.string())
    col = t.column(name)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return pc.cast(col, pa.string()).combine_chunks()


def _floats(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), pa.float64())
    return pc.cast(arr, pa.float64())


def _sources(urls: pa.Array) -> pa.Array:
    enc = pc.dictionary_encode(urls)
    mapped = pa.array([source_of(u) for u in enc.dictionary.to_pylist()], pa.string())
    return pc.fill_null(pc.take(mapped, enc.indices), UNKNOWN)


def _is_url(path: Any) -> bool:
    from speechmill.pipeline.store.layout import is_url

    return isinstance(path, str) and is_url(path)


def _schema(path: Any) -> pa.Schema:
    """A part file's schema from its footer (a URL: ranged reads through fsspec)."""
    if not _is_url(path):
        return pq.read_schema(path)
    import fsspec

    with fsspec.open(path, "rb") as f:
        return pq.ParquetFile(f).schema_arrow


def _num_rows(path: Any) -> int:
    if not _is_url(path):
        return pq.ParquetFile(path).metadata.num_rows
    import fsspec

    with fsspec.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _read_columns(path: Any, columns: list[str]) -> pa.Table:
    if not _is_url(path):
        return pq.read_table(path, columns=columns)
    import fsspec

    with fsspec.open(path, "rb") as f:
        return pq.ParquetFile(f).read(columns=columns)


def read_dataset_part(path: str) -> Any:
    """One output part file as a pandas frame with :data:`FRAME_SCHEMA`'s columns: group
    keys with nulls as ``(unknown)``, the ``scores`` struct's fields flattened. ``path``
    may be a URL (a run directory on object storage)."""
    schema = _schema(path)
    names = set(schema.names)
    want = [c for c in ("duration", "language", "speaker", "split", "source_url", "audio_path")
            if c in names]
    scores_type = schema.field("scores").type if "scores" in names else None
    if scores_type is not None and pa.types.is_struct(scores_type):
        want.append("scores")
    else:
        scores_type = None
    for aliases in SCORE_COLUMNS.values():
        want += [a for a in aliases if a in names and a not in want]
    t = _read_columns(path, want)
    n = t.num_rows
    cols: dict[str, pa.Array] = {}
    cols["duration"] = (_floats(t.column("duration")) if "duration" in t.column_names
                        else pa.nulls(n, pa.float64()))
    for k in ("language", "speaker"):
        cols[k] = pc.fill_null(_strings(t, k), UNKNOWN)
    urls = _strings(t, "source_url")
    if "audio_path" in t.column_names:
        urls = pc.coalesce(urls, _strings(t, "audio_path"))
    cols["source"] = _sources(urls)
    cols["split"] = pc.fill_null(_strings(t, "split"), UNKNOWN)
    for col, aliases in SCORE_COLUMNS.items():
        val: pa.Array | None = None
        for a in aliases:
            if scores_type is not None and scores_type.get_field_index(a) >= 0:
                val = _floats(pc.struct_field(t.column("scores"), a))
                break
            if a in t.column_names:
                val = _floats(t.column(a))
                break
        cols[col] = val if val is not None else pa.nulls(n, pa.float64())
    return pa.table(cols, schema=FRAME_SCHEMA).to_pandas()


def read_rejects_part(path: str, stage_id: str) -> Any:
    """One rejects part file as a frame (stage, reason, duration); a missing stage is the
    directory's stage id, a missing reason ``(unknown)``."""
    names = set(_schema(path).names)
    t = _read_columns(path, [c for c in ("stage", "reason", "duration") if c in names])
    n = t.num_rows
    stage = pc.fill_null(_strings(t, "stage"), stage_id)
    reason = pc.fill_null(_strings(t, "reason"), UNKNOWN)
    dur = _floats(t.column("duration")) if "duration" in names else pa.nulls(n, pa.float64())
    return pa.table([stage, reason, dur], schema=REJECT_FRAME_SCHEMA).to_pandas()


def _hist_part(df: Any, edges: dict[str, list[float]]) -> dict[str, list[int]]:
    import numpy as np

    out = {}
    for col, e in edges.items():
        x = df[col].to_numpy(dtype="float64", na_value=np.nan)
        x = x[np.isfinite(x)]
        out[col] = np.histogram(x, bins=np.asarray(e, dtype="float64"))[0].tolist()
    return out


def _sum_hists(parts: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for p in parts:
        for col, counts in p.items():
            acc = out.setdefault(col, [0] * len(counts))
            for i, c in enumerate(counts):
                acc[i] += int(c)
    return out


# -- the run directory ------------------------------------------------------------------------


def _parts(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("part-*.parquet") if p.is_file()) if d.is_dir() else []


@dataclass
class RunLayout:
    """What the run directory holds: stages in DAG order and their committed files.
    ``store``: the run's :class:`~speechmill.pipeline.store.RunStore` when it is on
    object storage (``root`` is then its URL, and part files are named by URL)."""

    root: Path
    info: dict[str, Any]
    dag: dict[str, Any]
    order: list[str]
    uses: dict[str, str] = field(default_factory=dict)
    store: Any = None

    def stage_dir(self, sid: str) -> Path:
        return self.root / "stages" / sid

    def has_stage(self, sid: str) -> bool:
        if self.store is not None:
            return bool(self.store.has_stage_dir(sid))
        return self.stage_dir(sid).is_dir()

    def outputs(self, sid: str) -> list[Any]:
        if self.store is not None:
            return self.store.output_parts(sid)
        return _parts(self.stage_dir(sid))

    def rejects(self, sid: str) -> list[Any]:
        if self.store is not None:
            return self.store.reject_parts(sid)
        return _parts(self.stage_dir(sid) / "rejects")

    def done(self, sid: str) -> bool:
        if self.store is not None:
            return bool(self.store.is_done(sid))
        return (self.stage_dir(sid) / "_SUCCESS").exists()

    def metrics(self, sid: str) -> dict[str, Any]:
        if self.store is not None:
            try:
                m = self.store.read_metrics(sid)
            except (OSError, ValueError):
                return {}
            return m if isinstance(m, dict) else {}
        p = self.stage_dir(sid) / "metrics.json"
        try:
            return json.loads(p.read_text()) if p.exists() else {}
        except (OSError, json.JSONDecodeError):
            return {}


def _read_json(p: Path) -> dict[str, Any]:
    try:
        obj = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _json_obj(b: bytes | None) -> dict[str, Any]:
    try:
        obj = json.loads(b) if b else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _order(specs: list[dict[str, Any]]) -> list[str]:
    """Stage ids in DAG order: dependencies first, file order otherwise."""
    by_id = {str(s["id"]): s for s in specs}
    order: list[str] = []

    def visit(sid: str, path: tuple[str, ...]) -> None:
        if sid in order or sid in path or sid not in by_id:
            return
        needs = by_id[sid].get("needs") or []
        for n in [needs] if isinstance(needs, str) else needs:
            visit(str(n), (*path, sid))
        order.append(sid)

    for s in specs:
        visit(str(s["id"]), ())
    return order


def _dag_specs(text: bytes | str | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import yaml

    dag: dict[str, Any] = {}
    with contextlib.suppress(yaml.YAMLError, UnicodeDecodeError):
        raw = yaml.safe_load(text) if text else None
        dag = raw if isinstance(raw, dict) else {}
    specs = [s for s in (dag.get("stages") or []) if isinstance(s, dict) and s.get("id")]
    return dag, specs


def _load_object_layout(url: str) -> RunLayout:
    """:func:`load_layout` for a run directory on object storage (read through its store:
    listings bypass fsspec's cache, so a report at the end of the run sees every part)."""
    from speechmill.pipeline.store import open_store

    store = open_store(url)
    if not store.exists():
        raise ConfigError(f"{url!r} is not a run directory (no run.json or stages/)")
    info = _json_obj(store.read_root_file("run.json"))
    dag, specs = _dag_specs(store.read_root_file("dag.yaml"))
    order = _order(specs)
    by_id = {str(s["id"]): s for s in specs}
    extra = [sid for sid in store.stage_ids() if sid not in by_id]

    def when(sid: str) -> tuple[str, str]:
        m = store.read_metrics(sid) if store.is_done(sid) else None
        return (str((m or {}).get("finished_at") or "~"), sid)

    order += sorted(extra, key=when)
    uses = {sid: str(by_id[sid].get("uses", "")) for sid in by_id}
    return RunLayout(root=url, info=info, dag=dag, order=order,  # type: ignore[arg-type]
                     uses=uses, store=store)


def load_layout(run_dir: str | os.PathLike[str]) -> RunLayout:
    """Read ``dag.yaml``/``run.json`` (both optional) and list the stages in DAG order
    (dependencies first, file order otherwise); stage directories the DAG does not name
    come last. ``run_dir`` may be a URL (``s3://bucket/run``: read through fsspec)."""
    if _is_url(os.fspath(run_dir)):
        return _load_object_layout(os.fspath(run_dir).rstrip("/"))
    root = Path(run_dir)
    if not root.is_dir():
        raise ConfigError(f"no run directory {str(root)!r}")
    if not any((root / n).exists() for n in ("stages", "run.json", "dag.yaml")):
        raise ConfigError(f"{str(root)!r} is not a run directory (no stages/, run.json or "
                          "dag.yaml)")
    info = _read_json(root / "run.json")
    text = None
    with contextlib.suppress(OSError):
        text = (root / "dag.yaml").read_text()
    dag, specs = _dag_specs(text)
    by_id = {str(s["id"]): s for s in specs}
    order = _order(specs)
    stages_dir = root / "stages"
    if stages_dir.is_dir():
        extra = [p.name for p in stages_dir.iterdir() if p.is_dir() and p.name not in by_id]

        def when(sid: str) -> tuple[str, str]:
            m = _read_json(stages_dir / sid / "metrics.json")
            return (str(m.get("finished_at") or "~"), sid)

        order += sorted(extra, key=when)
    uses = {sid: str(by_id[sid].get("uses", "")) for sid in by_id}
    return RunLayout(root=root, info=info, dag=dag, order=order, uses=uses)


def pick_dataset_stage(layout: RunLayout, stage: str | None = None,
                       exclude_stages: tuple[str, ...] = ()) -> str | None:
    """``stage`` if given (it must exist), else the last stage in DAG order that is not a
    sink and has committed something: part files with a ``duration`` column, or a
    finished stage with no output rows at all (then the dataset is empty). None when no
    stage qualifies. Sinks are recognised by their ``metrics.json`` (``output_dir``)."""
    if stage:
        if stage not in layout.order and not layout.has_stage(stage):
            known = ", ".join(layout.order) or "none"
            raise ConfigError(f"no stage {stage!r} in this run (stages: {known})",
                              key="stage")
        return stage
    for sid in reversed(layout.order):
        if sid in exclude_stages or "output_dir" in layout.metrics(sid):
            continue
        parts = layout.outputs(sid)
        if not parts:
            if layout.done(sid):
                return sid
            continue
        for p in parts:
            with contextlib.suppress(OSError, pa.ArrowException):
                if "duration" in _schema(p).names:
                    return sid
    return None


def _columns_present(parts: list[Any]) -> dict[str, bool]:
    """Which report columns any part file has (footers only)."""
    have = dict.fromkeys(("duration", "language", "speaker", "source", "split",
                          *SCORE_COLUMNS), False)
    for p in parts:
        s = _schema(p)
        names = set(s.names)
        for c in ("duration", "language", "speaker", "split"):
            have[c] = have[c] or c in names
        have["source"] = have["source"] or bool({"source_url", "audio_path"} & names)
        st = s.field("scores").type if "scores" in names else None
        for col, aliases in SCORE_COLUMNS.items():
            inner = st is not None and pa.types.is_struct(st) and any(
                st.get_field_index(a) >= 0 for a in aliases)
            have[col] = have[col] or inner or bool(set(aliases) & names)
    return have


# -- computing ----------------------------------------------------------------------------------


@contextlib.contextmanager
def dask_scheduler(scheduler: str, ray_address: str | None = None,
                   num_cpus: int | None = None) -> Iterator[Any]:
    """The ``scheduler=`` argument for ``dask.compute``. ``ray`` uses the Ray session the
    process already has (e.g. the run's executor), else connects to ``ray_address`` /
    ``$RAY_ADDRESS`` or starts an embedded Ray that is shut down afterwards."""
    if scheduler == "threads":
        yield "threads"
        return
    if scheduler == "local":
        yield "sync"
        return
    if scheduler != "ray":
        raise ConfigError(f"unknown scheduler {scheduler!r} ({' | '.join(SCHEDULERS)})",
                          key="scheduler")
    import ray
    from ray.util.dask import ray_dask_get

    owned = not ray.is_initialized()
    if owned:
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.ERROR,
                                      log_to_driver=False)
        address = ray_address or os.environ.get("RAY_ADDRESS") or None
        if address:
            kwargs["address"] = address
        elif num_cpus:
            kwargs["num_cpus"] = num_cpus
        ray.init(**kwargs)
    try:
        yield ray_dask_get
    finally:
        if owned:
            ray.shutdown()


def _group_table(df: Any) -> dict[str, dict[str, Any]]:
    keys = [str(k) for k in df.index.tolist()]
    return {k: _amount(int(n), float(sec))
            for k, n, sec in zip(keys, df["size"].tolist(), df["sum"].tolist(), strict=True)}


def _amount(rows: int, seconds: float) -> dict[str, Any]:
    seconds = 0.0 if seconds is None or math.isnan(seconds) else float(seconds)
    return {"rows": int(rows), "seconds": round(seconds, 3), "hours": round(seconds / 3600, 6)}


def _edges(name: str, lo: float, hi: float, bins: int) -> list[float]:
    import numpy as np

    cover = METRICS[name][2]
    if cover is not None:
        if cover[1] > cover[0]:
            lo, hi = min(lo, cover[0]), max(hi, cover[1])
        else:
            lo = min(lo, cover[0])
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    return [float(x) for x in np.linspace(lo, hi, bins + 1)]


def _as_float(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def compute_report(run_dir: str | os.PathLike[str], *, stage: str | None = None,
                   top_n: int = 20, bins: int = 30, scheduler: str = "threads",
                   ray_address: str | None = None,
                   exclude_stages: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every number of the report as a JSON-ready dict (see the module docstring).

    ``exclude_stages``: stages that are not expected to be finished (the report stage that
    is running this, at the end of its own DAG)."""
    import dask
    import dask.dataframe as dd

    if top_n < 1 or bins < 1:
        raise ConfigError("top_n and bins must be >= 1")
    layout = load_layout(run_dir)
    dataset = pick_dataset_stage(layout, stage, exclude_stages)
    notes: list[str] = []
    status = str(layout.info.get("status") or "unknown")
    in_dag = bool(exclude_stages)
    if not layout.info:
        notes.append("no run.json: the run never started or this is not a full run directory")
    elif status != "succeeded" and not (in_dag and status == "running"):
        notes.append(f"run status is {status!r}: this report covers what was committed so far")
    unfinished = [s for s in layout.order if s not in exclude_stages and not layout.done(s)]
    if unfinished:
        notes.append("stages not finished (their committed part files are included): "
                     + ", ".join(unfinished))
    if dataset is None:
        notes.append("no stage has committed output rows with a 'duration' column: no "
                     "dataset figures")

    parts = layout.outputs(dataset) if dataset else []
    have = _columns_present(parts)
    rej_parts = [(p, sid) for sid in layout.order for p in layout.rejects(sid)]

    ex = executor_settings(layout, ray_address)
    with dask_scheduler(scheduler, ex["address"], ex["num_cpus"]) as sched:
        todo: dict[str, Any] = {}
        ddf = None
        if parts:
            meta = read_dataset_part_meta()
            ddf = dd.from_map(read_dataset_part, [str(p) for p in parts], meta=meta,
                              enforce_metadata=False, label="speechmill-dataset")
            dur = ddf["duration"]
            todo.update(rows=dur.size, dur_count=dur.count(), dur_sum=dur.sum())
            for k in GROUP_KEYS:
                if have[k]:
                    todo[f"by_{k}"] = ddf.groupby(k)["duration"].agg(["size", "sum"])
            for name, (col, _, _) in METRICS.items():
                if have[col]:
                    s = ddf[col]
                    todo.update({f"{name}_min": s.min(), f"{name}_max": s.max(),
                                 f"{name}_count": s.count(), f"{name}_sum": s.sum()})
        if rej_parts:
            rmeta = read_rejects_part_meta()
            rdf = dd.from_map(read_rejects_part, [str(p) for p, _ in rej_parts],
                              [sid for _, sid in rej_parts], meta=rmeta,
                              enforce_metadata=False, label="speechmill-rejects")
            todo["rejects"] = rdf.groupby(["stage", "reason"])["duration"].agg(
                ["size", "sum", "count"])
        keys = list(todo)
        got = dict(zip(keys, dask.compute(*todo.values(), scheduler=sched), strict=True))
        edges: dict[str, list[float]] = {}
        for name, (col, _, _) in METRICS.items():
            if ddf is not None and have[col] and int(got[f"{name}_count"]) > 0:
                edges[col] = _edges(name, float(got[f"{name}_min"]),
                                    float(got[f"{name}_max"]), bins)
        counts: dict[str, list[int]] = {}
        if edges and ddf is not None:
            sub = ddf[list(edges)]
            hs = [dask.delayed(_hist_part)(p, edges) for p in sub.to_delayed()]
            (counts,) = dask.compute(dask.delayed(_sum_hists)(hs), scheduler=sched)

    rows = int(got.get("rows", 0))
    dur_sum = _as_float(got.get("dur_sum")) or 0.0
    dur_count = int(got.get("dur_count", 0))
    hours_by: dict[str, Any] = {}
    for k in GROUP_KEYS:  # None: the column is missing (dataset.columns says which)
        hours_by[k] = _group_table(got[f"by_{k}"]) if f"by_{k}" in got else None
    histograms: dict[str, Any] = {}
    for name, (col, label, _) in METRICS.items():
        if col not in edges:
            histograms[name] = None
            continue
        n = int(got[f"{name}_count"])
        histograms[name] = {
            "column": col,
            "label": label,
            "edges": edges[col],
            "counts": counts.get(col, [0] * bins),
            "count": n,
            "missing": rows - n,
            "min": _as_float(got[f"{name}_min"]),
            "max": _as_float(got[f"{name}_max"]),
            "mean": (_as_float(got[f"{name}_sum"]) or 0.0) / n if n else None,
        }
    totals = {
        **_amount(rows, dur_sum),
        "rows_without_duration": rows - dur_count,
        "mean_duration_s": round(dur_sum / dur_count, 3) if dur_count else None,
        # distinct known values ("(unknown)" is not counted)
        **{f"{k}s": (len(set(hours_by[k]) - {UNKNOWN}) if hours_by[k] is not None else None)
           for k in ("language", "speaker", "source", "split")},
    }
    top = []
    if hours_by["speaker"]:
        ranked = sorted(hours_by["speaker"].items(), key=lambda kv: (-kv[1]["seconds"], kv[0]))
        for spk, a in ranked[:top_n]:
            top.append({"speaker": spk, **a,
                        "share": round(a["seconds"] / dur_sum, 6) if dur_sum else None,
                        "mean_duration_s": round(a["seconds"] / a["rows"], 3) if a["rows"]
                        else None})
    rejects = _rejects_section(got.get("rejects"))
    stages = []
    for sid in layout.order:
        m = layout.metrics(sid)
        out_rows = sum(_num_rows(p) for p in layout.outputs(sid))
        rej_rows = sum(_num_rows(p) for p in layout.rejects(sid))
        state = ("done" if layout.done(sid) else "running (this report)" if sid in
                 exclude_stages else "partial" if (out_rows or rej_rows) else "pending")
        stages.append({"stage": sid, "uses": layout.uses.get(sid) or m.get("uses"),
                       "state": state, "rows_out": out_rows, "rows_rejected": rej_rows,
                       "audio_hours_out": m.get("audio_hours_out") if state == "done"
                       else None})
    if dataset and not layout.done(dataset) and dataset not in exclude_stages:
        notes.append(f"dataset stage {dataset!r} has not finished: its committed part files "
                     "are reported")
    if dataset and rows == 0:
        notes.append(f"dataset stage {dataset!r} has no rows")
    info = layout.info
    return {
        "version": REPORT_VERSION,
        "run": {
            "run_dir": (os.fspath(run_dir).rstrip("/") if layout.store is not None
                        else str(Path(run_dir).resolve())),
            "name": info.get("name") or layout.dag.get("name"),
            "status": status,
            "attempt": info.get("attempt"),
            "started_at": info.get("started_at"),
            "ended_at": info.get("ended_at"),
            "complete": not unfinished and (status == "succeeded" or (in_dag and status ==
                                                                      "running")),
        },
        "config": {"stage": stage, "top_n": top_n, "bins": bins, "scheduler": scheduler},
        "dataset": {"stage": dataset, "stage_done": bool(dataset and layout.done(dataset)),
                    "parts": len(parts), "columns": have},
        "totals": totals,
        "hours_by": hours_by,
        "histograms": histograms,
        "top_speakers": top,
        "rejects": rejects,
        "stages": stages,
        "notes": notes,
    }


def read_dataset_part_meta() -> Any:
    return FRAME_SCHEMA.empty_table().to_pandas()


def read_rejects_part_meta() -> Any:
    return REJECT_FRAME_SCHEMA.empty_table().to_pandas()


def executor_settings(layout: RunLayout, ray_address: str | None) -> dict[str, Any]:
    """Ray address and CPUs: ``--ray-address``, else the run's DAG ``executor`` section."""
    ex = layout.dag.get("executor") if isinstance(layout.dag.get("executor"), dict) else {}
    num = ex.get("num_cpus") if isinstance(ex.get("num_cpus"), int) else None
    return {"address": ray_address or ex.get("ray_address") or None, "num_cpus": num}


def _rejects_section(df: Any) -> dict[str, Any]:
    by_stage: dict[str, Any] = {}
    rows = secs = no_dur = 0
    if df is not None:
        for (sid, reason), r in df.iterrows():
            n, s = int(r["size"]), _as_float(r["sum"]) or 0.0
            st = by_stage.setdefault(str(sid), {"rows": 0, "seconds": 0.0, "by_reason": {}})
            st["by_reason"][str(reason)] = {**_amount(n, s),
                                           "rows_without_duration": n - int(r["count"])}
            st["rows"] += n
            st["seconds"] += s
            rows += n
            secs += s
            no_dur += n - int(r["count"])
    for st in by_stage.values():
        st.update(_amount(st["rows"], st["seconds"]))
    return {**_amount(rows, secs), "rows_without_duration": no_dur, "by_stage": by_stage}


# -- entry point --------------------------------------------------------------------------------


def build_report(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                 stage: str | None = None, top_n: int = 20, bins: int = 30,
                 scheduler: str = "threads", ray_address: str | None = None,
                 exclude_stages: tuple[str, ...] = ()) -> dict[str, Any]:
    """Compute the report of ``run_dir`` and write ``report.json``, the PNGs and
    ``index.html`` into ``out_dir`` (created; files of the same names are replaced).
    Returns the report dict."""
    rep = compute_report(run_dir, stage=stage, top_n=top_n, bins=bins, scheduler=scheduler,
                         ray_address=ray_address, exclude_stages=exclude_stages)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(rep, out, top_n)
    rep["plots"] = plots
    bounded = _bounded(rep, out)
    rep["hours_by_files"] = bounded["hours_by_files"]
    (out / "report.json").write_text(json.dumps(bounded, indent=2, sort_keys=True) + "\n")
    (out / "index.html").write_text(render_html(rep, out, plots, top_n), encoding="utf-8")
    return rep




def _bounded(rep: dict[str, Any], out: Path) -> dict[str, Any]:
    """``rep`` for report.json: each ``hours_by`` table cut to its
    :data:`JSON_GROUP_LIMIT` largest groups (the rest summed as ``(other)``), the full
    table written beside it as Parquet and named in ``hours_by_files``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    hb = dict(rep.get("hours_by") or {})
    files: dict[str, str] = {}
    for key, d in (rep.get("hours_by") or {}).items():
        if not d or len(d) <= JSON_GROUP_LIMIT:
            continue
        ranked = sorted(d.items(), key=lambda kv: (-kv[1]["seconds"], kv[0]))
        keep = dict(ranked[:JSON_GROUP_LIMIT])
        rest = ranked[JSON_GROUP_LIMIT:]
        keep["(other)"] = _amount(sum(a["rows"] for _, a in rest),
                                  sum(a["seconds"] for _, a in rest))
        hb[key] = keep
        name = f"hours_by_{key}.parquet"
        pq.write_table(pa.table({key: [k for k, _ in ranked],
                                 "rows": [a["rows"] for _, a in ranked],
                                 "seconds": [a["seconds"] for _, a in ranked]}), out / name)
        files[key] = name
    return {**rep, "hours_by": hb, "hours_by_files": files}


def build_report_atomic(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                        **kwargs: Any) -> dict[str, Any]:
    """:func:`build_report` into a scratch directory renamed to ``out_dir`` when done
    (``out_dir`` is replaced): readers never see a half-written report."""
    final = Path(out_dir)
    scratch = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        rep = build_report(run_dir, scratch, **kwargs)
        shutil.rmtree(final, ignore_errors=True)
        scratch.rename(final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rep
