"""The run directory: atomic part files, rejects, metrics, completion markers.

::

    RUN_DIR/
      dag.yaml  run.json  _SPEECHMILL_RUN     (the marker: a run only writes in a folder
                                          that is new, empty or has it / run.json)
      stages/<id>/part-*.parquet          outputs (tmp + rename)
      stages/<id>/rejects/part-*.parquet
      stages/<id>/metrics.json  _SUCCESS  _fingerprint
      media/<id>/...                      audio written by the stage

Resume reads which inputs a stage already consumed from its own files: the outputs'
``parent_id`` and the rejects' ``id``. A part file either exists whole or not at all, so
a run killed at any moment resumes without duplicates or losses.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from speechmill.pipeline.errors import FATAL_ERRNOS, ConfigError, LeaseLostError, RunLockedError
from speechmill.pipeline.records import REJECT_SCHEMA, concat

# s3://..., gs://..., abfs://..., file://... and fsspec chains (simplecache::s3://...)
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*(://|::)")


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a location by URL (``s3://bucket/run``) rather than a local path."""
    return bool(_URL_RE.match(os.fspath(path)))


def url_scheme(url: str | os.PathLike[str]) -> str:
    """The first protocol of a URL (``s3`` for ``s3://b/p``, ``simplecache`` for a chain)."""
    return re.split(r"://|::", os.fspath(url), maxsplit=1)[0].lower()


#: URL schemes a run directory may use: the object stores the project supports (s3fs is in
#: uv.lock; gcsfs / adlfs when installed) and fsspec's local filesystem. Everything else
#: fsspec knows (http://, ftp://, zip://, memory://, ...) is read-only, archive-backed,
#: in-process or otherwise no place for a run directory, and is refused up front.
RUN_DIR_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "file",
                             "local"})
#: a local path starting ``s3:`` (one slash, none) is a mistyped URL, not a folder name
_MISTYPED_URL_RE = re.compile(
    r"^(s3a?|gs|gcs|abfss?|az|adl|https?|s?ftp|ssh|hdfs|webhdfs|file|memory|zip|hf):(?!//)",
    re.I)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
#: written into a run directory when a run first claims it (before anything else)
RUN_MARKER = "_SPEECHMILL_RUN"
_HOW = "pick a new or empty directory (e.g. run_dir: runs/NAME or --run-dir runs/NAME)"


def check_run_dir(run_dir: str | os.PathLike[str]) -> None:
    """Refuse a run directory the store cannot write to, before anything runs.

    Local (or mounted shared POSIX) paths, and URLs of the object stores speechmill
    supports whose fsspec package is installed (``s3://`` with s3fs, ``gs://`` with
    gcsfs, ``abfs://`` with adlfs, ``file://``). Refused with a one-line
    :class:`ConfigError` naming ``run_dir``: an empty path (an unset ``${VAR:-}``), one
    with control characters, a mistyped URL (``s3:/bucket``), any other scheme
    (``http://``, ``ftp://``, ``zip://``, unknown ones), a filesystem whose package is
    missing and fsspec chains (``simplecache::s3://...``: a cache in front of writes would
    lose them), never taken as a relative local path (which used to create a directory
    named ``s3:`` under the working directory and leave the data on the local disk).
    Whether an existing directory may be used is checked when a run claims it
    (:func:`check_run_dir_contents`).
    """
    url = os.fspath(run_dir)
    if not isinstance(url, str):
        raise ConfigError(f"{url!r} is not a path", key="run_dir")
    if not url.strip():
        raise ConfigError(
            "is empty (an unset ${VAR:-}?); a run directory must be named: " + _HOW,
            key="run_dir")
    if _CONTROL_RE.search(url):
        raise ConfigError(f"{url!r} has a control character; " + _HOW, key="run_dir")
    if not is_url(url):
        m = _MISTYPED_URL_RE.match(url)
        if m:
            raise ConfigError(
                f"{url!r} looks like a mistyped URL (did you mean {m.group(1)}://...?); "
                "a local folder may not be named like a URL scheme", key="run_dir")
        return
    scheme = url_scheme(url)
    if "::" in url:
        raise ConfigError(
            f"{url!r} is an fsspec chain; a run directory must be a plain filesystem URL "
            "(s3://bucket/prefix, gs://..., abfs://...): local caching of media is built in",
            key="run_dir")
    import fsspec
    from fsspec.registry import known_implementations

    if scheme not in known_implementations:
        raise ConfigError(
            f"{url!r}: unknown filesystem {scheme}://; a run directory is a local path or an "
            "object-store URL (s3://, gs://, abfs://, file://)",
            key="run_dir")
    if scheme not in RUN_DIR_SCHEMES:
        raise ConfigError(
            f"{url!r}: a run directory cannot live on {scheme}:// (not an object store or "
            "local filesystem speechmill writes to); use a local path or s3://, gs://, "
            "abfs://, file://", key="run_dir")
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as e:
        raise ConfigError(
            f"{url!r}: the {scheme}:// filesystem is not installed "
            f"({known_implementations[scheme].get('err') or e})", key="run_dir") from None
    rest = url.split("://", 1)[1]
    if scheme not in ("file", "local") and not rest.strip("/"):
        raise ConfigError(f"{url!r} names no bucket", key="run_dir")


def _json_object(data: bytes | None) -> dict[str, Any] | None:
    try:
        obj = json.loads(data) if data else None
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def is_run_dir_listing(names: list[str], read: Any) -> bool:
    """Whether a folder holding ``names`` (its entries, bare names) is a speechmill run
    directory, or empty: it holds the marker :data:`RUN_MARKER` (written when a run
    first claims a directory), or ``run.json`` as speechmill writes it (``status`` and
    ``attempt``: every version wrote them, so run directories of older versions resume),
    or nothing but a lock a killed run left (``run.lock`` naming a pid and host).
    ``read(name)`` gives a file's bytes (None when it cannot be read)."""
    have = set(names)
    if not have or RUN_MARKER in have:
        return True
    if "run.json" in have:
        info = _json_object(read("run.json"))
        if info is not None and "status" in info and "attempt" in info:
            return True
    if "run.lock" in have:
        lock = _json_object(read("run.lock"))
        if lock is not None and "pid" in lock and "host" in lock:
            return True
    return False


def _not_a_run_dir(where: str, names: list[str]) -> ConfigError:
    shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
    return ConfigError(
        f"{where!r} is not empty and is not a speechmill run directory (it holds {shown}; "
        f"no {RUN_MARKER} or run.json of an earlier run); a run never writes into a "
        "folder of other files: " + _HOW, key="run_dir")


def check_run_dir_contents(root: str | os.PathLike[str]) -> None:
    """Before a run writes anything into a local run directory: it must not exist yet,
    be empty or be a speechmill run directory (:func:`is_run_dir_listing`). A folder of
    other files (``run_dir: .`` beside the DAG file) is refused with a
    :class:`ConfigError` naming ``run_dir``: the run would write ``dag.yaml`` over the
    user's DAG file."""
    p = Path(root)
    if not p.exists():
        if p.is_symlink():
            raise ConfigError(f"{str(p)!r} is a dangling symlink; " + _HOW, key="run_dir")
        return
    if not p.is_dir():
        raise ConfigError(f"{str(p)!r} is a file, not a directory; " + _HOW, key="run_dir")
    try:
        names = os.listdir(p)
    except OSError as e:
        raise ConfigError(f"cannot read {str(p)!r}: {e.strerror}", key="run_dir") from None

    def read(name: str) -> bytes | None:
        try:
            with open(p / name, "rb") as f:
                return f.read(1 << 20)
        except OSError:
            return None

    if not is_run_dir_listing(names, read):
        raise _not_a_run_dir(str(p), names)


def _write_marker(path: Any, put: Any) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("speechmill")
    except PackageNotFoundError:
        v = None
    put(path, (json.dumps({"speechmill_run_dir": 1, "created_at": time.time(),
                           "speechmill_version": v}) + "\n").encode())


def local_cache_dir(url: str) -> Path:
    """The local directory where files for the run at ``url`` are made before upload
    (``$TMPDIR/speechmill/<hash of the URL>``): media a stage writes, exports, spills.
    The same on every process of a node, so a worker's stage and its store agree."""
    import hashlib
    import tempfile

    h = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "speechmill" / h


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temp file
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _parts(d: Path) -> list[Path]:
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("part-*.parquet") if p.is_file())


class RunStore:
    """One run directory (a local or shared POSIX path). ``RunStore(url)`` gives an
    :class:`ObjectRunStore` (as :func:`open_store` does), never a local path named
    ``s3:``."""

    def __new__(cls, root: Any = None, *args: Any, **kwargs: Any) -> RunStore:
        if cls is RunStore and root is not None and is_url(root):
            check_run_dir(root)
            return super().__new__(ObjectRunStore)
        return super().__new__(cls)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        check_run_dir(root)
        self.root = Path(root)

    # -- layout ----------------------------------------------------------------------
    def stage_dir(self, stage_id: str) -> Path:
        return self.root / "stages" / stage_id

    def rejects_dir(self, stage_id: str) -> Path:
        return self.stage_dir(stage_id) / "rejects"

    def media_dir(self, stage_id: str) -> Path:
        return self.root / "media" / stage_id

    def output_parts(self, stage_id: str) -> list[Path]:
        return _parts(self.stage_dir(stage_id))

    def reject_parts(self, stage_id: str) -> list[Path]:
        return _parts(self.rejects_dir(stage_id))

    # -- writing -----------------------------------------------------------------------
    def write_outputs(self, stage_id: str, name: str, table: pa.Table) -> Path:
        path = self.stage_dir(stage_id) / f"part-{name}.parquet"
        atomic_write_parquet(path, table)
        return path

    def write_rejects(self, stage_id: str, name: str, table: pa.Table) -> Path:
        path = self.rejects_dir(stage_id) / f"part-{name}.parquet"
        atomic_write_parquet(path, table)
        return path

    def clear_scratch(self, stage_id: str) -> None:
        """Remove a stage's temp files (``tmp/<id>`` and ``.*.tmp`` leftovers of a kill)."""
        import shutil

        shutil.rmtree(self.root / "tmp" / stage_id, ignore_errors=True)
        for d in (self.stage_dir(stage_id), self.media_dir(stage_id)):
            if d.is_dir():
                for p in d.rglob(".*.tmp"):
                    p.unlink(missing_ok=True)

    # -- what the runner does with files (:class:`ObjectRunStore` does it on objects) ------
    def make_stage_dir(self, stage_id: str) -> None:
        self.stage_dir(stage_id).mkdir(parents=True, exist_ok=True)

    def has_stage_dir(self, stage_id: str) -> bool:
        return self.stage_dir(stage_id).exists()

    def stage_ids(self) -> list[str]:
        """The stages that have a directory (when ``dag.yaml`` is missing)."""
        d = self.root / "stages"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def remove_tree(self, path: str | os.PathLike[str]) -> None:
        """Delete a directory of the run (a stage's, its media, an export)."""
        import shutil

        shutil.rmtree(path, ignore_errors=True)

    def exists(self) -> bool:
        return self.root.is_dir()

    def write_root_file(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.root / name, data)

    def read_root_file(self, name: str) -> bytes | None:
        p = self.root / name
        return p.read_bytes() if p.is_file() else None

    def read_plan(self, stage_id: str) -> pa.Table | None:
        p = self.stage_dir(stage_id) / "_plan.parquet"
        return pq.read_table(p) if p.exists() else None

    def write_plan(self, stage_id: str, table: pa.Table) -> None:
        atomic_write_parquet(self.stage_dir(stage_id) / "_plan.parquet", table)

    def write_stage_table(self, stage_id: str, name: str, table: pa.Table) -> None:
        """A stage's own side table (``stages/<id>/<name>``), written whole."""
        atomic_write_parquet(self.stage_dir(stage_id) / name, table)

    def read_stage_table(self, stage_id: str, name: str) -> pa.Table | None:
        """A side table written by :meth:`write_stage_table`; None when there is none."""
        p = self.stage_dir(stage_id) / name
        return pq.read_table(p) if p.exists() else None

    def remove_part(self, part: Any) -> None:
        Path(part).unlink(missing_ok=True)

    def replace_part(self, part: Any, table: pa.Table) -> None:
        """Rewrite a committed part whole (dedup, retried rejects)."""
        atomic_write_parquet(Path(part), table)

    def sink_dir(self, output_root: str, stage_id: str) -> Any:
        return self.root / output_root / stage_id

    def to_url(self, path: Any) -> str:
        """How a path of the run is shown and recorded (a URL on object storage)."""
        return str(path)

    def local_dir(self, *parts: str) -> Path:
        """A local working directory of the run (spills, temp files)."""
        return self.root.joinpath(*parts)

    def export_scratch(self, final: Any) -> Path:
        """Where a sink exports before :meth:`publish_export` puts it at ``final``."""
        return Path(final).parent / f".{Path(final).name}.partial"

    def publish_export(self, scratch: Path, final: Any) -> str:
        """Put a finished export in place: a rename here (nothing half-written is ever
        where users look); returns where it is."""
        import shutil

        shutil.rmtree(final, ignore_errors=True)
        scratch.rename(final)
        return str(final)

    # -- reading -----------------------------------------------------------------------
    def read_outputs(self, stage_id: str, columns: list[str] | None = None) -> pa.Table:
        return _read_parts(self.output_parts(stage_id), columns)

    def read_rejects(self, stage_id: str, columns: list[str] | None = None) -> pa.Table:
        t = _read_parts(self.reject_parts(stage_id), columns)
        if t.num_columns == 0:
            return REJECT_SCHEMA.empty_table() if columns is None else REJECT_SCHEMA.empty_table().select(columns)
        return t

    def read_outputs_part(self, path: Path, columns: list[str] | None) -> pa.Table:
        return _read_parts([path], columns)

    def consumed_ids(self, stage_id: str) -> set[str]:
        return {x for x in self.consumed_id_array(stage_id).to_pylist() if x is not None}

    def consumed_id_array(self, stage_id: str) -> pa.ChunkedArray:
        """:meth:`consumed_ids` as one Arrow string column (compact: no Python object
        per id); may hold repeats."""
        cols = []
        for parts, name in ((self.output_parts(stage_id), "parent_id"),
                            (self.reject_parts(stage_id), "id")):
            for p in parts:
                if name not in pq.read_schema(p).names:
                    continue
                col = pq.read_table(p, columns=[name]).column(name)
                cols.extend(as_string(col).chunks)
        return pa.chunked_array(cols, pa.string())

    def count_rows(self, stage_id: str) -> tuple[int, int]:
        outs = sum(pq.ParquetFile(p).metadata.num_rows for p in self.output_parts(stage_id))
        rej = sum(pq.ParquetFile(p).metadata.num_rows for p in self.reject_parts(stage_id))
        return outs, rej

    # -- markers and metrics -----------------------------------------------------------
    def is_done(self, stage_id: str) -> bool:
        return (self.stage_dir(stage_id) / "_SUCCESS").exists()

    def mark_done(self, stage_id: str) -> None:
        atomic_write_bytes(self.stage_dir(stage_id) / "_SUCCESS", b"")

    def read_fingerprint(self, stage_id: str) -> str | None:
        p = self.stage_dir(stage_id) / "_fingerprint"
        return p.read_text().strip() if p.exists() else None

    def write_fingerprint(self, stage_id: str, fp: str) -> None:
        atomic_write_bytes(self.stage_dir(stage_id) / "_fingerprint", fp.encode())

    def read_metrics(self, stage_id: str) -> dict[str, Any] | None:
        p = self.stage_dir(stage_id) / "metrics.json"
        return json.loads(p.read_text()) if p.exists() else None

    def write_metrics(self, stage_id: str, metrics: dict[str, Any]) -> None:
        atomic_write_json(self.stage_dir(stage_id) / "metrics.json", metrics)

    def add_wall_seconds(self, stage_id: str, seconds: float) -> float:
        """Accumulate wall time across attempts (a resumed stage adds to it)."""
        p = self.stage_dir(stage_id) / "_wall_seconds"
        prev = float(p.read_text()) if p.exists() else 0.0
        total = prev + seconds
        atomic_write_bytes(p, f"{total:.3f}".encode())
        return total

    def read_run(self) -> dict[str, Any] | None:
        p = self.root / "run.json"
        return json.loads(p.read_text()) if p.exists() else None

    def write_run(self, info: dict[str, Any]) -> None:
        p = self.root / "run.json"
        data = (json.dumps(info, indent=2) + "\n").encode()
        try:
            atomic_write_bytes(p, data)
        except OSError as e:
            if e.errno not in FATAL_ERRNOS or not p.exists():
                raise
            # a full disk: no room for a temp file, but run.json's own blocks can take
            # the final state (what a user reads to learn why the run stopped)
            with open(p, "r+b") as f:
                f.truncate(0)
                f.write(data)

    # -- lock ----------------------------------------------------------------------------
    def lock(self, break_lease: bool = False) -> RunLock:
        """The run's lock; entering it claims the directory: it must be new, empty or a
        speechmill run directory (:func:`check_run_dir_contents`, a :class:`ConfigError`
        otherwise, before anything is written), and gets the marker :data:`RUN_MARKER`.
        ``break_lease`` is for object stores (a local lock dies with its holder)."""
        return RunLock(self.root / "run.lock", claim=True)


class RunLock:
    """Refuses a second live run on the same directory.

    The lock is an ``flock`` on ``run.lock`` (NFS clients emulate it with the server's
    byte-range locks), which the kernel drops when the holder dies, so a crashed run never blocks the
    next one and two runs racing for a stale lock cannot both win. The file names the
    holder (pid, host) for the error message. Where the filesystem has no locks
    (``ENOLCK``), it falls back to creating the file exclusively and taking it over when
    its pid is dead on this host.
    """

    def __init__(self, path: Path, claim: bool = False) -> None:
        self.path = path
        self.fd: int | None = None
        #: check that the folder may be a run directory before locking, then mark it
        self.claim = claim

    def _claimed(self) -> RunLock:
        """Locked: mark the folder as a run directory (first run only)."""
        if self.claim and not (self.path.parent / RUN_MARKER).exists():
            try:
                _write_marker(self.path.parent / RUN_MARKER, atomic_write_bytes)
            except BaseException:
                self.__exit__()
                raise
        return self

    def _me(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.time()}).encode()

    def _held_by(self) -> RunLockedError:
        try:
            other = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            other = {}
        return RunLockedError(f"run directory {str(self.path.parent)!r} is in use by pid "
                              f"{other.get('pid')} on {other.get('host')}")

    def __enter__(self) -> RunLock:
        import errno
        import fcntl

        if self.claim:
            check_run_dir_contents(self.path.parent)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno == errno.ENOLCK:
                    return self._enter_exclusive()
                raise self._held_by() from None
            try:  # the holder before us may have unlinked the file: lock the live one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, self._me())
            self.fd = fd
            return self._claimed()
        raise RunLockedError(f"could not lock {str(self.path)!r}")

    def _enter_exclusive(self) -> RunLock:
        me = json.loads(self._me())
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text() or "{}")
                except (OSError, json.JSONDecodeError):
                    other = {}
                same_host = other.get("host") == me["host"]
                if not same_host or _alive(int(other.get("pid", -1))):
                    raise RunLockedError(
                        f"run directory {str(self.path.parent)!r} is in use by pid "
                        f"{other.get('pid')} on {other.get('host')}"
                        + ("" if same_host else
                           f" (cannot check another host; delete {str(self.path)!r} if "
                           "that run is gone)")
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: the process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self._claimed()
        raise RunLockedError(f"could not lock {str(self.path)!r}")

    def __exit__(self, *exc: object) -> None:
        # unlink while still holding the lock; a waiter that opened the old file sees
        # that it is gone (inode check) and retries on a new one
        self.path.unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


def read_unit(unit: Path | str | pa.Table, keep: Any = None,
              columns: list[str] | None = None) -> pa.Table:
    """One unit of a stage's input (an upstream part file, or a source's plan table):
    only ``columns`` it has (None: all), only the rows ``keep`` (a bool mask) marks.
    A part named by URL (``s3://...``) is read with ranged reads through fsspec
    (credentials from the environment)."""
    if isinstance(unit, str) and is_url(unit):
        import fsspec

        with fsspec.open(unit, "rb").open() as f:
            pf = pq.ParquetFile(f)
            t = pf.read(columns=None if columns is None else
                        [c for c in columns if c in pf.schema_arrow.names])
    elif isinstance(unit, pa.Table):
        t = unit if columns is None else unit.select(
            [c for c in columns if c in unit.column_names])
    elif columns is None:
        t = pq.read_table(unit)
    else:
        have = set(pq.read_schema(unit).names)
        t = pq.read_table(unit, columns=[c for c in columns if c in have])
    if keep is not None and not keep.all():
        t = t.filter(pa.array(keep))
    return t


def as_string(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    """An id column as ``string`` chunks (ids may come as dictionary, large or null)."""
    if isinstance(col, pa.Array):
        col = pa.chunked_array([col])
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col if col.type == pa.string() else col.cast(pa.string())


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_parts(parts: list[Path], columns: list[str] | None) -> pa.Table:
    tables = []
    for p in parts:
        if columns is None:
            tables.append(pq.read_table(p))
        else:
            have = set(pq.read_schema(p).names)
            tables.append(pq.read_table(p, columns=[c for c in columns if c in have]))
    return concat(tables)


# -- run directories on object storage (s3://, gs://, abfs://) -------------------------
#
# ``open_store`` gives the runner and every worker an ObjectRunStore for a URL run dir:
# parts, rejects, markers, metrics, media, exports and the lock with commit semantics that
# hold on object stores (tested against an S3 server in tests/pipeline/).

LOCK_TTL_S = 120.0  # a lease not renewed for this long may be taken over


def lease_ttl_s() -> float:
    """The run lease's TTL: ``SPEECHMILL_LEASE_TTL_S`` (seconds), else :data:`LOCK_TTL_S`.
    A rerun after a crash waits up to this long for the dead run's lease to expire."""
    v = os.environ.get("SPEECHMILL_LEASE_TTL_S", "").strip()
    try:
        return max(3.0, float(v)) if v else LOCK_TTL_S
    except ValueError:
        raise ConfigError(f"SPEECHMILL_LEASE_TTL_S={v!r} is not a number of seconds"
                          ) from None


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


def _is_precondition_failed(e: BaseException) -> bool:
    # s3fs: FileExistsError for If-None-Match, OSError "...pre-conditions..." for If-Match
    return isinstance(e, FileExistsError) or "pre-condition" in str(e).lower() \
        or "PreconditionFailed" in str(e)


def open_store(root: str | os.PathLike[str],
               storage_options: dict[str, Any] | None = None) -> RunStore:
    """The store for ``root``: a local :class:`RunStore`, or an :class:`ObjectRunStore` for a
    URL (the runner and its workers open the run directory with this)."""
    if is_url(root):
        return ObjectRunStore(os.fspath(root), storage_options)
    return RunStore(root)


class ObjectRunStore(RunStore):
    """A run directory under an fsspec URL (``s3://bucket/prefix``).

    Commit semantics (what makes resume correct without rename):

    - every object is written whole: parquet parts are written to a local temp file and
      uploaded with one PUT (multipart above the filesystem's threshold, which the store
      makes visible only when the upload completes), so a reader sees a complete part or
      none; there are no temp objects, and listings also skip dot-names and ``*.tmp``
      (what a tool copying a local run dir up may leave);
    - ``_SUCCESS`` and ``metrics.json`` are written after the stage's last part;
    - listings bypass fsspec's listing cache, so resume sees what other processes wrote.
    """

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        if not is_url(root):
            raise ConfigError(f"{root!r} is not a URL", key="run_dir")
        check_run_dir(root)
        self.url = os.fspath(root).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.base = open_fs(self.url, self.storage_options)
        self.root = self.url  # type: ignore[assignment]
        self._protocol = self.url.split("://", 1)[0] if "://" in self.url else ""

    # -- layout (fs paths without the protocol; ``to_url`` adds it) -----------------------
    def _p(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def to_url(self, fs_path: str) -> str:
        return f"{self._protocol}://{fs_path}" if self._protocol else fs_path

    def stage_dir(self, stage_id: str) -> str:  # type: ignore[override]
        return self._p("stages", stage_id)

    def rejects_dir(self, stage_id: str) -> str:  # type: ignore[override]
        return self._p("stages", stage_id, "rejects")

    def media_dir(self, stage_id: str) -> str:  # type: ignore[override]
        return self._p("media", stage_id)

    def scratch_dir(self) -> Path:
        """A local cache for files being made before upload ($TMPDIR/speechmill/<hash>)."""
        d = local_cache_dir(self.url)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _list_parts(self, d: str) -> list[str]:
        self.fs.invalidate_cache(d)
        try:
            names = self.fs.ls(d, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            leaf = n.rstrip("/").rsplit("/", 1)[-1]
            if leaf.startswith("part-") and leaf.endswith(".parquet"):
                out.append(self.to_url(n.rstrip("/")))
        return sorted(out)

    def output_parts(self, stage_id: str) -> list[str]:  # type: ignore[override]
        return self._list_parts(self.stage_dir(stage_id))

    def reject_parts(self, stage_id: str) -> list[str]:  # type: ignore[override]
        return self._list_parts(self.rejects_dir(stage_id))

    # -- writing: whole objects ---------------------------------------------------------
    def _fence(self) -> None:
        """Raise :class:`LeaseLostError` instead of writing when this process holds the
        run's lease and lost it (another run may write here now)."""
        lease = _LEASES.get(self.url)
        if lease is not None:
            lease.check()

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

    def _put_bytes(self, fs_path: str, data: bytes) -> None:
        self._fence()
        self.fs.pipe_file(fs_path, data)

    def local_media_dir(self, stage_id: str) -> Path:
        """Where a stage writes media for this run before :meth:`write_outputs` uploads it."""
        return self.scratch_dir() / "media" / stage_id

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
                    url = self.put_file(v, self._p("media", rel))
                    Path(v).unlink(missing_ok=True)
                    out.append(url)
                else:
                    out.append(v)
            table = table.set_column(i, table.field(i), pa.array(out, col.type))
        return table

    def _put_parquet(self, fs_path: str, table: pa.Table) -> None:
        tmp = self.scratch_dir() / f".{uuid.uuid4().hex}.parquet.tmp"
        try:
            pq.write_table(table, tmp, compression="zstd")
            self._fence()
            self.fs.put_file(str(tmp), fs_path)
        finally:
            tmp.unlink(missing_ok=True)

    def write_outputs(self, stage_id: str, name: str, table: pa.Table) -> str:  # type: ignore[override]
        path = f"{self.stage_dir(stage_id)}/part-{name}.parquet"
        self._put_parquet(path, self._upload_media(table))
        return self.to_url(path)

    def write_rejects(self, stage_id: str, name: str, table: pa.Table) -> str:  # type: ignore[override]
        path = f"{self.rejects_dir(stage_id)}/part-{name}.parquet"
        self._put_parquet(path, table)
        return self.to_url(path)

    def clear_scratch(self, stage_id: str) -> None:
        """Nothing to remove in the bucket (no temp objects); the local cache is per run."""
        import shutil

        shutil.rmtree(self.scratch_dir() / "tmp" / stage_id, ignore_errors=True)

    # -- what the runner does with files, on objects ----------------------------------------
    def fs_path(self, path: Any) -> str:
        """The in-filesystem path of a URL or path of this run."""
        return self.fs._strip_protocol(os.fspath(path)).rstrip("/")

    def make_stage_dir(self, stage_id: str) -> None:
        pass  # prefixes need no creating

    def has_stage_dir(self, stage_id: str) -> bool:
        d = self.stage_dir(stage_id)
        self.fs.invalidate_cache(d)
        return bool(self.fs.exists(d))

    def stage_ids(self) -> list[str]:
        d = self._p("stages")
        self.fs.invalidate_cache(d)
        try:
            names = self.fs.ls(d, detail=False)
        except FileNotFoundError:
            return []
        return sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in names)

    def remove_tree(self, path: Any) -> None:
        p = self.fs_path(path)
        if not p.startswith(self.base + "/"):
            raise ValueError(f"{path!r} is outside the run directory {self.url!r}")
        self._fence()
        self.fs.invalidate_cache(p)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(p, recursive=True)
        self.fs.invalidate_cache(p)

    def exists(self) -> bool:
        self.fs.invalidate_cache(self.base)
        return self.read_run() is not None or bool(self.fs.exists(self._p("stages")))

    def write_root_file(self, name: str, data: bytes) -> None:
        self._put_bytes(self._p(name), data)

    def read_root_file(self, name: str) -> bytes | None:
        return self._get(self._p(name))

    def read_plan(self, stage_id: str) -> pa.Table | None:
        p = f"{self.stage_dir(stage_id)}/_plan.parquet"
        self.fs.invalidate_cache(p)
        if not self.fs.exists(p):
            return None
        return self._read([p], None)

    def write_plan(self, stage_id: str, table: pa.Table) -> None:
        self._put_parquet(f"{self.stage_dir(stage_id)}/_plan.parquet", table)

    def write_stage_table(self, stage_id: str, name: str, table: pa.Table) -> None:
        self._put_parquet(f"{self.stage_dir(stage_id)}/{name}", table)

    def read_stage_table(self, stage_id: str, name: str) -> pa.Table | None:
        p = f"{self.stage_dir(stage_id)}/{name}"
        self.fs.invalidate_cache(p)
        if not self.fs.exists(p):
            return None
        return self._read([p], None)

    def remove_part(self, part: Any) -> None:
        self._fence()
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.fs_path(part))

    def replace_part(self, part: Any, table: pa.Table) -> None:
        self._put_parquet(self.fs_path(part), table)  # one PUT replaces it whole

    def sink_dir(self, output_root: str, stage_id: str) -> str:  # type: ignore[override]
        return self._p(output_root, stage_id)

    def local_dir(self, *parts: str) -> Path:
        return self.scratch_dir().joinpath(*parts)

    def export_scratch(self, final: Any) -> Path:
        leaf = self.fs_path(final).rsplit("/", 1)[-1]
        return self.scratch_dir() / "exports" / f".{leaf}.partial"

    def publish_export(self, scratch: Path, final: Any) -> str:
        """Replace the export at ``final`` with the local ``scratch`` one, file by file
        (an export is complete once the stage's ``_SUCCESS`` exists, written after)."""
        import shutil

        self.remove_tree(final)
        url = self.put_dir(scratch, self.fs_path(final))
        shutil.rmtree(scratch, ignore_errors=True)
        return url

    # -- reading: ranged reads, never a whole copy ------------------------------------------
    def _read(self, paths: list[str], columns: list[str] | None) -> pa.Table:
        tables = []
        for p in paths:
            with self.fs.open(p, "rb") as f:
                pf = pq.ParquetFile(f)
                cols = None if columns is None else [
                    c for c in columns if c in pf.schema_arrow.names]
                tables.append(pf.read(columns=cols))
        return concat(tables)

    def read_outputs(self, stage_id: str, columns: list[str] | None = None) -> pa.Table:
        return self._read(self.output_parts(stage_id), columns)

    def read_rejects(self, stage_id: str, columns: list[str] | None = None) -> pa.Table:
        t = self._read(self.reject_parts(stage_id), columns)
        if t.num_columns == 0:
            e = REJECT_SCHEMA.empty_table()
            return e if columns is None else e.select(columns)
        return t

    def read_outputs_part(self, path: str, columns: list[str] | None) -> pa.Table:  # type: ignore[override]
        return self._read([path], columns)

    def consumed_id_array(self, stage_id: str) -> pa.ChunkedArray:
        cols = []
        for parts, name in ((self.output_parts(stage_id), "parent_id"),
                            (self.reject_parts(stage_id), "id")):
            for p in parts:
                with self.fs.open(p, "rb") as f:
                    pf = pq.ParquetFile(f)
                    if name not in pf.schema_arrow.names:
                        continue
                    cols.extend(as_string(pf.read(columns=[name]).column(name)).chunks)
        return pa.chunked_array(cols, pa.string())

    def count_rows(self, stage_id: str) -> tuple[int, int]:
        def n(paths: list[str]) -> int:
            total = 0
            for p in paths:
                with self.fs.open(p, "rb") as f:
                    total += pq.ParquetFile(f).metadata.num_rows
            return total
        return n(self.output_parts(stage_id)), n(self.reject_parts(stage_id))

    # -- markers and metrics: small whole objects ---------------------------------------------
    def _get(self, fs_path: str) -> bytes | None:
        self.fs.invalidate_cache(fs_path)
        try:
            return self.fs.cat_file(fs_path)
        except FileNotFoundError:
            return None

    def is_done(self, stage_id: str) -> bool:
        return self._get(f"{self.stage_dir(stage_id)}/_SUCCESS") is not None

    def mark_done(self, stage_id: str) -> None:
        self._put_bytes(f"{self.stage_dir(stage_id)}/_SUCCESS", b"")

    def read_fingerprint(self, stage_id: str) -> str | None:
        b = self._get(f"{self.stage_dir(stage_id)}/_fingerprint")
        return None if b is None else b.decode().strip()

    def write_fingerprint(self, stage_id: str, fp: str) -> None:
        self._put_bytes(f"{self.stage_dir(stage_id)}/_fingerprint", fp.encode())

    def read_metrics(self, stage_id: str) -> dict[str, Any] | None:
        b = self._get(f"{self.stage_dir(stage_id)}/metrics.json")
        return None if b is None else json.loads(b)

    def write_metrics(self, stage_id: str, metrics: dict[str, Any]) -> None:
        self._put_bytes(f"{self.stage_dir(stage_id)}/metrics.json",
                        (json.dumps(metrics, indent=2) + "\n").encode())

    def add_wall_seconds(self, stage_id: str, seconds: float) -> float:
        p = f"{self.stage_dir(stage_id)}/_wall_seconds"
        b = self._get(p)
        total = (float(b) if b else 0.0) + seconds
        self._put_bytes(p, f"{total:.3f}".encode())
        return total

    def read_run(self) -> dict[str, Any] | None:
        b = self._get(self._p("run.json"))
        return None if b is None else json.loads(b)

    def write_run(self, info: dict[str, Any]) -> None:
        try:
            self._fence()
        except LeaseLostError:
            return  # run.json is the other run's now (the run is stopping with the error)
        self._put_bytes(self._p("run.json"), (json.dumps(info, indent=2) + "\n").encode())

    def lock(self, ttl_s: float | None = None,  # type: ignore[override]
             break_lease: bool = False) -> ObjectRunLock:
        """The run's lease (see :class:`ObjectRunLock`); entering it claims the prefix
        like :meth:`RunStore.lock` (a :class:`ConfigError` naming ``run_dir`` when it holds
        other objects, or the store cannot be reached)."""
        return ObjectRunLock(self, ttl_s=lease_ttl_s() if ttl_s is None else ttl_s,
                             break_lease=break_lease, claim=True)


class ObjectRunLock:
    """A lease object ``RUN_DIR/run.lock`` (owner, host, pid, expiry) for object stores.

    Created with a conditional PUT (S3 ``If-None-Match: *``): of two runs starting on the
    same prefix exactly one creates it, the other is refused. The holder renews it every
    ``ttl_s / 3`` (at most 10 s) from a thread, each renewal a PUT with ``If-Match`` on the
    ETag it last wrote. A run that died without releasing leaves an object whose expiry
    passes after ``ttl_s``; the next run takes it over with ``If-Match`` on that stale
    ETag, so of two runs taking over one wins. It does not wait for the expiry when the
    lease names this machine (host name, boot id, pid namespace) and a pid that is gone
    (or now another process: its start time differs): a run SIGKILLed and rerun at once
    on the same host goes on at once. Another host's lease is taken over before it
    expires only with ``break_lease`` (``speechmill run --break-lease``); a live holder on
    this machine never.

    A lost lease stops the run: when a renewal finds the lease taken over (or deleted),
    or the store refused renewals until the lease expired, ``lost`` holds a
    :class:`LeaseLostError` naming the run directory and the new holder, the renewal
    thread raises it in the main thread (through the run's SIGINT handler), and every
    write of an :class:`ObjectRunStore` of this run in this process raises it instead of
    writing (:meth:`check`, the fence; a write when the lease may have expired unnoticed,
    e.g. after the process was paused, renews first). Workers in other processes (Ray)
    are not fenced: they stop with the run's executor.

    Stores: AWS S3 honours both conditions (``If-None-Match`` since Aug 2024, ``If-Match``
    on PUT since Nov 2024), as does moto (tested); where the filesystem cannot send them
    (not s3fs) the lock falls back to check-then-write, which narrows but does not close
    the race between two runs started at the same moment.
    """

    def __init__(self, store: ObjectRunStore, ttl_s: float = LOCK_TTL_S,
                 break_lease: bool = False, claim: bool = False) -> None:
        import threading

        self.store = store
        #: take over another host's live lease (the user says that run is gone)
        self.break_lease = break_lease
        #: check the prefix may be a run directory before locking, then mark it
        self.claim = claim
        #: what taking the lease did ("" when it was free or expired), for the run's log
        self.took_over = ""
        self.fs = store.fs
        self.path = store._p("run.lock")
        self.ttl_s = ttl_s
        self.owner = uuid.uuid4().hex
        self.etag: str | None = None
        #: the error this run stops with once the lease is lost (None while it holds it)
        self.lost: LeaseLostError | None = None
        #: until when the lease is surely ours: the last renewal's send time + ttl_s
        self.valid_until = 0.0
        self._mutex = threading.Lock()
        self._stop: Any = None
        self._thread: Any = None
        self._conditional = type(self.fs).__module__.startswith("s3fs")

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "pid": os.getpid(),
                           "host": socket.gethostname(), "since": now,
                           "expires": now + self.ttl_s, **_machine_ident(os.getpid())
                           }).encode()

    def _put(self, **cond: str) -> str | None:
        if self._conditional:
            out = self.fs.pipe_file(self.path, self._body(), **cond)
            return (out or {}).get("ETag")
        if cond.get("mode") == "create" and self.store._get(self.path) is not None:
            raise FileExistsError(self.path)
        self.fs.pipe_file(self.path, self._body())
        return None

    def _refused(self, other: dict[str, Any]) -> RunLockedError:
        left = _num(other.get("expires")) - time.time()
        if _same_machine(other):
            what = ("that process is still running on this host: stop it or let it "
                    "finish, then rerun")
        else:
            what = ("if that run is gone, wait for the lease to expire or rerun with "
                    "--break-lease to take it over now")
        return RunLockedError(
            f"run directory {self.store.url!r} is in use by pid {other.get('pid')} on "
            f"{other.get('host')} (lease {self.store.to_url(self.path)!r} expires in "
            f"{max(0.0, left):.0f} s unless renewed); {what}")

    def _takeover(self, other: dict[str, Any]) -> str | None:
        """Whether a lease another run wrote may be taken over now: None (no), "" (it
        expired) or what is said about it (its holder is gone; --break-lease)."""
        who = f"pid {other.get('pid')} on {other.get('host')}"
        if _num(other.get("expires")) <= time.time():
            return ""
        if _same_machine(other):
            if _holder_alive(other):
                return None  # a live run on this machine: never broken
            return (f"took over the lease of {who}: that process is gone (a run killed "
                    "before it could release it)")
        if self.break_lease:
            return (f"broke the lease of {who} before it expired (--break-lease): that "
                    "run, if it still runs, stops at its next renewal")
        return None

    def _unreachable(self, e: BaseException, doing: str) -> ConfigError:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return ConfigError(f"{self.store.url!r}: cannot {doing} ({type(e).__name__}: "
                           f"{first}); check the URL, the endpoint and the credentials",
                           key="run_dir")

    def _check_contents(self) -> None:
        """Claiming the prefix: the run's first access to the store. The prefix must hold
        nothing or a speechmill run directory (as :func:`check_run_dir_contents`); a store
        that cannot be reached is one :class:`ConfigError` naming ``run_dir``."""
        base = self.store.base
        try:
            self.fs.invalidate_cache(base)
            try:
                entries = [str(x).rstrip("/") for x in self.fs.ls(base, detail=False)]
            except (FileNotFoundError, NotADirectoryError):
                entries = []
            if entries == [base] and self.fs.isfile(base):
                raise ConfigError(f"{self.store.url!r} is an object, not a prefix; " + _HOW,
                                  key="run_dir")
            names = [x.rsplit("/", 1)[-1] for x in entries]

            def read(name: str) -> bytes | None:
                try:
                    return self.store._get(f"{base}/{name}")
                except (OSError, ValueError):
                    return None

            ok = is_run_dir_listing(names, read)
        except (ConfigError, RunLockedError):
            raise
        except Exception as e:
            raise self._unreachable(e, "list the run directory") from None
        if not ok:
            raise _not_a_run_dir(self.store.url, names)

    def __enter__(self) -> ObjectRunLock:
        if self.claim:
            self._check_contents()
        for _ in range(3):
            t0 = time.time()
            try:
                self.etag = self._put(mode="create")
                break
            except Exception as e:
                if not _is_precondition_failed(e):
                    raise self._unreachable(e, "create its lease object") from None
            self.fs.invalidate_cache(self.path)
            try:
                info = self.fs.info(self.path)
                raw = self.fs.cat_file(self.path)
            except FileNotFoundError:
                continue  # released meanwhile: try to create again
            other = _json_object(raw) or {}
            why = self._takeover(other)
            if why is None:
                raise self._refused(other)
            t0 = time.time()
            try:  # take it over, only if nobody else did first
                self.etag = self._put(IfMatch=info.get("ETag", "")) if self._conditional \
                    else self._put()
                self.took_over = why
                break
            except Exception as e:
                if not _is_precondition_failed(e):
                    raise
                continue
        else:
            raise RunLockedError(f"could not lock {self.store.to_url(self.path)!r}")
        self.valid_until = t0 + self.ttl_s
        _LEASES[self.store.url] = self
        self._start_renewal()
        if self.took_over:
            import logging

            logging.getLogger("speechmill").warning(
                "run directory %s: %s", self.store.url, self.took_over)
        if self.claim:
            marker = self.store._p(RUN_MARKER)
            try:
                if self.store._get(marker) is None:
                    _write_marker(marker, self.fs.pipe_file)
            except BaseException:
                self.__exit__()
                raise
        return self

    # -- holding it: renewal, and the fence every write of this process goes through ------
    def _holder(self) -> dict[str, Any] | None:
        """Who the lease object names now (None: it is gone)."""
        self.fs.invalidate_cache(self.path)
        try:
            return json.loads(self.fs.cat_file(self.path) or b"{}")
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def _lose(self, why: str) -> LeaseLostError:
        self.lost = LeaseLostError(
            f"run directory {self.store.url!r}: this run lost its lease "
            f"{self.store.to_url(self.path)!r}: {why}. It stops here so that two runs never "
            "write to the same run directory; every batch it committed is kept. Rerun once "
            "the other run has finished (or stop it), and the rerun resumes")
        return self.lost

    def _taken_over(self) -> LeaseLostError:
        other = self._holder()
        late = time.time() - (self.valid_until - self.ttl_s)
        if other is None:
            return self._lose("the lease object was deleted")
        return self._lose(
            f"it was taken over by pid {other.get('pid')} on {other.get('host')} "
            f"(owner {other.get('owner')}) after this run had not renewed it for "
            f"{late:.0f} s (TTL {self.ttl_s:g} s)")

    def _renew(self) -> None:
        """Renew now (under the mutex); raises :class:`LeaseLostError` when the lease is
        gone, or could not be renewed before it expired."""
        with self._mutex:
            if self.lost is not None:
                raise self.lost
            t0 = time.time()
            try:
                if self._conditional:
                    self.etag = self._put(**({"IfMatch": self.etag} if self.etag else {}))
                else:  # check-then-write: notices a takeover, cannot exclude a race
                    other = self._holder()
                    if (other or {}).get("owner") != self.owner:
                        raise self._taken_over()
                    self.etag = self._put()
            except LeaseLostError:
                raise
            except Exception as e:
                if _is_precondition_failed(e) or isinstance(e, FileNotFoundError):
                    raise self._taken_over() from None
                if time.time() < self.valid_until:
                    return  # the store is unreachable for now: retried until expiry
                raise self._lose(
                    f"it could not be renewed before it expired ({type(e).__name__}: "
                    f"{e}); another run may have taken it over since") from None
            self.valid_until = t0 + self.ttl_s

    def check(self) -> None:
        """The fence: raises :class:`LeaseLostError` when the lease is lost. A write
        when the lease may have expired (the process was paused, the renewal thread
        starved) first renews it, so nothing is written once another run may hold it."""
        if self.lost is not None:
            raise self.lost
        if time.time() < self.valid_until - self.ttl_s / 6:
            return
        try:
            self._renew()
        except LeaseLostError as e:
            from speechmill.pipeline.signals import discard_pending

            discard_pending(e)  # raised here: the renewal thread's interrupt is moot
            raise

    def _start_renewal(self) -> None:
        import threading

        self._stop = threading.Event()

        def renew() -> None:
            from speechmill.pipeline.signals import raise_in_main

            while not self._stop.wait(min(self.ttl_s / 3, 10.0)
                                      if time.time() < self.valid_until - self.ttl_s / 2
                                      else 1.0):  # retry soon while renewals fail
                try:
                    self._renew()
                except LeaseLostError as e:
                    # stop the run: the main thread raises it (writes of this process
                    # are fenced by check() meanwhile)
                    if not self._stop.is_set():
                        raise_in_main(e)
                    return

        self._thread = threading.Thread(target=renew, name="speechmill-lease", daemon=True)
        self._thread.start()

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=10)
        if _LEASES.get(self.store.url) is self:
            del _LEASES[self.store.url]
        if self.lost is not None:
            return  # someone else holds it now: leave their lease alone
        try:
            self.fs.invalidate_cache(self.path)
            other = json.loads(self.fs.cat_file(self.path) or b"{}")
            if other.get("owner") == self.owner:
                self.fs.rm_file(self.path)
        except (FileNotFoundError, json.JSONDecodeError):
            pass


def _num(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return 0.0
    return x if x == x else 0.0  # NaN: no expiry


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux); None if unknown."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return None
    try:
        return stat.rsplit(")", 1)[1].split()[19]
    except IndexError:
        return None


def _machine_ident(pid: int) -> dict[str, str]:
    """What tells this machine and process apart beyond the host name (Linux): the boot
    id, the pid namespace and the process's start time (a reused pid starts later)."""
    out = {"boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
           "pid_start": _pid_start(pid)}
    with contextlib.suppress(OSError):
        out["pid_ns"] = os.readlink("/proc/self/ns/pid")
    return {k: v for k, v in out.items() if v}


def _same_machine(other: dict[str, Any]) -> bool:
    """Whether a lease was written on this machine, in this pid namespace (so its pid
    can be checked here): same host name, and same boot id and pid namespace where the
    lease records them (leases of older versions name only the host)."""
    if other.get("host") != socket.gethostname():
        return False
    mine = _machine_ident(os.getpid())
    return all(other[k] == mine.get(k) for k in ("boot_id", "pid_ns") if k in other)


def _holder_alive(other: dict[str, Any]) -> bool:
    """Whether the pid a lease of this machine names still runs that process."""
    try:
        pid = int(other.get("pid", -1))
    except (TypeError, ValueError):
        return False
    if not _alive(pid):
        return False
    start = other.get("pid_start")
    return not start or _pid_start(pid) in (None, start)


#: the leases this process holds, by run directory URL: every ObjectRunStore of that run
#: in this process writes only through their fence (:meth:`ObjectRunLock.check`)
_LEASES: dict[str, ObjectRunLock] = {}
