"""The run directory: atomic part files, rejects, metrics, completion markers.

::

    RUN_DIR/
      dag.yaml  run.json
      stages/<id>/part-*.parquet          outputs (tmp + rename)
      stages/<id>/rejects/part-*.parquet
      stages/<id>/metrics.json  _SUCCESS  _fingerprint
      media/<id>/...                      audio written by the stage

Resume reads which inputs a stage already consumed from its own files: the outputs'
``parent_id`` and the rejects' ``id``. A part file either exists whole or not at all, so
a run killed at any moment resumes without duplicates or losses.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from speechmill.pipeline.errors import RunLockedError
from speechmill.pipeline.records import REJECT_SCHEMA, concat


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    """One run directory (a local or shared POSIX path)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
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
        atomic_write_json(self.root / "run.json", info)

    # -- lock ----------------------------------------------------------------------------
    def lock(self) -> RunLock:
        return RunLock(self.root / "run.lock")


class RunLock:
    """Refuses a second live run on the same directory.

    The lock is an ``flock`` on ``run.lock`` (NFS clients emulate it with the server's
    byte-range locks), which the kernel drops when the holder dies, so a crashed run never blocks the
    next one and two runs racing for a stale lock cannot both win. The file names the
    holder (pid, host) for the error message. Where the filesystem has no locks
    (``ENOLCK``), it falls back to creating the file exclusively and taking it over when
    its pid is dead on this host.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

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
            return self
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
            return self
        raise RunLockedError(f"could not lock {str(self.path)!r}")

    def __exit__(self, *exc: object) -> None:
        # unlink while still holding the lock; a waiter that opened the old file sees
        # that it is gone (inode check) and retries on a new one
        self.path.unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


def read_unit(unit: Path | pa.Table, keep: Any = None,
              columns: list[str] | None = None) -> pa.Table:
    """One unit of a stage's input (an upstream part file, or a source's plan table):
    only ``columns`` it has (None: all), only the rows ``keep`` (a bool mask) marks."""
    if isinstance(unit, pa.Table):
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
