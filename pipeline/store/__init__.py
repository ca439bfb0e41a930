"""The run directory: atomic part files, rejects, metrics, completion markers.

One :class:`RunStore` over an fsspec filesystem serves every run directory: a local (or
mounted shared POSIX) path, or an object-store URL (``s3://bucket/prefix``, ``gs://``,
``abfs://``, ``file://``). :mod:`.layout` names its paths, :mod:`.parts` writes and reads
part files, :mod:`.lock` keeps a second run out, :mod:`.checks` refuses a run directory a
run may not use.

Resume reads which inputs a stage already consumed from its own files: the outputs'
``parent_id`` and the rejects' ``id``. A part file either exists whole or not at all, so
a run killed at any moment resumes without duplicates or losses.

Commit semantics:

- a local run directory commits every file by a rename of a synced temp file beside it;
  its paths are :class:`~pathlib.Path` objects and parquet is read by pyarrow directly;
- on an object store every object is written whole: parquet parts are written to a local
  temp file and uploaded with one PUT (multipart above the filesystem's threshold, which
  the store makes visible only when the upload completes), so a reader sees a complete
  part or none; there are no temp objects, and listings also skip dot-names and ``*.tmp``
  (what a tool copying a local run dir up may leave). Listings bypass fsspec's listing
  cache, so resume sees what other processes wrote. Media and exports are made in a
  local cache (:func:`~.layout.local_cache_dir`) and uploaded; every write of a process
  that holds the run's lease goes through its fence (:func:`~.lock.fence`);
- ``_SUCCESS`` and ``metrics.json`` are written after the stage's last part.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

from speechmill.pipeline.errors import FATAL_ERRNOS, LeaseLostError
from speechmill.pipeline.records import REJECT_SCHEMA
from speechmill.pipeline.store import parts
from speechmill.pipeline.store.checks import check_run_dir
from speechmill.pipeline.store.layout import RunLayout, is_url, local_cache_dir, url_scheme
from speechmill.pipeline.store.lock import RunLease, RunLock, fence, lease_ttl_s


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and in-filesystem path for ``url``. Credentials come from the
    environment (the filesystem's own chain: ``AWS_*``, instance roles, ...) or from
    ``storage_options``; neither is ever written to the run directory."""
    import fsspec

    opts = dict(storage_options or {})
    if url_scheme(url) in ("file", "local"):  # objects need no mkdir; local files do
        opts.setdefault("auto_mkdir", True)
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs, path.rstrip("/")


def open_store(root: str | os.PathLike[str],
               storage_options: dict[str, Any] | None = None) -> RunStore:
    """The store for ``root`` (a local path or a URL); the runner and its workers open the
    run directory with this."""
    return RunStore(root, storage_options)


class RunStore:
    """One run directory, a local path or a URL, over its fsspec filesystem.

    ``local`` tells which: a local path's files are committed by rename and its paths
    (:attr:`root`, :meth:`stage_dir`, parts, ...) are :class:`~pathlib.Path` objects; a
    URL's objects are written whole, its directories are filesystem paths (``bucket/run``)
    and its parts URLs. A run directory the store cannot write to (a mistyped URL such as
    ``s3:/bucket``, an unsupported scheme) is refused (:func:`~.checks.check_run_dir`).
    """

    def __init__(self, root: str | os.PathLike[str],
                 storage_options: dict[str, Any] | None = None) -> None:
        check_run_dir(root)
        self.storage_options = dict(storage_options or {})
        #: whether the run directory is a local path (rather than a URL)
        self.local = not is_url(root)
        self.root: Any
        self.layout: RunLayout[Any]
        if self.local:
            self.root = Path(root)
            self.url = str(self.root)
            self.base = self.url
            self._fs: Any = None
            self._protocol = ""
            self.layout = RunLayout(self.root)
        else:
            self.url = os.fspath(root).rstrip("/")
            self.root = self.url
            self._fs, self.base = open_fs(self.url, self.storage_options)
            self._protocol = self.url.split("://", 1)[0] if "://" in self.url else ""
            self.layout = RunLayout(self.base)

    @property
    def fs(self) -> Any:
        """The run directory's fsspec filesystem (``LocalFileSystem`` for a local path)."""
        if self._fs is None:
            from fsspec.implementations.local import LocalFileSystem

            self._fs = LocalFileSystem(auto_mkdir=True)
        return self._fs

    # -- layout ----------------------------------------------------------------------------
    def stage_dir(self, stage_id: str) -> Any:
        return self.layout.stage_dir(stage_id)

    def rejects_dir(self, stage_id: str) -> Any:
        return self.layout.rejects_dir(stage_id)

    def media_dir(self, stage_id: str) -> Any:
        return self.layout.media_dir(stage_id)

    def sink_dir(self, output_root: str, stage_id: str) -> Any:
        return self.layout.export_dir(output_root, stage_id)

    def to_url(self, path: Any) -> str:
        """How a path of the run is shown and recorded (a URL on object storage)."""
        if self.local:
            return str(path)
        return f"{self._protocol}://{path}" if self._protocol else str(path)

    def fs_path(self, path: Any) -> str:
        """The in-filesystem path of a URL or path of this run."""
        return self.fs._strip_protocol(os.fspath(path)).rstrip("/")

    def scratch_dir(self) -> Path:
        """The local directory where files are made: the run directory itself, or for a
        URL a local cache for files being made before upload ($TMPDIR/speechmill/<hash>)."""
        if self.local:
            return self.root
        d = local_cache_dir(self.url)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def local_dir(self, *names: str) -> Path:
        """A local working directory of the run (spills, temp files)."""
        return self.scratch_dir().joinpath(*names)

    def local_media_dir(self, stage_id: str) -> Path:
        """Where a stage writes media for this run (for a URL: before :meth:`write_outputs`
        uploads it)."""
        return self.local_dir("media", stage_id)

    def output_parts(self, stage_id: str) -> list[Any]:
        return self._list_parts(self.layout.stage_dir(stage_id))

    def reject_parts(self, stage_id: str) -> list[Any]:
        return self._list_parts(self.layout.rejects_dir(stage_id))

    def _list_parts(self, d: Any) -> list[Any]:
        if self.local:
            return parts.local_parts(d)
        return [self.to_url(p) for p in parts.listed_parts(self.fs, d)]

    # -- the primitives: whole files -----------------------------------------------------------
    def _fence(self) -> None:
        """Raise :class:`LeaseLostError` instead of writing when this process holds the
        run's lease and lost it (another run may write here now)."""
        fence(self.url)

    def read_file(self, path: Any) -> bytes | None:
        """A file of the run, whole; None when there is none."""
        if self.local:
            p = Path(path)
            return p.read_bytes() if p.is_file() else None
        self.fs.invalidate_cache(path)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def _write_file(self, path: Any, data: bytes) -> None:
        if self.local:
            parts.atomic_write_bytes(path, data)
        else:
            self._fence()
            self.fs.pipe_file(path, data)

    def _exists(self, path: Any) -> bool:
        if self.local:
            return Path(path).exists()
        self.fs.invalidate_cache(path)
        return bool(self.fs.exists(path))

    def _write_parquet(self, path: Any, table: pa.Table) -> None:
        if self.local:
            parts.atomic_write_parquet(path, table)
            return
        import pyarrow.parquet as pq

        tmp = self.scratch_dir() / f".{uuid.uuid4().hex}.parquet.tmp"
        try:
            pq.write_table(table, tmp, compression="zstd")
            self._fence()
            self.fs.put_file(str(tmp), path)
        finally:
            tmp.unlink(missing_ok=True)

    def _read_table(self, path: Any) -> pa.Table | None:
        if not self._exists(path):
            return None
        return parts.read_part(path, None, None if self.local else self.fs)

    def put_file(self, local: str | os.PathLike[str], fs_path: str) -> str:
        """Upload a finished local file as one object; returns its URL."""
        self._fence()
        self.fs.put_file(os.fspath(local), fs_path)
        return self.to_url(fs_path)

    def put_dir(self, local: str | os.PathLike[str], fs_path: str) -> str:
        """Upload a finished local directory (an export, media) file by file; files
        written last locally (``_SUCCESS``, ``metrics.json``) are uploaded last."""
        root = Path(local)
        files = sorted((p for p in root.rglob("*") if p.is_file()),
                       key=lambda p: (p.name in ("_SUCCESS", "metrics.json"), str(p)))
        for p in files:
            self._fence()
            self.fs.put_file(str(p), f"{fs_path}/{p.relative_to(root).as_posix()}")
        return self.to_url(fs_path)

    # -- writing -----------------------------------------------------------------------------
    def write_outputs(self, stage_id: str, name: str, table: pa.Table) -> Any:
        """Commit a batch's output part; returns its path (a URL on object storage, after
        the media its rows name went up)."""
        path = self.layout.output_part(stage_id, name)
        if self.local:
            self._write_parquet(path, table)
            return path
        self._write_parquet(path, self._upload_media(table))
        return self.to_url(path)

    def write_rejects(self, stage_id: str, name: str, table: pa.Table) -> Any:
        path = self.layout.reject_part(stage_id, name)
        self._write_parquet(path, table)
        return path if self.local else self.to_url(path)

    def _upload_media(self, table: pa.Table) -> pa.Table:
        """Upload the local media files a batch's rows name (under :meth:`local_media_dir`)
        to ``RUN_DIR/media/...`` and put their URLs in the rows; the local copies go.
        Called before the part is written, so a committed part never names a missing
        object (a kill in between leaves orphan objects that the rerun overwrites)."""
        prefix = str(self.scratch_dir() / "media") + os.sep
        for i in range(table.num_columns):
            col = table.column(i)
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                continue
            vals = col.to_pylist()
            if not any(isinstance(v, str) and v.startswith(prefix) for v in vals):
                continue
            out = []
            for v in vals:
                if isinstance(v, str) and v.startswith(prefix):
                    rel = Path(v[len(prefix):]).as_posix()
                    url = self.put_file(v, self.layout.at("media", rel))
                    Path(v).unlink(missing_ok=True)
                    out.append(url)
                else:
                    out.append(v)
            table = table.set_column(i, table.field(i), pa.array(out, col.type))
        return table

    def clear_scratch(self, stage_id: str) -> None:
        """Remove a stage's temp files (``tmp/<id>``, and the ``.*.tmp`` leftovers of a kill
        in a local run directory; an object store has no temp objects)."""
        import shutil

        shutil.rmtree(self.local_dir("tmp", stage_id), ignore_errors=True)
        if self.local:
            for d in (self.stage_dir(stage_id), self.media_dir(stage_id)):
                if d.is_dir():
                    for p in d.rglob(".*.tmp"):
                        p.unlink(missing_ok=True)

    # -- what the runner does with files ---------------------------------------------------
    def make_stage_dir(self, stage_id: str) -> None:
        if self.local:  # prefixes need no creating
            self.stage_dir(stage_id).mkdir(parents=True, exist_ok=True)

    def has_stage_dir(self, stage_id: str) -> bool:
        return self._exists(self.stage_dir(stage_id))

    def stage_ids(self) -> list[str]:
        """The stages that have a directory (when ``dag.yaml`` is missing)."""
        d = self.layout.stages
        if self.local:
            return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        self.fs.invalidate_cache(d)
        try:
            names = self.fs.ls(d, detail=False)
        except FileNotFoundError:
            return []
        return sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in names)

    def remove_tree(self, path: str | os.PathLike[str]) -> None:
        """Delete a directory of the run (a stage's, its media, an export)."""
        if self.local:
            import shutil

            shutil.rmtree(path, ignore_errors=True)
            return
        p = self.fs_path(path)
        if not p.startswith(self.base + "/"):
            raise ValueError(f"{path!r} is outside the run directory {self.url!r}")
        self._fence()
        self.fs.invalidate_cache(p)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(p, recursive=True)
        self.fs.invalidate_cache(p)

    def exists(self) -> bool:
        if self.local:
            return self.root.is_dir()
        self.fs.invalidate_cache(self.base)
        return self.read_run() is not None or self._exists(self.layout.stages)

    def write_root_file(self, name: str, data: bytes) -> None:
        self._write_file(self.layout.at(name), data)

    def read_root_file(self, name: str) -> bytes | None:
        return self.read_file(self.layout.at(name))

    def read_plan(self, stage_id: str) -> pa.Table | None:
        return self._read_table(self.layout.plan(stage_id))

    def write_plan(self, stage_id: str, table: pa.Table) -> None:
        self._write_parquet(self.layout.plan(stage_id), table)

    def write_stage_table(self, stage_id: str, name: str, table: pa.Table) -> None:
        """A stage's own side table (``stages/<id>/<name>``), written whole."""
        self._write_parquet(self.layout.stage_file(stage_id, name), table)

    def read_stage_table(self, stage_id: str, name: str) -> pa.Table | None:
        """A side table written by :meth:`write_stage_table`; None when there is none."""
        return self._read_table(self.layout.stage_file(stage_id, name))

    def remove_part(self, part: Any) -> None:
        if self.local:
            Path(part).unlink(missing_ok=True)
            return
        self._fence()
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.fs_path(part))

    def replace_part(self, part: Any, table: pa.Table) -> None:
        """Rewrite a committed part whole (dedup, retried rejects)."""
        self._write_parquet(Path(part) if self.local else self.fs_path(part), table)

    def export_scratch(self, final: Any) -> Path:
        """Where a sink exports before :meth:`publish_export` puts it at ``final``."""
        if self.local:
            return Path(final).parent / f".{Path(final).name}.partial"
        leaf = self.fs_path(final).rsplit("/", 1)[-1]
        return self.scratch_dir() / "exports" / f".{leaf}.partial"

    def publish_export(self, scratch: Path, final: Any) -> str:
        """Put a finished export in place: a rename in a local run directory (nothing
        half-written is ever where users look), else the export at ``final`` replaced file
        by file (an export is complete once the stage's ``_SUCCESS`` exists, written
        after); returns where it is."""
        import shutil

        if self.local:
            shutil.rmtree(final, ignore_errors=True)
            scratch.rename(final)
            return str(final)
        self.remove_tree(final)
        url = self.put_dir(scratch, self.fs_path(final))
        shutil.rmtree(scratch, ignore_errors=True)
        return url

    # -- reading ---------------------------------------------------------------------------
    def _parts_fs(self) -> Any:
        return None if self.local else self.fs

    def read_outputs(self, stage_id: str, columns: list[str] | None = None) -> pa.Table:
        return parts.read_parts(self.output_parts(stage_id), columns, self._parts_fs())

    def read_rejects(self, stage_id: str, columns: list[str] | None = None) -> pa.Table:
        t = parts.read_parts(self.reject_parts(stage_id), columns, self._parts_fs())
        if t.num_columns == 0:
            e = REJECT_SCHEMA.empty_table()
            return e if columns is None else e.select(columns)
        return t

    def read_outputs_part(self, path: Any, columns: list[str] | None) -> pa.Table:
        return parts.read_parts([path], columns, self._parts_fs())

    def consumed_ids(self, stage_id: str) -> set[str]:
        return {x for x in self.consumed_id_array(stage_id).to_pylist() if x is not None}

    def consumed_id_array(self, stage_id: str) -> pa.ChunkedArray:
        """:meth:`consumed_ids` as one Arrow string column (compact: no Python object
        per id); may hold repeats."""
        fs = self._parts_fs()
        cols = parts.id_column(self.output_parts(stage_id), "parent_id", fs) + \
            parts.id_column(self.reject_parts(stage_id), "id", fs)
        return pa.chunked_array(cols, pa.string())

    def count_rows(self, stage_id: str) -> tuple[int, int]:
        fs = self._parts_fs()
        return (parts.count_rows(self.output_parts(stage_id), fs),
                parts.count_rows(self.reject_parts(stage_id), fs))

    # -- markers and metrics -----------------------------------------------------------------
    def is_done(self, stage_id: str) -> bool:
        if self.local:
            return self.layout.success(stage_id).exists()
        return self.read_file(self.layout.success(stage_id)) is not None

    def mark_done(self, stage_id: str) -> None:
        self._write_file(self.layout.success(stage_id), b"")

    def read_fingerprint(self, stage_id: str) -> str | None:
        b = self.read_file(self.layout.fingerprint(stage_id))
        return None if b is None else b.decode().strip()

    def write_fingerprint(self, stage_id: str, fp: str) -> None:
        self._write_file(self.layout.fingerprint(stage_id), fp.encode())

    def read_metrics(self, stage_id: str) -> dict[str, Any] | None:
        b = self.read_file(self.layout.metrics(stage_id))
        return None if b is None else json.loads(b)

    def write_metrics(self, stage_id: str, metrics: dict[str, Any]) -> None:
        self._write_file(self.layout.metrics(stage_id),
                         (json.dumps(metrics, indent=2) + "\n").encode())

    def add_wall_seconds(self, stage_id: str, seconds: float) -> float:
        """Accumulate wall time across attempts (a resumed stage adds to it)."""
        p = self.layout.wall_seconds(stage_id)
        b = self.read_file(p)
        total = (float(b) if b else 0.0) + seconds
        self._write_file(p, f"{total:.3f}".encode())
        return total

    def read_run(self) -> dict[str, Any] | None:
        b = self.read_file(self.layout.run_json)
        return None if b is None else json.loads(b)

    def write_run(self, info: dict[str, Any]) -> None:
        """Write ``run.json``. On a full local disk its own blocks take the final state
        (what a user reads to learn why the run stopped); once this run lost its lease it
        is the other run's and stays as it is (the run is stopping with the error)."""
        p = self.layout.run_json
        data = (json.dumps(info, indent=2) + "\n").encode()
        if not self.local:
            try:
                self._fence()
            except LeaseLostError:
                return
            self.fs.pipe_file(p, data)
            return
        try:
            parts.atomic_write_bytes(p, data)
        except OSError as e:
            if e.errno not in FATAL_ERRNOS or not p.exists():
                raise
            with open(p, "r+b") as f:  # no room for a temp file
                f.truncate(0)
                f.write(data)

    # -- lock --------------------------------------------------------------------------------
    def lock(self, ttl_s: float | None = None, break_lease: bool = False) -> RunLock | RunLease:
        """The run's lock; entering it claims the directory: it must be new, empty or a
        speechmill run directory (a :class:`ConfigError` naming ``run_dir`` otherwise, or
        when the store cannot be reached, before anything is written), and gets the
        marker. A local directory gets an ``flock`` (:class:`~.lock.RunLock`, which dies
        with its holder); a URL a lease (:class:`~.lock.RunLease`) that lasts ``ttl_s``
        (None: :func:`~.lock.lease_ttl_s`) unless renewed, and ``break_lease`` takes over
        another host's live lease."""
        if self.local:
            return RunLock(self.layout.lock, claim=True)
        return RunLease(self, ttl_s=lease_ttl_s() if ttl_s is None else ttl_s,
                        break_lease=break_lease, claim=True)

