"""Which run directories a run may use: a URL or path it can write to
(:func:`check_run_dir`, before anything runs) holding nothing or an earlier run
(:func:`check_run_dir_contents`, when a run claims it)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.store.layout import LOCK_NAME, RUN_JSON, RUN_MARKER, is_url, url_scheme

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
#: how a refused run directory message ends
HOW_TO_PICK = "pick a new or empty directory (e.g. run_dir: runs/NAME or --run-dir runs/NAME)"
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
            "is empty (an unset ${VAR:-}?); a run directory must be named: " + HOW_TO_PICK,
            key="run_dir")
    if _CONTROL_RE.search(url):
        raise ConfigError(f"{url!r} has a control character; " + HOW_TO_PICK, key="run_dir")
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


def json_object(data: bytes | None) -> dict[str, Any] | None:
    """``data`` parsed as a JSON object; None when it is missing, not JSON or not an object."""
    try:
        obj = json.loads(data) if data else None
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def is_run_dir_listing(names: list[str], read: Callable[[str], bytes | None]) -> bool:
    """Whether a folder holding ``names`` (its entries, bare names) is a speechmill run
    directory, or empty: it holds the marker :data:`RUN_MARKER` (written when a run
    first claims a directory), or ``run.json`` as speechmill writes it (``status`` and
    ``attempt``: every version wrote them, so run directories of older versions resume),
    or nothing but a lock a killed run left (``run.lock`` naming a pid and host).
    ``read(name)`` gives a file's bytes (None when it cannot be read)."""
    have = set(names)
    if not have or RUN_MARKER in have:
        return True
    if RUN_JSON in have:
        info = json_object(read(RUN_JSON))
        if info is not None and "status" in info and "attempt" in info:
            return True
    if LOCK_NAME in have:
        lock = json_object(read(LOCK_NAME))
        if lock is not None and "pid" in lock and "host" in lock:
            return True
    return False


def not_a_run_dir(where: str, names: list[str]) -> ConfigError:
    """The error for a folder ``where`` holding ``names`` that is no run directory."""
    shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
    return ConfigError(
        f"{where!r} is not empty and is not a speechmill run directory (it holds {shown}; "
        f"no {RUN_MARKER} or run.json of an earlier run); a run never writes into a "
        "folder of other files: " + HOW_TO_PICK, key="run_dir")


def check_run_dir_contents(root: str | os.PathLike[str]) -> None:
    """Before a run writes anything into a local run directory: it must not exist yet,
    be empty or be a speechmill run directory (:func:`is_run_dir_listing`). A folder of
    other files (``run_dir: .`` beside the DAG file) is refused with a
    :class:`ConfigError` naming ``run_dir``: the run would write ``dag.yaml`` over the
    user's DAG file."""
    p = Path(root)
    if not p.exists():
        if p.is_symlink():
            raise ConfigError(f"{str(p)!r} is a dangling symlink; " + HOW_TO_PICK, key="run_dir")
        return
    if not p.is_dir():
        raise ConfigError(f"{str(p)!r} is a file, not a directory; " + HOW_TO_PICK, key="run_dir")
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
        raise not_a_run_dir(str(p), names)


